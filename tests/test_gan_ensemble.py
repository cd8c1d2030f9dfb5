"""The per-class GAN ensemble: one compiled program == K separate trainings, data isolation,
checkpoint resume, NaN handling, outputs. Most tests use a tiny linear stand-in GAN with the
contract's signatures (fast to compile); the equivalence and learning tests also run the real
FastGAN at ngf = ndf = 8, 32x32."""

from __future__ import annotations

import functools
import logging
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mdjax import config as config_lib
from mdjax.core import mesh as mesh_lib, process
from mdjax.errors import NonFiniteLossError, UserError
from mdjax.gan import chunks, class_data, ensemble, generate, program

from local_processes import run_processes

RES = 8
TINY = None


def tiny():
  """The shared stand-in GAN (one object, so tests reuse its compiled programs)."""
  global TINY
  if TINY is None:
    TINY = tiny_gan_fns()
  return TINY


# ------------------------------------------------------------------------------------------------
# A tiny stand-in GAN with the contract's (init, step, sample) signatures.
# ------------------------------------------------------------------------------------------------
def tiny_gan_fns(nz=4, lr=1e-2, poison_step=None, poison_prob=0.0):
  """Linear G and D, hinge losses, Adam, EMA. Metrics also report what real batch it saw.

  With `poison_step`, the step turns its loss and parameters into NaN at that step counter with
  probability `poison_prob` (drawn from the step's key) for classes whose images are all white.
  """
  tx = optax.adam(lr, b1=0.5)
  dim = RES * RES * 3

  def gen(g, z):
    return jnp.tanh(z @ g["w"] + g["b"])

  def disc(d, x):
    return x.reshape(x.shape[0], -1) @ d["w"] + d["b"]

  def init(rng):
    kg, kd = jax.random.split(rng)
    g = {"w": 0.1 * jax.random.normal(kg, (nz, dim)), "b": jnp.zeros((dim,))}
    d = {"w": 0.1 * jax.random.normal(kd, (dim,)), "b": jnp.zeros(())}
    return {"t": jnp.zeros((), jnp.int32), "g": g, "d": d, "g_opt": tx.init(g), "d_opt": tx.init(d),
            "ema": g}

  def step(state, real, rng):
    kz, kp = jax.random.split(rng)
    z = jax.random.normal(kz, (real.shape[0], nz))

    # Position weights make the step depend on the order of the batch, so the tests see it if
    # a class draws different batches in different settings.
    weights = 1.0 + jnp.arange(real.shape[0]) / real.shape[0]

    def d_loss_fn(d):
      fake = gen(state["g"], z)
      return (jnp.mean(weights * jax.nn.relu(1 - disc(d, real)))
              + jax.nn.relu(1 + disc(d, fake)).mean())

    d_loss, d_grad = jax.value_and_grad(d_loss_fn)(state["d"])
    upd, d_opt = tx.update(d_grad, state["d_opt"], state["d"])
    d = optax.apply_updates(state["d"], upd)
    g_loss, g_grad = jax.value_and_grad(lambda g: -disc(d, gen(g, z)).mean())(state["g"])
    upd, g_opt = tx.update(g_grad, state["g_opt"], state["g"])
    g = optax.apply_updates(state["g"], upd)
    if poison_step is not None:
      bad = ((state["t"] == poison_step) & (jnp.min(real) > 0.99)
             & (jax.random.uniform(kp) < poison_prob))
      g = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), g)
      d_loss = jnp.where(bad, jnp.nan, d_loss)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state["ema"], g)
    new = {"t": state["t"] + 1, "g": g, "d": d, "g_opt": g_opt, "d_opt": d_opt, "ema": ema}
    return new, {"d_loss": d_loss, "g_loss": g_loss, "real_min": real.min(), "real_max": real.max()}

  def sample(state, rng, n):
    return gen(state["ema"], jax.random.normal(rng, (n, nz))).reshape(n, RES, RES, 3)

  return program.GANFns(init, step, sample)


def gan_config(**overrides):
  c = config_lib.base_config().gan
  c.resolution, c.batch_size, c.steps = RES, 4, 6
  c.sample_every, c.checkpoint_every, c.log_every = 3, 3, 1
  c.chunk_size = 8
  for k, v in overrides.items():
    c[k] = v
  return c


def class_images(n, value):
  return np.full((n, RES, RES, 3), value, np.uint8)


