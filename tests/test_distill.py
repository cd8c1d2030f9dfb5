"""GAN distillation (mdjax.gan.distill): the triplet loss, the hard / easy labels, the triplet
term's gradient, the one distilling program over K classes, and the pipeline's distill stage.

Tiny sizes throughout (FastGAN ngf = ndf = 8 at 32x32, batch 4, nz 32; a WRN-10-1 classifier
with an 8-wide head at 16x16): the FastGAN step's compiles take most of this module's time.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mdjax import config as config_lib
from mdjax import models
from mdjax.core import mesh as mesh_lib
from mdjax.gan import chunks, class_data, distill, fastgan, program
from mdjax.gan import step as step_lib

B, RES, NZ, IMAGE_SIZE, NUM_CLASSES = 4, 32, 32, 16, 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Pure pieces: the loss and the labels.
# ------------------------------------------------------------------------------------------------
def test_triplet_loss_hand_computed():
  fake = jnp.array([[0.0, 0.0], [0.0, 0.0]])
  hard = jnp.array([[3.0, 4.0], [1.0, 0.0]])  # distances 5 and 1
  easy = jnp.array([[0.0, 1.0], [0.0, 5.0]])  # distances 1 and 5
  # Row 0: 5 - 1 + 1 = 5; row 1: 1 - 5 + 1 = -3, hinged to 0. Mean 2.5.
  assert float(distill.triplet_loss(fake, hard, easy, 1.0)) == pytest.approx(2.5)
  assert float(distill.triplet_loss(fake[1:], hard[1:], easy[1:], 1.0)) == 0.0
  # At the hinge's edge (1 - 5 + 4 = 0) the term is 0, just past it positive.
  assert float(distill.triplet_loss(fake[1:], hard[1:], easy[1:], 4.0)) == 0.0
  assert float(distill.triplet_loss(fake[1:], hard[1:], easy[1:], 4.5)) == pytest.approx(0.5)
  # Normalised: [2, 0] -> [1, 0]; hard [0, 3] -> [0, 1] at sqrt(2); easy [5, 0] -> [1, 0] at 0.
  got = distill.triplet_loss(jnp.array([[2.0, 0.0]]), jnp.array([[0.0, 3.0]]),
                             jnp.array([[5.0, 0.0]]), 0.2, normalize=True)
  assert float(got) == pytest.approx(np.sqrt(2) + 0.2, abs=1e-6)
  # A fake equal to a real feature vector: finite gradient (safe norms), not NaN.
  grad = jax.grad(lambda f: distill.triplet_loss(f, hard[:1], hard[:1] + 1.0, 1.0))(hard[:1])
  assert np.all(np.isfinite(np.asarray(grad)))


def test_hard_easy_labels_on_hand_made_logits():
  labels = jnp.array([0, 0, 1, 1])
  logits = jnp.log(jnp.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.45, 0.55]]))
  p = np.asarray(distill.true_class_probability(logits, labels))
  np.testing.assert_allclose(p, [0.9, 0.4, 0.7, 0.55], rtol=1e-6)
  assert np.asarray(distill.hard_samples(logits, labels, "misclassified", 0.5)).tolist() == [
      False, True, False, False]
  assert np.asarray(distill.hard_samples(logits, labels, "confidence", 0.6)).tolist() == [
      False, True, False, True]
  with pytest.raises(ValueError, match="hard_rule"):
    distill.hard_samples(logits, labels, "loss", 0.5)

  split = lambda hard, p, f=0.25: [m.tolist() for m in distill.split_hard_easy(  # noqa: E731
      np.array(hard), np.array(p), f)]
  # Enough hard samples: kept as the rule says, the rest easy.
  assert split([0, 1, 0, 0], [0.9, 0.2, 0.8, 0.7]) == [[False, True, False, False],
                                                        [True, False, True, True]]
  # No hard sample (the classifier knows all its training images): the lowest probability is.
  assert split([0, 0, 0, 0], [0.9, 0.95, 0.6, 0.7]) == [[False, False, True, False],
                                                        [True, True, False, True]]
  # min_fraction 0.5 of 4: two hard ones at least.
  assert split([0, 0, 0, 0], [0.9, 0.95, 0.6, 0.7], 0.5)[0] == [False, False, True, True]
  # Every sample hard: the highest probability becomes easy.
  assert split([1, 1, 1], [0.1, 0.3, 0.2]) == [[True, False, True], [False, True, False]]
  # One image: hard and easy at once (its triplet term is the constant margin).
  assert split([0], [0.9]) == [[True], [True]]


@pytest.mark.parametrize("key,value,fragment", [
    ("hard_rule", "loss", "misclassified, confidence"), ("margin", -1.0, ">= 0"),
    ("rounds", 0, ">= 1"), ("min_fraction", 0.75, "(0, 0.5]"), ("hard_threshold", 0.0, "(0, 1]")])
def test_distill_config_errors_name_the_expected_values(key, value, fragment):
  from mdjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  assert config.distill.enabled is False  # off unless asked for
  config_lib.validate(config)
  config_lib.set_key(config, f"distill.{key}", value)
  with pytest.raises(ConfigError, match=f"distill.{key}") as err:
    config_lib.validate(config)
  assert fragment in str(err.value)


# ------------------------------------------------------------------------------------------------
# The triplet term inside the FastGAN step and the one program.
# ------------------------------------------------------------------------------------------------
def gan_config():
  c = config_lib.base_config().gan
  c.resolution, c.ngf, c.ndf, c.nz, c.batch_size = RES, 8, 8, NZ, B
  return c


@functools.lru_cache
def classifier():
  """A tiny classifier (random init: only the plumbing is tested) and its variables."""
  mc = config_lib.base_config().model
  mc.backbone, mc.head, mc.head_width = "wrn10_1", "linear", 8
  model = models.build_classifier(mc, NUM_CLASSES)
  variables = model.init(jax.random.PRNGKey(0),
                         jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False)
  return model, dict(variables)


@functools.lru_cache
def triplet(weight=1.0):
  model, _ = classifier()
  return distill.Triplet(model, IMAGE_SIZE, margin=0.2, weight=weight)


def class_images(seed, n):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (1, RES, RES, 3))
  return np.clip(base + rng.integers(-40, 40, (n, RES, RES, 3)), 0, 255).astype(np.uint8)


def one_class_teacher(labels, capacity):
  """The program's teacher input for one class, without the class axis."""
  _, variables = classifier()
  stacked = distill.Teacher(triplet(), variables, labels).stacked(
      list(labels), capacity, mesh_lib.class_mesh(jax.devices()[:1]))
  return {k: (v if k == "variables" else v[0]) for k, v in stacked.items()}


