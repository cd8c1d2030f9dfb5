"""FastGAN model, DiffAugment, losses and the single-GAN step (tiny widths, 32x32 compute)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from mdjax.config import base_config
from mdjax.errors import ConfigError, DataError
from mdjax.gan import diffaug, fastgan, losses
from mdjax.gan import step as gan_step_lib

NGF = NDF = 8
NZ = 16
B = 2


def tiny_config(resolution=32):
  cfg = base_config().gan
  cfg.resolution, cfg.ngf, cfg.ndf, cfg.nz = resolution, NGF, NDF, NZ
  return cfg


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def fns(cfg):
  return gan_step_lib.make_gan_fns(cfg)


# The suite compiles at XLA's CPU backend level 0 with LLVM's expensive passes off (tests/conftest.py:
# jax_disable_most_optimizations); the steps whose outputs are recorded below were recorded with
# XLA's defaults, and LLVM's optimisations change their low bits (g_loss by 1.3e-5 relative at
# level 0). So these two programs are compiled with XLA's defaults, given as compiler options (which
# are part of jax's caches' keys, so no level-0 program of the same function is reused).
DEFAULT_LEVEL = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


@pytest.fixture(scope="module")
def jit_step(fns):
  return jax.jit(fns.step, compiler_options=DEFAULT_LEVEL)


@pytest.fixture(scope="module")
def state0(fns):
  return jax.jit(fns.init, compiler_options=DEFAULT_LEVEL)(jax.random.key(0))


def real_batch(seed, b=B, r=32):
  return jax.random.uniform(jax.random.key(seed), (b, r, r, 3), minval=-1.0, maxval=1.0)


# ---------------------------------------------------------------- shapes at every resolution


@pytest.mark.parametrize("r", fastgan.RESOLUTIONS)
def test_shapes_every_resolution(r):
  gen, disc = fastgan.build(r, NGF, NDF)
  small = fastgan.small_size(r)
  z = jax.ShapeDtypeStruct((B, NZ), jnp.float32)

  def run(z):
    keys = {"params": jax.random.key(0), "noise": jax.random.key(1)}
    (img, img_small), g_vars = gen.init_with_output(keys, z, train=False)
    (logits, recs), _ = disc.init_with_output({"params": jax.random.key(2)}, img, img_small,
                                              train=False, part=3)
    return img, img_small, logits, recs, g_vars

  img, img_small, logits, recs, g_vars = jax.eval_shape(run, z)  # no compute, even at 1024
  assert img.shape == (B, r, r, 3)
  assert img_small.shape == (B, small, small, 3)
  assert logits.shape == (B, 50)  # two 5x5 logit maps
  assert tuple(x.shape for x in recs) == tuple((B, s, s, 3) for s in fastgan.recon_sizes(r))
  # The reference channel table: the map of side 4 has ngf * 16 channels (GLU halves 2x that).
  init_kernel = g_vars["params"]["init"]["kernel"]
  assert init_kernel.shape == (4, 4, NZ, 2 * 16 * NGF)
  assert sum(f"feat_{s}" in g_vars["params"] for s in (8, 16, 32, 64, 128, 256, 512, 1024)) == \
      int(np.log2(r)) - 2


def test_reference_layout_at_256():
  gen, disc = fastgan.build(256, 64, 64)
  z = jax.ShapeDtypeStruct((2, 256), jnp.float32)
  g = jax.eval_shape(lambda z: gen.init({"params": jax.random.key(0), "noise": jax.random.key(0)},
                                        z, train=False), z)["params"]
  # UpBlockComp at 8, 32, 128 (two convs, two noise injections); UpBlock at 16, 64, 256.
  assert g["feat_8"]["SNConv_0"]["conv"]["kernel"].shape == (3, 3, 1024, 1024)  # GLU'd 4x4 in
  assert g["feat_8"]["SNConv_1"]["conv"]["kernel"].shape == (3, 3, 512, 1024)
  n_params = sum(x.size for x in jax.tree.leaves(g))
  assert 28e6 < n_params < 30e6  # the reference 256x256 generator has about 29 M
  assert {k for k in g["feat_8"]} >= {"NoiseInjection_0", "NoiseInjection_1"}
  assert not any(k.startswith("NoiseInjection") for k in g["feat_16"])
  assert {k for k in g if k.startswith("se_")} == {"se_64", "se_128", "se_256"}
  assert g["to_big"]["conv"]["kernel"].shape == (3, 3, 32, 3)  # ngf * 0.5 at 256
  assert g["to_small"]["conv"]["kernel"].shape == (1, 1, 64, 3)  # ngf * 1 at 128
  d = jax.eval_shape(lambda a, b: disc.init({"params": jax.random.key(0)}, a, b, train=False,
                                            part=0),
                     jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32),
                     jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32))["params"]
  assert d["stem1"]["conv"]["kernel"].shape == (3, 3, 3, 16)  # conv3x3 to ndf * 0.25
  assert {k for k in d if k.startswith("se_")} == {"se_8", "se_16", "se_32"}
  assert d["rf_big1"]["conv"]["kernel"].shape == (1, 1, 512, 1024)
  assert d["rf_small"]["conv"]["kernel"].shape == (4, 4, 256, 1)
  assert d["decoder_big"]["up_0"]["SNConv_0"]["conv"]["kernel"].shape == (3, 3, 512, 256)


def test_sle_pairs():
  assert fastgan.generator_sle_pairs(1024) == ((64, 4), (128, 8), (256, 16), (512, 32))
  assert fastgan.generator_sle_pairs(128) == ((64, 4), (128, 8))
  assert fastgan.generator_sle_pairs(32) == ((32, 4),)
  assert fastgan.discriminator_sle_pairs(256) == ((8, 64), (16, 128), (32, 256))
  assert fastgan.discriminator_sle_pairs(1024) == ((8, 64), (16, 128), (32, 256))
  assert fastgan.discriminator_sle_pairs(64) == ((8, 64),)


# ---------------------------------------------------------------- SLE wiring


def test_generator_sle_modulates_feat64_by_feat4():
  gen = fastgan.Generator(64, NGF)
  z = jax.random.normal(jax.random.key(0), (B, NZ))
  variables = jax.jit(lambda k: fastgan.init_variables(gen, k, z, train=False))(jax.random.key(1))
  seen = {}

  @jax.jit
  def run(scale):
    def interceptor(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and context.module.name == "se_64":
        small, big = args[:2]
        seen["small"], seen["big"] = small.shape, big.shape
        args = (small * scale, big) + tuple(args[2:])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return gen.apply(variables, z, train=False, rngs={"noise": jax.random.key(3)})[0]

  same, changed = run(1.0), run(0.0)
  assert seen["small"] == (B, 4, 4, 16 * NGF)  # the 4x4 map excites ...
  assert seen["big"] == (B, 64, 64, 2 * NGF)  # ... the 64x64 map
  # At init the gate is sigmoid(~0) = 0.5 +- a few %, so zeroing its input moves the image by a
  # few % (measured ~3%); without the SLE path the difference would be exactly 0.
  assert float(jnp.max(jnp.abs(same - changed))) > 0.01 * float(jnp.max(jnp.abs(same)))
  plain = jax.jit(lambda: gen.apply(variables, z, train=False, rngs={"noise": jax.random.key(3)}))()
  np.testing.assert_allclose(plain[0], same, atol=1e-6)


def test_sle_module_output_is_big_times_gate():
  sle = fastgan.SLE(4)
  small = jax.random.normal(jax.random.key(0), (1, 8, 8, 6))
  big = jax.random.normal(jax.random.key(1), (1, 16, 16, 4))
  v = fastgan.init_variables(sle, jax.random.key(2), small, big, train=False)
  apply = jax.jit(lambda s: sle.apply(v, s, big, train=False))
  out = apply(small)
  gate = out / big
  # One gate per (sample, channel) in (0, 1), broadcast over space.
  np.testing.assert_allclose(gate, jnp.broadcast_to(gate[:, :1, :1], gate.shape), rtol=1e-4)
  assert float(gate.min()) > 0 and float(gate.max()) < 1
  out2 = apply(small + 1.0)
  assert float(jnp.max(jnp.abs(out2 - out))) > 1e-5


# ---------------------------------------------------------------- init


def test_init_state(state0):
  leaves = jax.tree_util.tree_leaves_with_path(state0)
  assert all(isinstance(x, jax.Array) for _, x in leaves)  # arrays only: stackable, checkpointable
  noise_w = [x for p, x in jax.tree_util.tree_leaves_with_path(state0.g_params)
             if "NoiseInjection" in jax.tree_util.keystr(p)]
  assert len(noise_w) == 4 and all(float(w) == 0.0 for w in noise_w)  # comp blocks at 8 and 32
  k = np.asarray(state0.g_params["feat_16"]["SNConv_0"]["conv"]["kernel"])
  assert abs(k.std() - 0.02) < 0.004 and abs(k.mean()) < 0.004
  scales = np.concatenate([np.ravel(x) for p, x in jax.tree_util.tree_leaves_with_path(state0.d_params)
                           if jax.tree_util.keystr(p).endswith("['scale']")])
  assert abs(scales.mean() - 1.0) < 0.01 and 0.01 < scales.std() < 0.03
  chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state0.g_params,
                            state0.ema_params)
  assert all(jax.tree.leaves(chex_equal))
  # Spectral-norm vectors live next to BatchNorm statistics.
  assert any("u" in jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(state0.d_stats))


# ---------------------------------------------------------------- DiffAugment


def test_diffaug_shapes_determinism_ranges():
  x = real_batch(0, b=4)
  aug = jax.jit(lambda x, k: diffaug.diff_augment(x, k, "color,translation,cutout"))
  a1, a2, a3 = aug(x, jax.random.key(1)), aug(x, jax.random.key(1)), aug(x, jax.random.key(2))
  assert a1.shape == x.shape and a1.dtype == x.dtype
  np.testing.assert_array_equal(a1, a2)
  assert float(jnp.max(jnp.abs(a1 - a3))) > 0.1
  # Brightness +-0.5, saturation x2 and contrast x1.5 keep [-1, 1] inputs within about [-7, 7].
  assert bool(jnp.all(jnp.isfinite(a1))) and float(jnp.max(jnp.abs(a1))) < 7.0


def test_translation_is_a_zero_filled_shift():
  r = 32
  x = (jnp.arange(4 * r * r * 3, dtype=jnp.float32).reshape(4, r, r, 3) + 1.0)
  out = np.asarray(jax.jit(diffaug.translation)(x, jax.random.key(3)))
  xs = np.asarray(x)
  shift = int(r * 0.125 + 0.5)
  for b in range(4):
    matches = []
    for tx in range(-shift, shift + 1):
      for ty in range(-shift, shift + 1):
        pad = np.pad(xs[b], ((shift, shift), (shift, shift), (0, 0)))
        ref = pad[shift + tx:shift + tx + r, shift + ty:shift + ty + r]
        if np.array_equal(ref, out[b]):
          matches.append((tx, ty))
    assert len(matches) == 1, (b, matches)


def test_cutout_zeroes_one_square():
  r = 32
  x = jnp.ones((8, r, r, 3))
  out = np.asarray(jax.jit(diffaug.cutout)(x, jax.random.key(4)))
  for b in range(8):
    zero = out[b, :, :, 0] == 0
    rows, cols = np.nonzero(zero.any(axis=1))[0], np.nonzero(zero.any(axis=0))[0]
    assert zero.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
    assert len(rows) <= r // 2 and len(cols) <= r // 2
    assert zero.sum() >= (r // 4) ** 2  # the centre is inside the image, so at least a quarter
    assert np.all(out[b][~zero] == 1.0)


def test_color_formulas_per_image():
  x = jnp.zeros((64, 4, 4, 3))
  out = diffaug.color(x, jax.random.key(5))
  # A grey image keeps zero saturation; contrast leaves a constant image unchanged, so the
  # output is the brightness draw, per image, in [-0.5, 0.5].
  per_image = out.reshape(64, -1)
  np.testing.assert_allclose(per_image, per_image[:, :1].repeat(48, axis=1), atol=1e-6)
  assert float(per_image.min()) >= -0.5 and float(per_image.max()) <= 0.5
  assert float(per_image.std()) > 0.15


# ---------------------------------------------------------------- losses


def test_hinge_losses_and_recon():
  logits = jnp.full((4, 50), 2.0)
  assert float(losses.d_hinge_real(logits, jax.random.key(0))) == 0.0  # beyond the margin
  fake = float(losses.d_hinge_fake(logits, jax.random.key(0)))
  assert 2.8 <= fake <= 3.0  # u + 2, u in [0.8, 1]
  assert float(losses.g_loss(logits)) == -2.0
  a, b = jnp.zeros((2, 4, 4, 3)), jnp.full((2, 4, 4, 3), 0.5)
  assert float(losses.reconstruction(a, b, "mse")) == pytest.approx(0.25)
  assert float(losses.reconstruction(a, b, "l1")) == pytest.approx(0.5)


# ---------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def trained(jit_step, state0):
  states, metrics = [state0], []
  for i in range(3):
    s, m = jit_step(states[-1], real_batch(10 + i), jax.random.key(100 + i))
    states.append(s)
    metrics.append(m)
  return states, metrics


def test_step_trains(trained):
  states, metrics = trained
  assert set(metrics[0]) == {"d_loss", "g_loss", "recon_loss", "d_real", "d_fake"}
  for m in metrics:
    assert all(x.shape == () and bool(jnp.isfinite(x)) for x in m.values())
  d_losses = [float(m["d_loss"]) for m in metrics]
  assert max(d_losses) - min(d_losses) > 1e-3
  assert int(states[-1].step) == 3
  for field in ("g_params", "d_params", "g_stats", "d_stats"):
    before, after = getattr(states[0], field), getattr(states[-1], field)
    delta = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert delta > 1e-5, field
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(states[-1]))
  # Noise-injection weights start at 0 and are learned.
  assert float(jnp.abs(states[-1].g_params["feat_8"]["NoiseInjection_0"]["weight"])) > 0


def _hand_ema(g_history, decay):
  """sum_i (1 - d) d^(t-i) g_i / (1 - d^t) in float64, from G's parameters after steps 1..t."""
  t = len(g_history)
  w = np.array([(1 - decay) * decay ** (t - i) for i in range(1, t + 1)]) / (1 - decay ** t)
  return jax.tree.map(
      lambda *gs: np.tensordot(w, np.stack([np.asarray(g, np.float64) for g in gs]), 1), *g_history)


