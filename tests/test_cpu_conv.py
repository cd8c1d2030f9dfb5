"""mdjax.core.cpu_conv: convolution gradients as matmuls on CPU, checked against jax.grad, and its
batching rules under vmap (no grouped convolutions)."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mdjax.core import cpu_conv

# ------------------------------------------------------------------------------------------------
# CPU convolution weight gradients as matmuls


class _ConvNet(nn.Module):
  """Every branch of cpu_conv: im2col (few channels), per-tap matmuls, strides (the input gradient's
  col2im places strided taps), odd sizes, asymmetric padding, 1x1, SAME."""
  grouped: bool = True
  conv: object = None  # cpu_conv.Rules, as mdjax's models take it; None: XLA's convolutions

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, conv_general_dilated=self.conv)
    x = conv(4, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)(x)  # patches
    x = nn.relu(conv(20, (3, 3), padding="SAME")(x))  # patches (4 channels), string padding
    x = nn.relu(conv(16, (4, 4), (2, 2), padding=((1, 1), (1, 1)))(x))  # FastGAN D's down conv
    x = nn.relu(conv(16, (3, 3), (2, 2), padding=((1, 1), (0, 1)))(x))  # taps, stride 2
    x = conv(8, (1, 1))(x)  # a single tap
    if self.grouped:
      x = conv(8, (3, 3), feature_group_count=2, padding="SAME")(x)  # grouped: left to XLA
    return x.sum((1, 2))


@pytest.mark.parametrize("eigen, onednn_convs", [(False, False), (True, False), (True, True)])
def test_fast_conv_weight_gradients_match_jax_grad(eigen, onednn_convs, monkeypatch):
  """Every rule set (for XLA's default YNNPACK convolutions, for Eigen's under cpu_conv.jit's
  options, and oneDNN's custom calls) gives jax.grad's gradients."""
  monkeypatch.setattr(cpu_conv, "_ONEDNN_MIN_FLOPS", 0)  # these convs are far below it
  model = _ConvNet()
  x = jnp.asarray(np.random.RandomState(0).rand(2, 15, 15, 3).astype(np.float32))
  with jax.threefry_partitionable(False):
    params = model.init(jax.random.PRNGKey(0), x)["params"]

  fast_model = _ConvNet(conv=cpu_conv.Rules.with_eigen(eigen, onednn_convs))

  def loss(p, x):
    return jnp.sum(jnp.sin(model.apply({"params": p}, x)))

  def fast_loss(p, x):
    return jnp.sum(jnp.sin(fast_model.apply({"params": p}, x)))

  ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  fast = cpu_conv.jit(jax.grad(fast_loss, argnums=(0, 1)), enable=eigen)(params, x)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(fast)):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
  # The rules really replaced the convolution (a custom_vjp shows up in the jaxpr).
  jaxpr = str(jax.make_jaxpr(jax.grad(fast_loss))(params, x))
  assert "custom_vjp" in jaxpr
  assert ("target_name=mdjax_onednn_conv_dw" in jaxpr) == onednn_convs


# (rows per chunk, stride) -> images per chunk: 6 images of 9x9 -> 81 output pixels at stride 1,
# 5x4 = 20 at stride 2 with padding ((1, 1), (0, 1)).
CHUNKS = {(2048, 1): 6, (243, 1): 3, (81, 1): 1, (1, 1): 1,
          (2048, 2): 6, (243, 2): 6, (81, 2): 3, (1, 2): 1}


@pytest.mark.perf
@pytest.mark.parametrize("rows, stride", list(CHUNKS))
def test_weight_gradient_in_batch_chunks_matches_xla(monkeypatch, rows, stride):
  """dW of a 3x3 conv summed over chunks of the batch (a lax.scan; each chunk's output pixels at
  most _DW_CHUNK_ROWS, at least one image) equals XLA's own weight gradient for every chunking."""
  monkeypatch.setattr(cpu_conv, "_DW_CHUNK_ROWS", rows)
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(6, 9, 9, 16).astype(np.float32))
  w = jnp.asarray(rng.randn(3, 3, 16, 5).astype(np.float32))
  strides, padding = (stride, stride), ((1, 1), (1, 1)) if stride == 1 else ((1, 1), (0, 1))

  def conv(w_):
    return jax.lax.conv_general_dilated(x, w_, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  y, vjp = jax.vjp(conv, w)
  dy = jnp.asarray(rng.randn(*y.shape).astype(np.float32))
  chunk = cpu_conv._images_per_chunk(6, y.shape[1] * y.shape[2])  # pylint: disable=protected-access
  assert chunk == CHUNKS[(rows, stride)]
  ours = jax.jit(lambda x, dy: cpu_conv._weight_grad(  # pylint: disable=protected-access
      x, dy, (3, 3), strides, padding, jnp.float32))
  np.testing.assert_allclose(ours(x, dy), vjp(dy)[0], rtol=1e-4, atol=1e-4)
  assert ("scan" in str(jax.make_jaxpr(ours)(x, dy))) == (chunk < 6)  # the loop ran iff chunked


@pytest.mark.perf
def test_weight_gradient_in_chunks_under_shard_map(monkeypatch):
  """The chunked dW inside shard_map (the per-device SAM step): the loop's carry varies over the
  devices like its chunks (it failed to trace before), and the replicated kernel's gradient,
  summed over the 4 devices, is the global batch's."""
  monkeypatch.setattr(cpu_conv, "_DW_CHUNK_ROWS", 25)  # one image's 5x5 outputs a chunk: 2 a device
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(8, 9, 9, 16).astype(np.float32))
  w = jnp.asarray(rng.randn(3, 3, 16, 5).astype(np.float32))
  nhwc = ("NHWC", "HWIO", "NHWC")

  def grad(conv, w, x):  # stride 2: a matmul weight gradient under the default (YNNPACK) rules
    return jax.grad(lambda w_: (conv(x, w_, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=nhwc) ** 2).sum())(w)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  P = jax.sharding.PartitionSpec
  sharded = jax.jit(jax.shard_map(functools.partial(grad, cpu_conv.conv_general_dilated),
                                  mesh=mesh, in_specs=(P(), P("data")), out_specs=P(),
                                  check_vma=True))
  np.testing.assert_allclose(sharded(w, x), grad(jax.lax.conv_general_dilated, w, x),
                             rtol=1e-4, atol=1e-3)
  assert "scan" in str(jax.make_jaxpr(sharded)(w, x))  # the chunked loop really ran