def noisy_images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)


@functools.lru_cache
def _single_class_program(fns, batch_size):
  return jax.jit(functools.partial(program.class_step, fns, batch_size=batch_size))


def separate_training(fns, seed, class_index, images, steps, batch_size, count=None):
  """The reference: one class trained alone by its own jitted program (`count` of `images` real)."""
  init_key, rng = chunks.class_keys(seed, class_index)
  state = jax.jit(fns.init)(init_key)
  step = _single_class_program(fns, batch_size)
  imgs, count = jnp.asarray(images), jnp.int32(len(images) if count is None else count)
  for s in range(steps):
    state, _ = step(state, rng, imgs, count, jnp.int32(s))
  return state


def run_ensemble(fns, seed, classes, images, steps, batch_size, strategy, mesh):
  padded = classes + [classes[-1]] * (-len(classes) % mesh.size)
  capacity = max(len(x) for x in images)
  data, counts = class_data.stack_class_images(
      [images[classes.index(k)] for k in padded], capacity)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("class"))
  data, counts = jax.device_put((data, counts), sharding)
  ens = chunks.init_ensemble(fns, seed, padded, mesh)
  if strategy == program.PER_CLASS:
    ens = program.per_class_layout(ens)
  step = program.make_ensemble_step(fns, batch_size=batch_size, strategy=strategy, mesh=mesh)
  metrics = []
  for s in range(steps):
    ens, m = step(ens, data, counts, jnp.int32(s))
    metrics.append(jax.device_get(m))
  return ens, metrics


def assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                                                       rtol=0), a, b)


# ------------------------------------------------------------------------------------------------
# Pure pieces.
# ------------------------------------------------------------------------------------------------
def test_batch_indices_stay_within_the_class():
  for count in (1, 3, 8, 13):
    for s in range(5):
      idx = np.asarray(class_data.batch_indices(jax.random.PRNGKey(s), jnp.int32(count), 16, 8))
      assert idx.min() >= 0 and idx.max() < count
      if count >= 8:
        assert len(set(idx.tolist())) == 8  # without replacement when the class is big enough
      else:
        assert set(idx.tolist()) == set(range(count))  # every image used, wrapped


def test_balanced_chunks_and_strategy():
  assert class_data.balanced_chunks(list(range(10)), 8) == [list(range(5)), list(range(5, 10))]
  assert [len(c) for c in class_data.balanced_chunks(list(range(40)), 8)] == [8] * 5
  assert class_data.balanced_chunks([4, 9], 8) == [[4, 9]]
  assert program.resolve_strategy("auto", "cpu", 1) == "per_class"
  assert program.resolve_strategy("auto", "cpu", 4) == "map"
  assert program.resolve_strategy("auto", "gpu", 1) == "vmap"
  assert program.resolve_strategy("vmap", "cpu") == "vmap"
  with pytest.raises(UserError, match="gan.ensemble"):
    program.resolve_strategy("pmap")


# ------------------------------------------------------------------------------------------------
# One program == separate programs; classes never see each other's images.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,devices", [("unroll", 1), ("vmap", 1), ("map", 1),
                                              ("per_class", 1), ("unroll", 4), ("vmap", 4),
                                              ("map", 4)])
def test_one_program_equals_separate_trainings_standin(strategy, devices):
  # 1 device: all 3 classes unrolled / vmapped / mapped in one program; 4 devices: sharded, padded
  # to 4.
  fns = tiny()
  classes = [2, 5, 11]
  images = [noisy_images(5, 0), noisy_images(9, 1), noisy_images(3, 2)]
  mesh = mesh_lib.class_mesh(jax.devices()[:devices])
  ens, _ = run_ensemble(fns, 7, classes, images, 4, 4, strategy, mesh)
  for p, k in enumerate(classes):
    ref = separate_training(fns, 7, k, images[p], 4, 4)
    assert_trees_close(program.unstack_class(ens, p), ref, atol=1e-5)
  # Different classes really are different GANs.
  assert not np.allclose(program.unstack_class(ens, 0)["g"]["w"], program.unstack_class(ens, 1)["g"]["w"])