def test_triplet_gradient_reaches_the_generator_not_the_classifier():
  _, variables = classifier()
  gen, _ = fastgan.build(RES, 8, 8)
  state = jax.jit(step_lib.make_gan_fns(gan_config()).init)(jax.random.PRNGKey(1))
  labels = distill.label_classes(triplet(), variables, {0: class_images(0, 6)},
                                 rule="misclassified", threshold=0.5, min_fraction=0.25)
  assert labels[0].hard.sum() >= 2 and labels[0].easy.any()  # ceil(0.25 x 6) hard at least
  teacher = one_class_teacher(labels, 6)
  z = jax.random.normal(jax.random.PRNGKey(2), (B, NZ))

  @jax.jit
  def value_and_grads(g_params, classifier_variables):
    def loss(g_params, classifier_variables):
      g_term = triplet().g_term_for(dict(teacher, variables=classifier_variables),
                                    jax.random.PRNGKey(3), B)
      (img, _), _ = gen.apply({"params": g_params, "batch_stats": state.g_stats}, z, train=True,
                              rngs={"noise": jax.random.PRNGKey(4)}, mutable=["batch_stats"])
      return g_term(img)[0]
    return jax.value_and_grad(loss, argnums=(0, 1))(g_params, classifier_variables)

  value, (g_grad, c_grad) = value_and_grads(state.g_params, variables)
  assert float(value) > 0
  g_norm = sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(g_grad))
  assert np.isfinite(g_norm) and g_norm > 0  # the term trains G ...
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(c_grad))  # ... never F


class StandIn(NamedTuple):
  init: Any
  step: Any
  sample: Any
  guided_step: Any