# ------------------------------------------------------------------------------------------------
# Which gradient is XLA's and which a matmul, and the CPU compiler options


def _compiled_convolutions(fn, *args) -> list[str]:
  """The convolution instructions of `fn`'s compiled CPU program, and the fusion kind of each
  (a YNNPACK fusion's body holds its convolution: the fusion line says __ynn_fusion)."""
  hlo = fn.lower(*args).compile().as_text()
  ynn_bodies = set(re.findall(r"calls=(%[\w.\-]+), [^\n]*__ynn_fusion", hlo))
  convs, body = [], None
  for line in hlo.splitlines():
    header = re.match(r"^(%[\w.\-]+) ", line)
    if header:
      body = header.group(1)
    if " convolution(" in line:
      labels = re.search(r"dim_labels=([^,\s]+)", line).group(1)
      convs.append(("ynn " if body in ynn_bodies else "") + labels)
  return convs


def _grad_of_conv(kernel, stride, padding, jit):
  # Big enough for XLA's defaults to hand the convolutions to YNNPACK (it keeps tiny ones).
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(8, 16, 16, 32).astype(np.float32))
  w = jnp.asarray(rng.randn(kernel, kernel, 32, 32).astype(np.float32) * 0.1)

  def loss(w, x):
    y = cpu_conv.Rules.with_eigen(True)(x, w, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.sin(y))

  def ref_loss(w, x):
    return jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
        x, w, (stride, stride), [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))))

  fn = jit(jax.grad(loss, argnums=(0, 1)))
  for a, b in zip(jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(w, x), fn(w, x)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
  return _compiled_convolutions(fn, w, x)


@pytest.mark.perf
def test_3x3_stride_1_gradients_are_xla_own_eigen_convolutions():
  """A 3x3 stride-1 "same" conv keeps XLA's gradients (Eigen runs them fast once mdjax's compiler
  options take YNNPACK off convolutions): forward, dX and dW are all convolutions, none in a YNN
  fusion. XLA's defaults put them in YNN fusions, which is what the options change."""
  convs = _grad_of_conv(3, 1, 1, cpu_conv.jit)
  assert len(convs) == 3 and not any(c.startswith("ynn") for c in convs), convs
  assert any(c.startswith("ynn") for c in _grad_of_conv(3, 1, 1, jax.jit))


def _entry_instructions(hlo: str) -> list[tuple[str, str, list[str]]]:
  """(name, shape, operand names) of each instruction of a compiled program's ENTRY computation."""
  entry = hlo[hlo.index("\nENTRY "):]
  entry = entry[:entry.index("\n}")]
  out = []
  for line in entry.splitlines()[1:]:
    m = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\S+) [\w\-]+\(([^)]*)\)", line)
    if m:
      out.append((m.group(1), m.group(2), re.findall(r"%[\w.\-]+", m.group(3))))
  return out