@pytest.mark.perf
def test_map_loops_only_over_several_classes_per_device():
  """"map" with one class per device (K no larger than the device count) runs that class's step
  with no loop around it (a one-trip loop cost 8 s of the smoke FastGAN step's compile at level
  0); with two per device it loops over them. Equal to separate trainings either way."""
  fns = tiny()
  mesh = mesh_lib.class_mesh(jax.devices()[:2])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("class"))
  step = program.make_ensemble_step(fns, batch_size=4, strategy="map", mesh=mesh)
  loops = {}
  for per_device in (1, 2):
    classes = list(range(2 * per_device))
    images = [noisy_images(4, k) for k in classes]
    data, counts = jax.device_put(class_data.stack_class_images(images, 4), sharding)
    ens = chunks.init_ensemble(fns, 0, classes, mesh)
    # The step's own code has loops too (jax's threefry), the same number in both programs.
    loops[per_device] = step.lower(ens, data, counts, jnp.int32(0)).as_text().count("stablehlo.while")
    ens, _ = step(ens, data, counts, jnp.int32(0))
    for p, k in enumerate(classes):
      assert_trees_close(program.unstack_class(ens, p),
                         separate_training(fns, 0, k, images[p], 1, 4), atol=1e-5)
  assert loops[2] == loops[1] + 1, loops


@pytest.mark.parametrize("strategy", ["unroll", "vmap", "map", "per_class"])
def test_classes_never_see_other_images(strategy):
  fns = tiny()
  classes = [0, 1, 2]
  values = [40, 120, 200]  # constant images; the padding slots are 0 (never a class value)
  images = [class_images(n, v) for n, v in zip((1, 3, 7), values)]
  # 2 devices: 2 classes per device, one padded ("per_class" runs on one device).
  mesh = mesh_lib.class_mesh(jax.devices()[:1 if strategy == "per_class" else 2])
  _, metrics = run_ensemble(fns, 0, classes, images, 5, 4, strategy, mesh)
  for m in metrics:
    for p, v in enumerate(values):
      expected = v / 127.5 - 1.0
      assert m["real_min"][p] == pytest.approx(expected, abs=1e-6)
      assert m["real_max"][p] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# The full loop: outputs, resume, NaN handling.
# ------------------------------------------------------------------------------------------------
def _train(tmp_path, name, fns, images_by_class, **kw):
  cfg = gan_config(**kw.pop("cfg", {}))
  kw.setdefault("progress", False)
  return ensemble.train_class_gans(images_by_class, cfg, str(tmp_path / name), seed=3,
                                   step_fns=fns, keep_states=True, **kw)


def test_train_class_gans_outputs(tmp_path):
  fns = tiny()
  data = {1: noisy_images(5, 1), 4: noisy_images(3, 2), 6: noisy_images(16, 3)[:, :6, :6]}
  result = _train(tmp_path, "w", fns, data, num_samples={1: 5, 4: 0, 6: 2},
                  cfg={"chunk_size": 2})  # 3 classes -> chunks of 2 and 1
  assert result.class_indices == (1, 4, 6) and result.steps == 6
  assert sorted(result.generated) == [1, 6]
  assert result.generated[1].shape == (5, RES, RES, 3) and result.generated[1].dtype == np.uint8
  assert [h["step"] for h in result.history[4]] == list(range(1, 7))
  assert set(result.history[1][0]) >= {"step", "d_loss", "g_loss"}
  for k in (1, 4, 6):
    d = tmp_path / "w" / "samples" / f"class_{k:04d}"
    assert sorted(p.name for p in d.iterdir()) == ["real.png", "step_0000003.png", "step_0000006.png"]
  assert (tmp_path / "w" / "chunk_000").is_dir() and (tmp_path / "w" / "chunk_001").is_dir()
  assert list((tmp_path / "w" / "tensorboard").glob("events.out.tfevents.*"))
  # Resized class (6x6 -> 8x8) trained like the others; chunking does not change a class's result.
  alone = _train(tmp_path, "alone", fns, {4: data[4]})
  assert_trees_close(alone.states[4], result.states[4], atol=1e-6)
  # A finished run resumes to the same result without training (and regenerates the same images).
  again = _train(tmp_path, "w", fns, data, num_samples={1: 5, 4: 0, 6: 2}, cfg={"chunk_size": 2})
  np.testing.assert_array_equal(again.generated[1], result.generated[1])


