"""mdjax.core.onednn: oneDNN's convolutions as XLA FFI custom calls, checked against XLA's own
convolutions and their jax.vjp gradients (an independent implementation), inside the classifier
step, under shard_map and vmap; and the build's cache, errors and fallback."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mdjax import config as config_lib
from mdjax import models, optim
from mdjax.core import cpu_conv, onednn
from mdjax.core import mesh as mesh_lib
from mdjax.train import steps

_NHWC = ("NHWC", "HWIO", "NHWC")
# Most tests need the opt-in extra (`pip install -e ".[onednn]"`: oneDNN's headers and library)
# and a C++ compiler; CI installs both. The ones about its absence run everywhere.
needs_onednn = pytest.mark.skipif(
    not onednn.installed(), reason="the onednn extra is not installed (pip install -e \".[onednn]\") "
    "or there is no C++ compiler")


@pytest.fixture(autouse=True)
def _every_conv_to_onednn(monkeypatch):
  """These tests' convolutions are tiny; cpu_conv routes only large ones to oneDNN."""
  monkeypatch.setattr(cpu_conv, "_ONEDNN_MIN_FLOPS", 0)


def _xla(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@needs_onednn
@pytest.mark.parametrize("x_shape, w_shape, strides, padding", [
    ((2, 9, 11, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1))),  # odd, non-square
    ((3, 10, 10, 6), (3, 3, 6, 8), (2, 2), ((1, 1), (1, 1))),  # WRN's strided 3x3
    ((2, 15, 15, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),  # a ResNet stem: 3 input channels
    ((2, 8, 8, 6), (1, 1, 6, 10), (2, 2), ((0, 0), (0, 0))),   # a strided 1x1 shortcut
    ((2, 9, 7, 4), (3, 2, 4, 5), (2, 1), ((1, 0), (2, 1))),    # asymmetric everything
])
def test_convolution_and_its_gradients_equal_xla(x_shape, w_shape, strides, padding):
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(*x_shape).astype(np.float32))
  w = jnp.asarray(rs.randn(*w_shape).astype(np.float32))
  y, vjp = jax.vjp(functools.partial(_xla, strides=strides, padding=padding), x, w)
  dy = jnp.asarray(rs.randn(*y.shape).astype(np.float32))
  dx, dw = vjp(dy)
  ours = jax.jit(lambda x, w, dy: (
      onednn.conv(x, w, strides, padding),
      onednn.conv_input_grad(dy, w, x.shape, strides, padding),
      onednn.conv_weight_grad(x, dy, w.shape, strides, padding)))(x, w, dy)
  for got, want in zip(ours, (y, dx, dw)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))


def _loss(x, w, onednn_convs, strides=(2, 2), padding=((1, 0), (2, 1))):
  y = cpu_conv.Rules.with_eigen(True, onednn_convs)(x, w, strides, padding,
                                                     dimension_numbers=_NHWC)
  return jnp.sum(jnp.sin(y))


def _inputs(batch=8):
  rs = np.random.RandomState(1)
  return (jnp.asarray(rs.randn(batch, 9, 10, 5).astype(np.float32)),
          jnp.asarray(rs.randn(3, 2, 5, 7).astype(np.float32)))


@pytest.mark.perf
@needs_onednn
def test_cpu_conv_routes_float32_convolutions_to_onednn():
  x, w = _inputs()
  grad = jax.grad(_loss, argnums=(0, 1))
  text = str(jax.make_jaxpr(functools.partial(grad, onednn_convs=True))(x, w))
  for target in ("mdjax_onednn_conv", "mdjax_onednn_conv_dx", "mdjax_onednn_conv_dw"):
    assert f"target_name={target}\n" in text
  assert "mdjax_onednn" not in str(jax.make_jaxpr(functools.partial(grad, onednn_convs=False))(x, w))
  # bfloat16 stays with XLA (the handlers are float32 only).
  bf = str(jax.make_jaxpr(functools.partial(grad, onednn_convs=True))(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)))
  assert "mdjax_onednn" not in bf
  ref = jax.jit(grad, static_argnums=2)(x, w, False)
  got = jax.jit(grad, static_argnums=2)(x, w, True)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.perf
