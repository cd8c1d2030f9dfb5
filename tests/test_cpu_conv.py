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

from mdjax.core import cpu_conv

# ------------------------------------------------------------------------------------------------
# CPU convolution weight gradients as matmuls


class _ConvNet(nn.Module):
  """Every branch of cpu_conv: im2col (few channels), per-tap matmuls, strides (the input gradient's
  col2im places strided taps), odd sizes, asymmetric padding, 1x1, SAME."""
  grouped: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)(x)  # patches
    x = nn.relu(nn.Conv(20, (3, 3), padding="SAME")(x))  # patches (4 channels), string padding
    x = nn.relu(nn.Conv(16, (4, 4), (2, 2), padding=((1, 1), (1, 1)))(x))  # FastGAN D's down conv
    x = nn.relu(nn.Conv(16, (3, 3), (2, 2), padding=((1, 1), (0, 1)))(x))  # taps, stride 2
    x = nn.Conv(8, (1, 1))(x)  # a single tap
    if self.grouped:
      x = nn.Conv(8, (3, 3), feature_group_count=2, padding="SAME")(x)  # grouped: left to XLA
    return x.sum((1, 2))


def test_fast_conv_weight_gradients_match_jax_grad():
  model = _ConvNet()
  x = jnp.asarray(np.random.RandomState(0).rand(2, 15, 15, 3).astype(np.float32))
  with jax.threefry_partitionable(False):
    params = model.init(jax.random.PRNGKey(0), x)["params"]

  def loss(p, x):
    return jnp.sum(jnp.sin(model.apply({"params": p}, x)))

  def fast_loss(p, x):
    with cpu_conv.use_fast_conv_grads(True):
      return loss(p, x)

  ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  fast = jax.jit(jax.grad(fast_loss, argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(fast)):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
  # The interceptor really replaced the convolution (a custom_vjp shows up in the jaxpr).
  assert "custom_vjp" in str(jax.make_jaxpr(jax.grad(fast_loss))(params, x))


# (rows per chunk, stride) -> images per chunk: 6 images of 9x9 -> 81 output pixels at stride 1,
# 5x4 = 20 at stride 2 with padding ((1, 1), (0, 1)).
CHUNKS = {(2048, 1): 6, (243, 1): 3, (81, 1): 1, (1, 1): 1,
          (2048, 2): 6, (243, 2): 6, (81, 2): 3, (1, 2): 1}


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


def test_weight_gradient_in_chunks_under_shard_map(monkeypatch):
  """The chunked dW inside shard_map (the per-device SAM step): the loop's carry varies over the
  devices like its chunks (it failed to trace before), and the replicated kernel's gradient,
  summed over the 4 devices, is the global batch's."""
  monkeypatch.setattr(cpu_conv, "_DW_CHUNK_ROWS", 81)  # one 9x9 image a chunk: 2 per device
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(8, 9, 9, 16).astype(np.float32))
  w = jnp.asarray(rng.randn(3, 3, 16, 5).astype(np.float32))
  nhwc = ("NHWC", "HWIO", "NHWC")

  def grad(conv, w, x):
    return jax.grad(lambda w_: (conv(x, w_, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=nhwc) ** 2).sum())(w)

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  P = jax.sharding.PartitionSpec
  sharded = jax.jit(jax.shard_map(functools.partial(grad, cpu_conv.conv_general_dilated),
                                  mesh=mesh, in_specs=(P(), P("data")), out_specs=P(),
                                  check_vma=True))
  np.testing.assert_allclose(sharded(w, x), grad(jax.lax.conv_general_dilated, w, x),
                             rtol=1e-4, atol=1e-3)


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
  if batched == "shared_kernel":
    params = model.init(keys[0], x[0])["params"]
  else:
    params = jax.vmap(lambda key: model.init(key, x if batched == "shared_input" else x[0])
                      ["params"])(keys)

  def loss(p, x):
    return jnp.sum(jnp.sin(model.apply({"params": p}, x)))

  def fast_loss(p, x):
    with cpu_conv.use_fast_conv_grads(True):
      return loss(p, x)

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