def test_resume_equals_uninterrupted_training(tmp_path):
  fns = tiny()
  data = {0: noisy_images(6, 0), 3: noisy_images(4, 1)}
  full = _train(tmp_path, "full", fns, data, cfg={"steps": 6})
  # An interrupted run: killed after the checkpoint at step 3 (the config said 3 steps), resumed.
  _train(tmp_path, "cut", fns, data, cfg={"steps": 3})
  resumed = _train(tmp_path, "cut", fns, data, cfg={"steps": 6})
  for k in data:
    assert_trees_close(resumed.states[k], full.states[k], atol=0)
  assert [h["step"] for h in resumed.history[0]] == [4, 5, 6]
  # Checkpoints of a different selection are refused, not mixed.
  with pytest.raises(UserError, match="different run"):
    _train(tmp_path, "cut", fns, {0: data[0], 3: noisy_images(4, 9)}, cfg={"steps": 6})


def test_progress_reports_every_class_losses(tmp_path, capsys):
  data = {2: noisy_images(5, 1), 7: noisy_images(4, 2)}
  result = _train(tmp_path, "w", tiny(), data, progress=True)
  out = capsys.readouterr()
  lines = [l for l in (out.out + out.err).splitlines() if l.startswith("GAN step")]
  assert [l.split(":")[0] for l in lines] == ["GAN step 3/6", "GAN step 6/6"]  # sample_every=3
  last = result.history[7][-1]
  assert f"class 7 D {last['d_loss']:.3f} G {last['g_loss']:.3f}" in lines[-1]
  assert lines[-1].count("class ") == 2


def test_nan_in_one_class_is_restored_and_training_continues(tmp_path):
  data = {0: noisy_images(6, 0), 1: class_images(6, 255)}  # class 1 is all white -> poisoned
  clean = _train(tmp_path, "clean", tiny(), data, cfg={"steps": 8, "log_every": 2,
                                                                "checkpoint_every": 4})
  with pytest.warns(RuntimeWarning, match=r"class\(es\) \[1\].*restored the checkpoint of step 4"):
    result = _train(tmp_path, "nan", tiny_gan_fns(poison_step=5, poison_prob=0.8), data,
                    cfg={"steps": 8, "log_every": 2, "checkpoint_every": 4})
  assert result.nan_restarts[1] == 1 and result.nan_restarts[0] == 0
  assert all(np.isfinite(h["d_loss"]) for h in result.history[1])
  jax.tree.map(lambda x: np.testing.assert_array_equal(np.isfinite(x), True), result.states[1])
  # The healthy class replayed the same steps: its result is the same as without any NaN.
  assert_trees_close(result.states[0], clean.states[0], atol=1e-6)
  # The poisoned class continued on a different random stream.
  assert not np.allclose(result.states[1]["g"]["w"], clean.states[1]["g"]["w"])


def test_repeated_nan_stops_with_a_clear_error(tmp_path):
  data = {0: noisy_images(6, 0), 1: class_images(6, 255)}
  with pytest.warns(RuntimeWarning):
    with pytest.raises(NonFiniteLossError, match=r"class\(es\) \[1\].*after 2 restorations"):
      _train(tmp_path, "nan", tiny_gan_fns(poison_step=2, poison_prob=1.0), data,
             cfg={"steps": 8, "log_every": 2, "checkpoint_every": 4}, max_nan_restarts=2)