@pytest.mark.perf
@pytest.mark.parametrize("fenced", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_eigen_weight_gradient_transposes_the_materialized_input(monkeypatch, fenced, stride):
  """The 3x3 dW under Eigen transposes its input as a plain copy of the activation the forward
  pass computed: no instruction producing the transposed input [C, H, W, B] reads the program's
  parameters (XLA otherwise fuses the activation's producer into the transpose, a strided loop
  2-4x slower than the copy). Without the fence (`fenced=False`) it does, which is what the
  first case guards against. The gradients equal jax.grad's either way."""
  if not fenced:
    monkeypatch.setattr(cpu_conv, "_materialized", lambda x, witness: x)
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(8, 16, 16, 32).astype(np.float32))
  w = jnp.asarray(rng.randn(3, 3, 32, 32).astype(np.float32) * 0.1)
  scale = jnp.asarray(rng.rand(32).astype(np.float32) + 0.5)
  nhwc = ("NHWC", "HWIO", "NHWC")

  def loss(w, x, scale, conv):
    act = jnp.maximum(x * scale - 0.1, 0.0)  # a BatchNorm-and-ReLU-like producer of the input
    return jnp.sum(jnp.sin(conv(act, w, (stride, stride), ((1, 1), (1, 1)),
                                dimension_numbers=nhwc)))

  def fast_loss(w, x, scale):
    return loss(w, x, scale, cpu_conv.Rules.with_eigen(True))

  fn = cpu_conv.jit(jax.grad(fast_loss, argnums=(0, 1)))
  ref = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)(w, x, scale,
                                                                  jax.lax.conv_general_dilated)
  for a, b in zip(ref, fn(w, x, scale)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
  entry = _entry_instructions(fn.lower(w, x, scale).compile().as_text())
  params = {name for name, _, ops in entry if not ops}
  transposed = [ops for _, shape, ops in entry if shape.startswith("f32[32,16,16,8]")]
  assert transposed, [shape for _, shape, _ in entry]
  reads_params = any(set(ops) & params for ops in transposed)
  assert reads_params == (not fenced), (transposed, params)


def test_materialized_is_the_identity_for_every_value():
  """The fence's two branches give `x` bitwise: the usual one, and the one a NaN in the witness
  takes (w == w is False for a NaN); -0, inf and NaN in `x` stay as they are."""
  x = jnp.asarray([1.5, -0.0, 2.0, float("inf"), float("nan")], jnp.float32)
  for first in (1.5, float("nan"), -0.0):
    witness = jnp.asarray([first, 3.0], jnp.float32)
    out = jax.jit(cpu_conv._materialized)(x, witness)  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(x).view(np.uint32))


@pytest.mark.perf
@pytest.mark.parametrize("kernel, stride, padding", [(2, 1, 1), (4, 2, 1)])
def test_other_weight_gradients_are_matmuls(kernel, stride, padding):
  """dW of anything but a 3x3 conv (stride 1 "same", or strided) is the matmul form: XLA's own
  became a convolution in a non-canonical layout (dim_labels other than b01f_01io->b01f) for
  FastGAN's 2x2 phase kernels, which XLA's CPU backend runs through a naive loop (30 s of a 1.6 s
  step); the compiled gradient holds only canonical convolutions (the forward, and dX at stride
  1)."""
  convs = _grad_of_conv(kernel, stride, padding, cpu_conv.jit)
  assert all(c == "b01f_01io->b01f" for c in convs), convs
  assert len(convs) == (2 if stride == 1 else 1), convs  # strided dX: a matmul and col2im