@functools.lru_cache
def standin_gan_fns(nz=4, lr=1e-2):
  """A linear G and D with FastGAN's contract, `guided_step` included: the ensemble tests'
  stand-in (tests/test_gan_ensemble.py), cheap to compile; the classifier's features are real."""
  tx = optax.adam(lr, b1=0.5)
  dim = RES * RES * 3

  def gen(g, z):
    return jnp.tanh(z @ g["w"] + g["b"]).reshape(z.shape[0], RES, RES, 3)

  def disc(d, x):
    return x.reshape(x.shape[0], -1) @ d["w"] + d["b"]

  def init(rng):
    kg, kd = jax.random.split(rng)
    g = {"w": 0.1 * jax.random.normal(kg, (nz, dim)), "b": jnp.zeros((dim,))}
    d = {"w": 0.01 * jax.random.normal(kd, (dim,)), "b": jnp.zeros(())}
    return {"g": g, "d": d, "g_opt": tx.init(g), "d_opt": tx.init(d)}

  def guided_step(state, real, rng, g_term):
    z = jax.random.normal(rng, (real.shape[0], nz))
    d_loss, d_grad = jax.value_and_grad(
        lambda d: jnp.mean(jax.nn.relu(1 - disc(d, real)))
        + jnp.mean(jax.nn.relu(1 + disc(d, gen(state["g"], z)))))(state["d"])
    upd, d_opt = tx.update(d_grad, state["d_opt"], state["d"])
    d = optax.apply_updates(state["d"], upd)

    def g_loss_fn(g):
      fake = gen(g, z)
      adversarial = -jnp.mean(disc(d, fake))
      extra, aux = g_term(fake) if g_term is not None else (0.0, {})
      return adversarial + extra, (adversarial, aux)

    (_, (g_loss, aux)), g_grad = jax.value_and_grad(g_loss_fn, has_aux=True)(state["g"])
    upd, g_opt = tx.update(g_grad, state["g_opt"], state["g"])
    g = optax.apply_updates(state["g"], upd)
    return {"g": g, "d": d, "g_opt": g_opt, "d_opt": d_opt}, {"d_loss": d_loss, "g_loss": g_loss,
                                                              **aux}

  def step(state, real, rng):
    return guided_step(state, real, rng, None)

  def sample(state, rng, n):
    return gen(state["g"], jax.random.normal(rng, (n, nz)))

  return StandIn(init, step, sample, guided_step)


def run_program(fns, classes, images, labels, capacity, steps, triplet_=None, strategy="map"):
  mesh = mesh_lib.class_mesh(jax.devices()[:1])
  data, counts = class_data.stack_class_images([images[k] for k in classes], capacity)
  data, counts = jax.device_put((data, counts), mesh_lib.class_sharding(mesh))
  ens = chunks.init_ensemble(fns, 0, classes, mesh)
  if strategy == program.PER_CLASS:
    ens = program.per_class_layout(ens)
  step = program.make_ensemble_step(fns, batch_size=B, strategy=strategy, mesh=mesh,
                                    triplet=triplet_)
  kw = {}
  if triplet_ is not None:
    _, variables = classifier()
    kw["teacher"] = distill.Teacher(triplet_, variables, labels).stacked(classes, capacity, mesh)
  for s in range(steps):
    ens, metrics = step(ens, data, counts, jnp.int32(s), **kw)
  return ens, metrics


@pytest.mark.parametrize("strategy", ["map", "per_class"])
def test_one_distilling_program_for_two_classes_equals_separate_runs(strategy):
  fns = standin_gan_fns()
  _, variables = classifier()
  classes, capacity, steps = [0, 2], 6, 2
  images = {0: class_images(0, 6), 2: class_images(1, 4)}  # classes of different sizes
  labels = distill.label_classes(triplet(), variables, images, rule="confidence", threshold=0.4,
                                 min_fraction=0.25)
  ens, metrics = run_program(fns, classes, images, labels, capacity, steps, triplet(), strategy)
  triplet_losses = np.asarray(metrics["triplet_loss"])
  assert triplet_losses.shape == (2,) and np.all(np.isfinite(triplet_losses))
  assert np.all(triplet_losses > 0)

  one = jax.jit(functools.partial(program.class_step, fns, batch_size=B, triplet=triplet()))
  for p, k in enumerate(classes):
    init_key, rng = chunks.class_keys(0, k)
    state = jax.jit(fns.init)(init_key)
    teacher_k = one_class_teacher({k: labels[k]}, capacity)
    for s in range(steps):
      state, _ = one(state, rng, jnp.asarray(images[k]), jnp.int32(len(images[k])), jnp.int32(s),
                     teacher=teacher_k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                         rtol=0),
                 program.unstack_class(ens, p), state)
  assert not np.allclose(program.unstack_class(ens, 0)["g"]["w"],
                         program.unstack_class(ens, 1)["g"]["w"])

  # Without the triplet term (distill off): after one step D is the same (its update comes before
  # G's and never sees the term), G is not.
  plain, _ = run_program(fns, classes, images, labels, capacity, 1)
  guided, _ = run_program(fns, classes, images, labels, capacity, 1, triplet())
  np.testing.assert_array_equal(plain["gan"]["d"]["w"], guided["gan"]["d"]["w"])
  assert not np.allclose(plain["gan"]["g"]["w"], guided["gan"]["g"]["w"])