@needs_onednn
def test_only_convolutions_above_the_size_threshold_go_to_onednn(monkeypatch):
  monkeypatch.setattr(cpu_conv, "_ONEDNN_MIN_FLOPS", 3e8)

  def targets(batch):  # 2 * batch * 16*16 * 9 * 64*64 FLOPs: 0.15 GFLOP at 8, 0.6 at 32
    x = jax.ShapeDtypeStruct((batch, 16, 16, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    fn = functools.partial(_loss, onednn_convs=True, strides=(1, 1), padding=((1, 1), (1, 1)))
    return str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(x, w)).count("target_name=mdjax_onednn")

  assert targets(8) == 0
  assert targets(32) == 3


@needs_onednn
def test_under_shard_map_and_vmap():
  """Per-device data with a replicated kernel (the per-device SAM body): the custom calls' results
  are typed as varying, and the kernel's gradient summed over devices as JAX's own rule does."""
  x, w = _inputs(8)
  mesh = mesh_lib.data_mesh(jax.devices()[:4])

  def per_device(onednn_convs):
    fn = jax.shard_map(lambda x, w: jax.grad(_loss, argnums=1)(x, w, onednn_convs),
                       mesh=mesh, in_specs=(jax.P("data"), jax.P()), out_specs=jax.P())
    return jax.jit(fn)(jax.device_put(x, mesh_lib.batch_sharding(mesh)),
                       jax.device_put(w, mesh_lib.replicated(mesh)))

  np.testing.assert_allclose(per_device(True), per_device(False), rtol=1e-5, atol=1e-4)
  batched = x.reshape(2, 4, *x.shape[1:])
  got, ref = (jax.vmap(lambda xb: jax.grad(_loss, argnums=1)(xb, w, r))(batched) for r in (1, 0))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.perf
@needs_onednn
def test_classifier_step_on_one_device_runs_onednn_and_matches_xla(monkeypatch):
  """Two SAM steps of a real WRN on one CPU device, with oneDNN's convolutions and with XLA's
  (the Eigen rules): the same parameters to float32 tolerance."""
  config = config_lib.base_config()
  config.model.backbone, config.model.head, config.model.weights = "wrn10_1", "linear", "random"
  config.train.optimizer, config.train.base_optimizer = "sam", "adam"
  config.train.schedule, config.train.learning_rate = "constant", 1e-3
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  model = models.build_classifier(config.model, 5)
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  rs = np.random.RandomState(0)
  batch = {"image": rs.rand(8, 16, 16, 3).astype(np.float32),
           "label": rs.randint(0, 5, 8).astype(np.int32)}

  def run():
    state = steps.create_train_state(model, tx, jax.random.PRNGKey(0), (16, 16, 3), mesh)
    step = steps.make_train_step(model, tx, config, mesh, fast_conv_grads=True)
    with jax.threefry_partitionable(steps.INIT_THREEFRY_PARTITIONABLE):
      hlo = step.jitted.lower(state, batch).as_text()
    for _ in range(2):
      state, metrics = step(state, batch)
    return hlo, jax.device_get(state.params), float(metrics["loss"])

  hlo, params, loss = run()
  assert hlo.count("mdjax_onednn_conv_dw") >= 2 * 9  # every conv, in both SAM gradients
  monkeypatch.setattr(onednn, "available", lambda: False)
  ref_hlo, ref_params, ref_loss = run()
  assert "mdjax_onednn" not in ref_hlo
  assert np.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-4)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@needs_onednn
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
  monkeypatch.setenv("MDJAX_CACHE_DIR", str(tmp_path / "cache"))
  first = onednn.build()
  assert first.is_file() and str(first).startswith(str(tmp_path))
  stamp = first.stat().st_mtime_ns
  assert onednn.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
  # A compiler that fails leaves no library behind, and says what failed.
  monkeypatch.setenv("MDJAX_CACHE_DIR", str(tmp_path / "other"))
  monkeypatch.setenv("CXX", "false")
  with pytest.raises(onednn.BuildError, match="compiling onednn_conv.cc failed"):
    onednn.build()
  assert not list((tmp_path / "other").rglob("*.so"))


def test_without_the_extra_nothing_is_built_or_said(tmp_path, monkeypatch, caplog):
  """No oneDNN found (the extra not installed): available() is False without a word, no library
  is built, and the step traces XLA's convolutions; MDJAX_ONEDNN=0 does the same with it."""
  monkeypatch.delenv("DNNLROOT", raising=False)
  monkeypatch.setenv("MDJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(onednn.sys, "prefix", str(tmp_path))
  monkeypatch.setattr(onednn.sys, "base_prefix", str(tmp_path))
  monkeypatch.setattr(onednn, "_SYSTEM_PREFIXES", ())
  assert not onednn.installed()
  with pytest.raises(onednn.NotInstalled, match=r"pip install -e \"\.\[onednn\]\""):
    onednn.build()
  onednn.available.cache_clear()
  try:
    with caplog.at_level("DEBUG", logger=onednn.__name__):
      assert not onednn.available()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    x, w = _inputs()
    assert "mdjax_onednn" not in str(
        jax.make_jaxpr(jax.grad(functools.partial(_loss, onednn_convs=True)))(x, w))
    assert not (tmp_path / "cache").exists()
    monkeypatch.undo()
    onednn.available.cache_clear()
    monkeypatch.setenv("MDJAX_ONEDNN", "0")
    assert not onednn.available()
  finally:
    monkeypatch.delenv("MDJAX_ONEDNN", raising=False)
    onednn.available.cache_clear()


def test_small_convolutions_never_build_the_library(tmp_path, monkeypatch):
  """The digits recipe's convolutions are below the size threshold: tracing its step does not
  build (or look for) oneDNN at all."""
  monkeypatch.setattr(cpu_conv, "_ONEDNN_MIN_FLOPS", 3e8)
  calls = []
  monkeypatch.setattr(onednn, "available", lambda: calls.append(1) or False)
  x = jax.ShapeDtypeStruct((32, 16, 16, 32), jnp.float32)  # 0.08 GFLOP
  w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
  fn = functools.partial(_loss, onednn_convs=True, strides=(1, 1), padding=((1, 1), (1, 1)))
  jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(x, w)
  assert calls == []


@needs_onednn
def test_a_broken_build_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("MDJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "false")
  onednn.available.cache_clear()
  try:
    with caplog.at_level("WARNING"):
      assert not onednn.available()
    assert "oneDNN convolutions unavailable" in caplog.text
  finally:
    monkeypatch.undo()
    onednn.available.cache_clear()
  assert onednn.available()