@pytest.mark.perf
def test_3x3_stride_2_weight_gradient_is_xla_own_eigen_convolution():
  """A 3x3 stride-2 conv's dW is XLA's own (Eigen ran it faster than the matmul form: 31 against
  63 ms for 128->256 at 16x16, batch 128; whole WRN-16-4 steps 2-3% faster), a canonical
  convolution; its dX stays a matmul (XLA's is an lhs-dilated convolution, slower)."""
  convs = _grad_of_conv(3, 2, 1, cpu_conv.jit)
  assert convs == ["b01f_01io->b01f"] * 2, convs  # the forward and dW


def test_compiler_options_fall_back_when_jaxlib_rejects_them(monkeypatch, caplog):
  """A jaxlib that does not know the option: one warning, and programs compile with XLA's
  defaults instead of failing."""
  monkeypatch.setattr(cpu_conv, "CPU_COMPILER_OPTIONS",
                      {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
  cpu_conv._options_accepted.cache_clear()  # pylint: disable=protected-access
  try:
    with caplog.at_level("WARNING"):
      assert cpu_conv.compiler_options() is None
      assert float(cpu_conv.jit(lambda x: x * 2)(jnp.float32(3))) == 6.0
      assert not cpu_conv.Rules.with_eigen(True).eigen  # XLA's defaults: their rules
    assert "rejects mdjax's CPU compiler options" in caplog.text
  finally:
    cpu_conv._options_accepted.cache_clear()  # pylint: disable=protected-access
  monkeypatch.undo()
  assert cpu_conv.compiler_options() == cpu_conv.CPU_COMPILER_OPTIONS
  assert cpu_conv.compiler_options(enable=False) is None
  assert cpu_conv.Rules.with_eigen(True).eigen


@pytest.mark.perf
@pytest.mark.parametrize("batched", ["per_model", "shared_input", "shared_kernel"])
def test_fast_conv_under_vmap(batched):
  """vmap over K models' kernels (the GAN ensemble's "vmap" strategy on CPU): the gradients equal
  jax.grad's, and no convolution becomes a grouped one (feature_group_count = K), which XLA's CPU
  backend runs slowly: cpu_conv's batching rules unroll them into K ordinary convolutions. A kernel
  shared by the batch keeps vmap's own rules."""
  k = 5  # not a channel count of _ConvNet: im2col patches are grouped convs over the channels
  model = _ConvNet(grouped=False)
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.rand(*((2,) if batched == "shared_input" else (k, 2)), 15, 15, 3)
                  .astype(np.float32))
  keys = jax.random.split(jax.random.PRNGKey(0), k)
  # The non-partitionable threefry: XLA compiles its draws of 4-D kernels in a fraction of the
  # time (mdjax.train.steps.INIT_THREEFRY_PARTITIONABLE); 6.6 -> 3.3 s for this init.
  with jax.threefry_partitionable(False):
    if batched == "shared_kernel":
      params = model.init(keys[0], x[0])["params"]
    else:
      params = jax.vmap(lambda key: model.init(key, x if batched == "shared_input" else x[0])
                        ["params"])(keys)

  fast_model = _ConvNet(grouped=False, conv=cpu_conv.Rules())

  def loss(p, x):
    return jnp.sum(jnp.sin(model.apply({"params": p}, x)))

  def fast_loss(p, x):
    return jnp.sum(jnp.sin(fast_model.apply({"params": p}, x)))

  in_axes = {"per_model": (0, 0), "shared_input": (0, None), "shared_kernel": (None, 0)}[batched]
  ref_fn, fast_fn = (jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=in_axes))
                     for f in (loss, fast_loss))
  for a, b in zip(jax.tree.leaves(ref_fn(params, x)), jax.tree.leaves(fast_fn(params, x))):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)

  def grouped_convs(fn):
    hlo = fn.lower(params, x).as_text()
    return [line for line in hlo.splitlines()
            if "convolution" in line and re.search(rf"(feature|batch)_group_count = {k} :", line)]

  if batched != "shared_kernel":
    assert grouped_convs(ref_fn)  # what plain vmap does: the check below can see it
  assert not grouped_convs(fast_fn)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 9, 9, 6), 3, 1, "SAME"), ((2, 9, 7, 6), 3, 2, "SAME"), ((3, 8, 8, 5), 5, 2, "SAME"),
    ((2, 6, 6, 4), 5, 1, ((1, 3), (2, 2))), ((1, 4, 4, 3), 3, 2, "VALID")])