# ------------------------------------------------------------------------------------------------
# The pipeline: `python -m mdjax.main ... --config.distill.enabled=true`, at minimal size.
# ------------------------------------------------------------------------------------------------
TINY_RUN = ["--config=configs/default.py:smoke", "--config.distill.enabled=true",
            "--config.data.max_train_per_class=10", "--config.train.epochs=1",
            "--config.mistake.nwpc=2", "--config.gan.steps=2", "--config.gan.sample_every=2",
            "--config.gan.checkpoint_every=2", "--config.distill.round_gan_steps=1"]


def tiny_config():
  spec = importlib.util.spec_from_file_location("cfg_default", os.path.join(REPO, "configs",
                                                                            "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  with config.unlocked():
    for flag in TINY_RUN[1:]:
      key, value = flag[len("--config."):].split("=")
      config_lib.set_key(config, key, config_lib._parse_value(value))  # pylint: disable=protected-access
  config_lib.validate(config)
  return config


def check_distill_results(workdir) -> dict:
  with open(workdir / "results.json") as fh:
    r = json.load(fh)
  assert 0 <= r["final"]["test_accuracy"] <= 1 and len(r["worst_classes"]) == 2
  rounds = r["distill"]["rounds"]
  assert [x["round"] for x in rounds] == [0, 1] and [x["gan_steps"] for x in rounds] == [2, 3]
  for x in rounds:
    for k in r["worst_classes"]:
      labels = x["labels"][str(k)]
      assert labels["hard"] >= 1 and labels["easy"] >= 1 and labels["images"] == 10
      assert x["generated_per_class"][str(k)] == 5  # ceil(0.5 x 10)
      assert np.isfinite(x["final_losses"][str(k)]["triplet_loss"])
      # Each round's images are judged as the generate stage judges its own.
      assert 0 <= x["quality"][str(k)]["judge_fraction"] <= 1
      assert x["quality"][str(k)]["diversity_ratio"] >= 0
  # results.json: the last round's verdicts (those images fine-tuned the final classifier).
  assert r["gan_quality"] == rounds[-1]["quality"] and r["judge"] == rounds[-1]["judge"]
  assert r["judge"]["kind"] == "pixels" and sorted(map(int, r["gan_quality"])) == r["worst_classes"]
  for stage in ("gan", "generate", "finetune"):
    with open(workdir / "stages" / f"{stage}.json") as fh:
      assert "distill" in json.load(fh)["skipped"]
  assert (workdir / "distill" / "round_1" / "generated" / "COMPLETE").is_file()
  assert (workdir / "distill" / "round_1" / "checkpoints").is_dir()
  return r


def forget_last_round(workdir):
  """What a run killed in the last round's evaluation leaves: its record and later ones absent."""
  for done in ("distill/round_1/round.json", "stages/distill.json", "stages/test.json",
               "results.json"):
    os.remove(workdir / done)


def test_distill_stage_in_process_with_a_standin_gan(tmp_path, monkeypatch):
  """The whole pipeline with distillation in this process, FastGAN replaced by the stand-in (its
  compiles would take minutes here; the e2e test below runs the real one): the stages, the
  rounds' records, results.json, and a resumed last round that reaches the same result."""
  from mdjax.pipeline import run as run_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(program, "default_gan_fns", lambda gan_config, **_: standin_gan_fns())
  workdir = tmp_path / "run"
  run_lib.run(tiny_config(), str(workdir))
  r = check_distill_results(workdir)
  forget_last_round(workdir)
  run_lib.run(tiny_config(), str(workdir))
  resumed = check_distill_results(workdir)
  assert resumed["final"] == r["final"]
  assert resumed["distill"]["rounds"][1]["labels"] == r["distill"]["rounds"][1]["labels"]


def run_main(workdir, *flags):
  env = dict(os.environ)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return subprocess.run([sys.executable, "-m", "mdjax.main", *TINY_RUN, f"--workdir={workdir}",
                         *flags], cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)


@pytest.mark.e2e
def test_distill_with_fastgan_in_the_pipeline_writes_results_and_resumes(tmp_path):
  """`python -m mdjax.main` with the real FastGAN: 7.3 min on the shared 2-core machine (two runs;
  the distilling program's compile dominates), hence opt-in (MDJAX_E2E=1)."""
  workdir = tmp_path / "run"
  result = run_main(workdir)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  r = check_distill_results(workdir)
  assert "mdjax: [distill] done" in result.stdout
  forget_last_round(workdir)
  again = run_main(workdir)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  resumed = check_distill_results(workdir)
  assert resumed["final"]["test_accuracy"] == r["final"]["test_accuracy"]
  assert resumed["distill"]["rounds"][1]["labels"] == r["distill"]["rounds"][1]["labels"]