def test_per_class_strategy_full_loop_matches_map(tmp_path):
  """"per_class" (each class's state in buffers of its own, stacked only into checkpoints) gives
  the one-program map's results through the whole loop: NaN restoration from a checkpoint, the
  refolded stream, resuming a checkpoint that the other strategy wrote, generated images."""
  one = mesh_lib.class_mesh(jax.devices()[:1])
  data = {0: noisy_images(6, 0), 1: class_images(6, 255), 3: noisy_images(4, 5)}
  fns = tiny_gan_fns(poison_step=5, poison_prob=0.8)  # class 1 (all white) goes NaN at step 5
  cfg = {"steps": 8, "log_every": 2, "checkpoint_every": 4}
  runs = {}
  for strategy in ("map", "per_class"):
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[1\].*restored the checkpoint of step 4"):
      runs[strategy] = _train(tmp_path, strategy, fns, data, cfg=dict(cfg, ensemble=strategy),
                              mesh=one, num_samples=3)
  pc, mp = runs["per_class"], runs["map"]
  assert pc.strategy == "per_class" and mp.strategy == "map"
  assert pc.nan_restarts == mp.nan_restarts == {0: 0, 1: 1, 3: 0}
  for k in data:
    assert [h["step"] for h in pc.history[k]] == [h["step"] for h in mp.history[k]]
    np.testing.assert_allclose([h["d_loss"] for h in pc.history[k]],
                               [h["d_loss"] for h in mp.history[k]], atol=1e-5)
    assert_trees_close(pc.states[k], mp.states[k], atol=1e-5)
    # uint8 images of float samples equal to 1e-5: a rounding may differ by one level.
    assert np.abs(pc.generated[k].astype(int) - mp.generated[k].astype(int)).max() <= 1
  # A checkpoint the map program wrote, resumed and continued class by class: as if uninterrupted.
  longer = _train(tmp_path, "map", fns, data, cfg=dict(cfg, steps=10, ensemble="per_class"),
                  mesh=one)
  fresh = _train(tmp_path, "fresh", tiny(), data, cfg=dict(cfg, steps=10, ensemble="map"),
                 mesh=one)
  assert_trees_close(longer.states[0], fresh.states[0], atol=1e-5)
  assert_trees_close(longer.states[3], fresh.states[3], atol=1e-5)


@pytest.mark.parametrize("devices", [1, 4])
def test_states_finite_sees_a_nan_in_the_state_alone(devices):
  # The step flags only its losses; the host's check also reads every class's state, in either
  # layout (a NaN in a GAN's state persists, so the check point finds it).
  mesh = mesh_lib.class_mesh(jax.devices()[:devices])
  ens = chunks.init_ensemble(tiny(), 0, [0, 1, 2, 3], mesh)
  assert process.fetch_sharded(program.states_finite(ens)).tolist() == [True] * 4
  ema_b = ens["gan"]["ema"]["b"].at[2, 0].set(jnp.inf)
  bad = dict(ens, gan=dict(ens["gan"], ema=dict(ens["gan"]["ema"], b=ema_b)))
  assert process.fetch_sharded(program.states_finite(bad)).tolist() == [True, True, False, True]
  flagged = dict(ens, ok=ens["ok"].at[0].set(False))
  assert process.fetch_sharded(program.states_finite(flagged)).tolist() == [False, True, True, True]
  if devices == 1:
    assert process.fetch_sharded(program.states_finite(program.per_class_layout(bad))).tolist() == [
        True, True, False, True]


@pytest.mark.perf
def test_per_class_state_check_compiles_one_program_for_any_number_of_classes(caplog):
  """Protects the per_class NaN check's compile time, which grew with K (one program over the
  list of K states compiled in 4 s for K = 2 and 35 s for K = 5): after K = 2 no other K compiles
  the program that reads a state (counted in jax's compile log)."""
  states = program.per_class_layout(chunks.init_ensemble(tiny(), 0, [0, 1], mesh_lib.class_mesh(
      jax.devices()[:1])))["gan"]
  check = program._finite_states(True)  # cached: other tests may have compiled it for other states
  for k in (2, 3, 5):
    ok = jnp.ones(k, bool).at[1].set(False)
    gan = [states[i % 2] for i in range(k)]
    last = gan[-1]
    gan[-1] = dict(last, ema=dict(last["ema"], b=last["ema"]["b"].at[0].set(jnp.nan)))
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
      assert check(ok, gan).tolist() == [i not in (1, k - 1) for i in range(k)]
    if k > 2:
      assert "Compiling jit(all_finite)" not in caplog.text, k