def test_depthwise_conv_equals_xla_grouped_convolution_and_its_gradients(shape, kernel, stride,
                                                                          padding):
  c = shape[-1]
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, c))
  dn = ("NHWC", "HWIO", "NHWC")

  def loss(conv, x, w):
    y = conv(x, w, (stride, stride), padding, dimension_numbers=dn, feature_group_count=c)
    return jnp.sum(jnp.sin(y)), y

  (_, want), want_grads = jax.value_and_grad(
      functools.partial(loss, lax.conv_general_dilated), (0, 1), has_aux=True)(x, w)
  (_, got), got_grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, cpu_conv.depthwise_conv_general_dilated), (0, 1), has_aux=True))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, e in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
  # No grouped convolution is left in the program (that is what is slow on XLA's CPU backend).
  hlo = jax.jit(lambda x, w: loss(cpu_conv.depthwise_conv_general_dilated, x, w)[1]).lower(
      x, w).as_text()
  assert "feature_group_count" not in hlo and "convolution" not in hlo


def test_efficientnet_depthwise_convs_on_cpu_equal_xla_grouped_ones():
  from mdjax.models import efficientnet  # pylint: disable=import-outside-toplevel
  make = functools.partial(efficientnet.MBConv, 5, 2, 6, 8, 16, se_ratio=0.25,
                           drop_connect_rate=0.0, lite=False)
  x = jax.random.normal(jax.random.key(2), (2, 11, 11, 8))
  variables = make().init(jax.random.key(3), x, train=False)
  fast = jax.jit(lambda v, x: make(conv=cpu_conv.Rules()).apply(v, x, train=False))
  groups = lambda f: {int(g) for g in re.findall(r"feature_group_count = (\d+)",  # noqa: E731
                                                 f.lower(variables, x).as_text())}
  assert groups(fast) == {1}  # the 1x1 convs only
  got = fast(variables, x)
  slow = jax.jit(lambda v, x: make().apply(v, x, train=False))  # XLA's grouped convolution
  assert groups(slow) == {1, 48}
  np.testing.assert_allclose(got, slow(variables, x), rtol=1e-5, atol=1e-5)


def test_efficientnet_block_gradients_as_the_classifier_step_compiles_them():
  """The classifier step compiles every backbone, EfficientNet's too, with cpu_conv's CPU options
  and Eigen rules (mdjax.train.steps): an MBConv block's gradients there (1x1 convs, the depthwise
  conv as multiply-adds, squeeze-excitation, BatchNorm in training mode) equal XLA's own through its
  grouped convolution."""
  from mdjax.models import efficientnet  # pylint: disable=import-outside-toplevel
  for kernel, stride in ((3, 1), (5, 2)):
    make = functools.partial(efficientnet.MBConv, kernel, stride, 6, 8, 16, se_ratio=0.25,
                             drop_connect_rate=0.0, lite=False)
    x = jax.random.normal(jax.random.key(2), (4, 12, 12, 8))
    variables = make().init(jax.random.key(3), x, train=False)

    def loss(params, x, block):
      y, _ = block.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y))

    fast = make(conv=cpu_conv.Rules.with_eigen(True))
    got = cpu_conv.jit(functools.partial(jax.grad(loss, argnums=(0, 1)), block=fast),
                       enable=True)(variables["params"], x)
    want = jax.jit(functools.partial(jax.grad(loss, argnums=(0, 1)), block=make()))(
        variables["params"], x)  # XLA's grouped convolution and gradients
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