def test_ema_is_the_bias_corrected_average_of_g(trained, cfg):
  states, _ = trained
  # After one step the random init carries no weight at all: the EMA generator is G.
  for a, b in zip(jax.tree.leaves(states[1].ema_params), jax.tree.leaves(states[1].g_params)):
    np.testing.assert_array_equal(a, b)
  for n in (1, 2, 3):
    expect = _hand_ema([s.g_params for s in states[1:n + 1]], cfg.ema_decay)
    for a, b in zip(jax.tree.leaves(states[n].ema_params), jax.tree.leaves(expect)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("decay,n", [(0.999, 3000), (0.9, 300), (0.0, 5)])
def test_ema_update_over_long_runs(decay, n):
  """Many steps, where the reference's uncorrected average would still hold decay^n of the init."""
  rng = np.random.default_rng(0)
  walk = (1.0 + np.cumsum(rng.normal(scale=0.01, size=(n, 6)), axis=0)).astype(np.float32)
  init = jnp.full((6,), 123.0)  # a stand-in random init that must carry no weight

  def body(ema, xs):
    g, t = xs
    return gan_step_lib.ema_update(ema, g, t, decay), None

  ema, _ = jax.jit(lambda e, w: jax.lax.scan(body, e, (w, jnp.arange(1, n + 1))))(init, walk)
  np.testing.assert_allclose(ema, _hand_ema(list(walk), decay), rtol=2e-5)
  # optax's own debiased EMA is the same average.
  tx = optax.ema(decay, debias=True)
  opt_state = tx.init(walk[0])
  for g in walk:
    expect, opt_state = tx.update(g, opt_state)
  np.testing.assert_allclose(ema, expect, rtol=2e-5)


def test_step_is_deterministic_for_a_key(jit_step, trained, state0):
  states, metrics = trained
  _, m = jit_step(state0, real_batch(10), jax.random.key(100))
  for k in metrics[0]:
    assert float(m[k]) == float(metrics[0][k])


# The first step's outputs as the step computed them before GAN distillation added `guided_step`
# (commit ca69ea7, this CPU): the plain step must not change with it. After two steps the whole
# state was also bit-identical between the two versions.
_RECORDED_FIRST_STEP = {"d_fake": -0.03401239216327667, "d_loss": 3.0741543769836426,
                        "d_real": 0.031793512403964996, "g_loss": 0.17490799725055695,
                        "recon_loss": 1.2605308294296265}
_RECORDED_ABS_SUMS = {"g_params": 6568.10693359375, "d_params": 3123.153076171875,
                      "ema_params": 6568.10693359375, "g_stats": 647.1900024414062,
                      "d_stats": 524.9300537109375}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="recorded on CPU; GPUs round differently")