@pytest.mark.perf
def test_layout_conversions_are_exact_and_one_small_program_for_any_number_of_classes(caplog):
  # Programs over all K classes at once grew with K (7.7 s to compile at K = 10, smoke config).
  one = jax.devices()[:1]
  pick, put, repeat = program._pick_class, program._put_class, program._repeat_class
  sizes = {}
  for k in (2, 5):
    ens = chunks.init_ensemble(tiny(), 0, list(range(k)), mesh_lib.class_mesh(one))
    stacked = jax.tree.map(np.asarray, ens["gan"])
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
      per_class = program.per_class_layout(ens)
      back = program.stacked_layout(per_class)
    # Whatever the conversions compiled (nothing, when cached) is one of the per-class programs.
    compiled = set(re.findall(r"Compiling jit\(([^)]*)\)", caplog.text))
    assert compiled <= {"_pick_class", "_put_class", "_repeat_class"}, compiled
    assert len(per_class["gan"]) == k
    for p in range(k):  # each class's own buffers, bit for bit
      assert_trees_close(per_class["gan"][p], jax.tree.map(lambda x, p=p: x[p], stacked), atol=0)
    assert_trees_close(back["gan"], stacked, atol=0)
    assert program.stacked_layout(back) is back and program.per_class_layout(per_class) is per_class
    state, position = per_class["gan"][0], jnp.int32(0)
    sizes[k] = [len(f.lower(*args).as_text().splitlines())
                for f, args in ((pick, (back["gan"], position)), (put, (back["gan"], state, position)),
                                (repeat, (state, k)))]
  assert sizes[5] == sizes[2]  # the same program text for K = 2 and 5, only the shapes differ


def test_per_class_strategy_wants_one_device():
  mesh = mesh_lib.class_mesh(jax.devices()[:2])
  with pytest.raises(UserError, match="per_class runs the classes on one device.*has 2"):
    program.make_ensemble_step(tiny(), batch_size=4, strategy="per_class", mesh=mesh)


# ------------------------------------------------------------------------------------------------
# Several processes (launch/local.sh): the same results as one process with as many devices.
# ------------------------------------------------------------------------------------------------
def train_multiprocess_case(workdir):
  """3 classes on 4 devices (one padded copy); class 1 is poisoned, so a NaN restore happens."""
  data = {0: noisy_images(6, 0), 1: class_images(6, 255), 5: noisy_images(9, 5)}
  return ensemble.train_class_gans(
      data, gan_config(steps=8, log_every=2, checkpoint_every=4, sample_every=4), workdir, seed=3,
      step_fns=tiny_gan_fns(poison_step=5, poison_prob=0.8), num_samples=3, keep_states=True,
      progress=False)


def comparable(result):
  return {"states": result.states, "generated": result.generated, "history": result.history,
          "nan_restarts": result.nan_restarts}


def test_two_processes_train_like_one_process(tmp_path, free_port):
  """Two local JAX processes, 2 CPU devices each, against this process's 4 devices."""
  assert jax.device_count() == 4
  runs = run_processes("gan_multiprocess_worker.py", free_port, tmp_path / "multi", timeout=300)
  assert all(r.returncode == 0 for r in runs), [r.stdout for r in runs]
  multi = []
  for i in range(2):
    with open(tmp_path / "multi" / f"result_{i}.pkl", "rb") as fh:
      multi.append(pickle.load(fh))
  with pytest.warns(RuntimeWarning, match="NaN/inf"):
    single = comparable(train_multiprocess_case(str(tmp_path / "single")))

  assert single["nan_restarts"][1] >= 1  # the restore path ran
  for m in multi:  # every process returns the whole result, equal to the one-process run
    assert m["nan_restarts"] == single["nan_restarts"] and m["history"] == single["history"]
    assert sorted(m["generated"]) == [0, 1, 5]
    for k in single["generated"]:
      np.testing.assert_array_equal(m["generated"][k], single["generated"][k])
    assert_trees_close(m["states"], single["states"], atol=1e-6)
  # Only process 0 wrote files: one TensorBoard log, and the same grids as one process writes.
  run = tmp_path / "multi" / "run"
  assert len(list((run / "tensorboard").glob("events.*"))) == 1
  grids = sorted(str(p.relative_to(run)) for p in run.glob("samples/*/*.png"))
  assert grids == sorted(str(p.relative_to(tmp_path / "single"))
                         for p in (tmp_path / "single").glob("samples/*/*.png"))
  assert "samples/class_0005/step_0000008.png" in grids


# ------------------------------------------------------------------------------------------------
# The real FastGAN (ngf = ndf = 8, 32x32) on digits: compiles take most of this module's time
# (half a minute to a minute per FastGAN step program on 2 cores), so the real model runs the
# default strategy of one CPU device ("per_class") only: its single-class program compiles in
# about half the time of "map"'s loop over classes (119 s for this module's fixture with "map").
# The other strategies' equivalence is checked on the stand-in model above, a vmapped FastGAN
# step against separate steps in tests/test_fastgan.py, and "map" on the real model runs in the
# several-device pipeline runs of tests/test_multiprocess_pipeline.py.
# ------------------------------------------------------------------------------------------------
def fastgan_config():
  return gan_config(resolution=32, batch_size=4, ngf=8, ndf=8, nz=32, ema_decay=0.9,
                    ensemble="per_class", steps=8, log_every=2, sample_every=4,
                    checkpoint_every=4)