def test_plain_step_matches_its_recorded_outputs(trained):
  states, metrics = trained
  for k, v in _RECORDED_FIRST_STEP.items():
    assert float(metrics[0][k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
  for field, v in _RECORDED_ABS_SUMS.items():
    total = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(getattr(states[1], field)))
    assert total == pytest.approx(v, rel=1e-5), field


def test_vmap_over_stacked_states_equals_separate_steps(fns, jit_step, state0):
  other = jax.jit(fns.init)(jax.random.key(7))
  reals = [real_batch(20), real_batch(21)]
  keys = [jax.random.key(30), jax.random.key(31)]
  separate = [jit_step(s, x, k) for s, x, k in zip((state0, other), reals, keys)]
  stack = lambda *xs: jnp.stack(xs)  # noqa: E731
  v_state, v_metrics = jax.jit(jax.vmap(fns.step))(
      jax.tree.map(stack, state0, other), jnp.stack(reals), jnp.stack(keys))
  for i, (s, m) in enumerate(separate):
    for k in m:
      np.testing.assert_allclose(v_metrics[k][i], m[k], rtol=1e-4, atol=1e-5)
    # Adam's first step is about lr * sign(grad): a gradient near 0 can flip sign between grouped
    # (vmapped) and plain convolutions, moving one weight by 2 * lr = 4e-4 (measured: < 0.2% of
    # the weights). The two GANs start from different weights (|difference| ~ 0.03 nearly
    # everywhere), so a mixed-up class axis would fail both bounds.
    mine = jax.tree.map(lambda x: x[i], v_state)
    for field in ("g_params", "d_params", "ema_params", "g_stats", "d_stats"):
      for a, b in zip(jax.tree.leaves(getattr(mine, field)), jax.tree.leaves(getattr(s, field))):
        diff = np.abs(np.asarray(a) - np.asarray(b))
        assert diff.max() <= 4.5e-4, field
        assert (diff > 1e-4).mean() <= 0.01, field


def test_sample_uses_ema_generator(fns, trained):
  states, _ = trained
  samp = jax.jit(fns.sample, static_argnums=2)
  imgs = samp(states[-1], jax.random.key(0), 3)
  assert imgs.shape == (3, 32, 32, 3)
  assert float(jnp.max(jnp.abs(imgs))) <= 1.0
  np.testing.assert_array_equal(imgs, samp(states[-1], jax.random.key(0), 3))
  swapped = states[-1].replace(ema_params=states[0].g_params)
  assert float(jnp.max(jnp.abs(samp(swapped, jax.random.key(0), 3) - imgs))) > 1e-6


def test_module_level_api_and_errors(cfg, trained):
  states, _ = trained
  step = jax.jit(functools.partial(gan_step_lib.gan_step, config=cfg))
  with pytest.raises(DataError, match="resolution"):
    step(states[-1], real_batch(0, r=64), jax.random.key(0))
  bad = tiny_config()
  bad.resolution = 48
  with pytest.raises(ConfigError, match="gan.resolution"):
    gan_step_lib.init_gan_state(jax.random.key(0), bad)
  bad = tiny_config()
  bad.diffaug = "color,flip"
  with pytest.raises(ConfigError, match="gan.diffaug"):
    gan_step_lib.make_gan_fns(bad)
  assert gan_step_lib.GANSpec.from_config(cfg) == gan_step_lib.make_gan_fns(cfg).spec


@pytest.mark.parametrize("side,cin,cout", [(1, 3, 2), (4, 5, 6), (8, 16, 8)])
def test_upsample_conv_equals_conv_of_upsampled_input(side, cin, cout):
  """The phase-decomposed up-block conv is the naive nearest-x2 + conv3x3, values and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, side, side, cin))
  w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))

  def naive(x, w):
    return jax.lax.conv_general_dilated(fastgan.upsample2(x), w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  fused = jax.jit(fastgan.upsample_conv3x3)(x, w)
  assert fused.shape == (2, 2 * side, 2 * side, cout)
  np.testing.assert_allclose(fused, naive(x, w), rtol=1e-5, atol=5e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  ref = jax.grad(loss(naive), (0, 1))(x, w)
  got = jax.jit(jax.grad(loss(fastgan.upsample_conv3x3), (0, 1)))(x, w)
  for a, b in zip(ref, got):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=5e-4)
  with pytest.raises(ValueError, match="3x3"):
    fastgan.upsample_conv3x3(x, w[:2, :2])