def digits_by_class():
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  digits = load_digits()
  out = {}
  for k, n in ((0, 20), (1, 12)):  # classes of different sizes
    x = digits.images[digits.target == k][:n]
    out[k] = np.repeat((x * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
  return out


@pytest.fixture(scope="module")
def fastgan_equivalence():
  cfg = fastgan_config()
  # The digits are grey: the generator train_class_gans builds for them is the grey one.
  fns = program.default_gan_fns(cfg, grey_data=True)
  data = {k: class_data.prepare_class_images(x, 32) for k, x in digits_by_class().items()}
  classes, images = list(data), list(data.values())
  mesh = mesh_lib.class_mesh(jax.devices()[:1])
  ens, _ = run_ensemble(fns, 0, classes, images, 2, cfg.batch_size, cfg.ensemble, mesh)
  # Both classes padded to one capacity, so their separate trainings share one compiled program:
  # a class's batches do not depend on the capacity (class_data.batch_indices).
  padded, counts = class_data.stack_class_images(images)
  separate = [separate_training(fns, 0, k, padded[p], 2, cfg.batch_size, count=counts[p])
              for p, k in enumerate(classes)]
  return classes, ens, separate


@pytest.mark.slow
def test_one_program_equals_separate_trainings_fastgan(fastgan_equivalence):
  classes, ens, separate = fastgan_equivalence
  # Bit for bit: "per_class" runs the same single-class step as a separate training, with the
  # class's images picked by position (under "map", XLA's other conv kernels inside the loop body
  # flipped the sign of near-zero gradients, and Adam moved those parameters by up to 2 * lr).
  atol = 0.0
  for p, k in enumerate(classes):
    assert_trees_close(program.unstack_class(ens, p).g_params, separate[p].g_params, atol=atol)
    assert_trees_close(program.unstack_class(ens, p).d_params, separate[p].d_params, atol=atol)
    assert_trees_close(program.unstack_class(ens, p).ema_params, separate[p].ema_params, atol=atol)


@pytest.mark.slow
def test_fastgan_short_training_on_digits(tmp_path, fastgan_equivalence):
  del fastgan_equivalence  # compiled the single-class program this run reuses
  cfg = fastgan_config()
  result = ensemble.train_class_gans(digits_by_class(), cfg, str(tmp_path), seed=0,
                                     num_samples=5, mesh=mesh_lib.class_mesh(jax.devices()[:1]),
                                     keep_states=True, progress=False)
  for k in (0, 1):
    d_losses = [h["d_loss"] for h in result.history[k]]
    assert len(d_losses) == 4 and all(np.isfinite(d_losses))
    assert max(d_losses) - min(d_losses) > 1e-3  # the discriminator is learning
    grids = tmp_path / "samples" / f"class_{k:04d}"
    assert (grids / "step_0000004.png").is_file() and (grids / "step_0000008.png").is_file()
    assert result.generated[k].shape == (5, 32, 32, 3) and result.generated[k].dtype == np.uint8
    # Grey digits make grey images (gan.colour = "auto"): every pixel's channels are equal.
    assert class_data.is_grey(digits_by_class()[k]) and class_data.is_grey(result.generated[k])
    # The trained EMA generator's samples differ from the untrained one's (same noise). Relative:
    # the untrained outputs are tiny (std ~1e-3), so 8 steps barely move them in uint8 levels.
    fns = program.default_gan_fns(cfg, grey_data=True)
    key = jax.random.PRNGKey(5)
    sample = program.jit_once(fns.sample, (2,))
    before = np.asarray(sample(program.jit_once(fns.init)(chunks.class_keys(0, k)[0]), key, 16))
    after = np.asarray(sample(result.states[k], key, 16))
    assert np.linalg.norm(after - before) > 0.05 * np.linalg.norm(before)
  out = generate.write_generated(tmp_path / "generated", result.generated, source_step=result.steps)
  images, labels = generate.load_generated(out)
  assert images.shape == (10, 32, 32, 3) and labels.tolist() == [0] * 5 + [1] * 5
