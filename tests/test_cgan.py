"""The class-conditional FastGAN (gan.conditional): labels reach G and D, one-sided label smoothing
of the hinge loss, class-balanced batches, validation; then the pipeline with it at its smallest
(`mdjax.pipeline.run`, smoke config: ngf = ndf = 8, 32x32, nz 32, batch 4, two weak digit
classes), whose GAN is trained again, stopped and resumed, to check steps, per-class generation
and exact resume."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdjax import config as config_lib
from mdjax.errors import ConfigError, UserError
from mdjax.gan import conditional, fastgan, losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_conditional_generator_and_projection_depend_on_the_label():
  gen, disc = fastgan.build(32, 8, 8, num_classes=3)
  z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32)), jnp.float32)
  labels_a, labels_b = jnp.array([0, 0]), jnp.array([1, 2])
  img = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  small = fastgan.downscale(img, 16)

  @jax.jit
  def outputs(key):
    kg, kd = jax.random.split(key)
    g_vars = fastgan.init_variables(gen, kg, z, train=False, labels=labels_a)
    d_vars = fastgan.init_variables(disc, kd, img, small, train=False, labels=labels_a)
    sample = lambda y: gen.apply(g_vars, z, train=False, labels=y,  # noqa: E731
                                 rngs={"noise": jax.random.key(3)})[0]
    logits = lambda y: disc.apply(d_vars, img, small, train=False, labels=y)  # noqa: E731
    pooled_proj = (d_vars["params"]["class_embedding"][labels_b]
                   - d_vars["params"]["class_embedding"][labels_a])
    return sample(labels_a), sample(labels_b), logits(labels_a), logits(labels_b), pooled_proj

  g_a, g_b, d_a, d_b, _ = jax.device_get(outputs(jax.random.key(0)))
  # G: same z, different labels -> different images (at init every output is near 0, so relative
  # to their size).
  assert np.abs(g_a - g_b).mean() > 0.1 * np.abs(g_a).mean() > 0
  # D: the projection term is the only label path: a per-image shift, the same on all 50 logits.
  shift = d_b - d_a
  assert d_a.shape == (2, 50) and np.all(np.abs(shift[:, 0]) > 1e-6)
  np.testing.assert_allclose(shift, np.repeat(shift[:, :1], 50, axis=1), atol=1e-5)
  # The per-class modules keep their unconditional parameter trees.
  plain_g, plain_d = fastgan.build(32, 8, 8)
  tree = jax.eval_shape(lambda: fastgan.init_variables(plain_d, jax.random.key(0), img, small,
                                                       train=False))
  assert "class_embedding" not in tree["params"]
  assert plain_g.num_classes == 0


def test_projection_tells_labels_apart_from_the_start():
  """At init, D's label term moves an image's logit about as much as changing the image does.

  At the digits config's width (ndf 16, 5 classes, 16 random images): the spread of a logit over
  the 5 labels is 0.80 of the spread of the mean logit over images with the class embedding at
  N(0, 0.1), and 0.16 at the conv init's N(0, 0.02). At 0.02 a 200-step conditional GAN's D stayed
  in effect unconditional and G drew the wrong digit for some labels (fastgan's docstring)."""
  _, disc = fastgan.build(32, 16, 16, num_classes=5)
  img = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (16, 32, 32, 3)), jnp.float32)
  small = fastgan.downscale(img, 16)

  @jax.jit
  def logits_per_label(key):
    d_vars = fastgan.init_variables(disc, key, img, small, train=False,
                                    labels=jnp.zeros(16, jnp.int32))
    return jnp.stack([disc.apply(d_vars, img, small, train=False, labels=jnp.full(16, y))
                      for y in range(5)])  # [labels, images, 50]

  logits = np.asarray(logits_per_label(jax.random.key(0)))
  over_labels = logits[:, :, 0].std(axis=0).mean()
  over_images = logits[0].mean(axis=1).std()
  assert over_labels >= 0.5 * over_images, (over_labels, over_images)


def test_one_sided_label_smoothing_of_the_hinge_loss():
  """The real side's margin u ~ U(0.8, 1) is scaled by the smoothing; the fake side is not."""
  logits = jnp.array([[-1.0, 0.5, 0.85, 2.0]])
  key = jax.random.key(7)
  u = np.asarray(losses.random_margin(key, logits.shape))[0]
  # By hand: relu(0.9 u - l) per logit; 2.0 is above every margin, -1 and 0.5 below every one.
  by_hand = ((0.9 * u[0] + 1.0) + (0.9 * u[1] - 0.5) + max(0.9 * u[2] - 0.85, 0.0) + 0.0) / 4
  np.testing.assert_allclose(losses.d_hinge_real(logits, key, 0.9), by_hand, rtol=1e-6)
  # 1.0 is the reference loss, unchanged.
  reference = ((u[0] + 1.0) + (u[1] - 0.5) + max(u[2] - 0.85, 0.0)) / 4
  np.testing.assert_allclose(losses.d_hinge_real(logits, key), reference, rtol=1e-6)
  np.testing.assert_allclose(losses.d_hinge_real(logits, key, 1.0), reference, rtol=1e-6)
  assert 0.8 <= u.min() and u.max() <= 1.0  # the premise of "by hand" above


def test_smoothing_and_conditional_are_validated():
  config = config_lib.base_config()
  assert config.gan.conditional is False and config.gan.real_label_smoothing == 0.9
  config.gan.real_label_smoothing = 0.0
  with pytest.raises(ConfigError, match=r"real_label_smoothing.*\(0, 1\]"):
    config_lib.validate(config)
  config.gan.real_label_smoothing = 0.9
  with config.gan.ignore_type():
    config.gan.conditional = "yes"
  with pytest.raises(ConfigError, match="gan.conditional.*true"):
    config_lib.validate(config)


def test_batches_are_class_balanced_and_stay_in_each_class():
  counts = jnp.array([5, 2, 9], jnp.int32)
  seen = np.zeros(3, int)
  for step in range(6):
    labels, idx = jax.jit(conditional.balanced_batch, static_argnums=(2, 4))(
        jax.random.key(step), counts, 9, jnp.int32(step), 4)
    labels, idx = np.asarray(labels), np.asarray(idx)
    assert np.all(idx < np.asarray(counts)[labels])  # never padding, never another class's slot
    np.add.at(seen, labels, 1)
    for k in range(3):  # a class's images within one batch are distinct (while it has enough)
      mine = idx[labels == k]
      assert len(set(mine)) == min(len(mine), int(counts[k]))
  # Over 3 steps of 4 slots each of 3 classes fills 4 slots: 6 steps -> 8 each.
  assert seen.tolist() == [8, 8, 8]


# The pipeline at its smallest with the conditional GAN: the smoke config, two weak classes, one
# epoch, 4 GAN steps of batch 4. It runs in this process (`mdjax.pipeline.run.run`, what
# `python -m mdjax.main` calls after validating the config), so the resume test below, which trains
# the same GAN on the same images, reuses its compiled programs: one FastGAN step compile (minutes
# on 2 cores) serves both tests, and both run the same program, so their images match bit for bit
# (a separate process with another device count compiles a program that rounds differently, up to
# one grey level).
PIPELINE = {"gan.conditional": True, "mistake.nwpc": 2, "train.epochs": 1, "gan.steps": 4,
            "gan.batch_size": 4, "gan.log_every": 1, "gan.sample_every": 4,
            "gan.checkpoint_every": 2, "stages": "train,validate,gan,generate,finetune,test"}


def pipeline_config():
  import importlib.util
  path = os.path.join(REPO, "configs", "default.py")
  spec = importlib.util.spec_from_file_location("cfg_default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  for key, value in PIPELINE.items():
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
  return config


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  from mdjax.pipeline import run
  workdir = tmp_path_factory.mktemp("conditional") / "run"
  config = pipeline_config()
  config_lib.validate(config)
  return workdir, run.run(config, str(workdir))


def test_conditional_option_runs_the_pipeline(pipeline_run):
  """`gan.conditional=True` through the whole pipeline: the generate stage writes nSamples
  images per weak class, labelled, where the per-class path writes them; the records hold the
  conditional GAN's cost."""
  from mdjax.gan import generate
  workdir, returned = pipeline_run
  results = json.load(open(workdir / "results.json"))
  assert returned["final"] == results["final"]
  gen = json.load(open(workdir / "stages" / "generate.json"))
  weak = results["worst_classes"]
  assert len(weak) == 2
  images, labels = generate.load_generated(workdir / "generated")
  for k in weak:
    wanted = -(-gen["class_sizes"][str(k)] // 2)  # ceil(0.5 x |C|)
    assert results["generated_per_class"][str(k)] == wanted == int(np.sum(labels == k))
    assert 0 <= results["gan_quality"][str(k)]["judge_fraction"] <= 1
  assert set(labels.tolist()) == set(weak) and images.shape[1:] == (32, 32, 3)
  cost = results["gan_cost"]
  assert cost["path"] == "conditional" and cost["models"] == 1 and cost["steps"] == 4
  assert cost["parameters"] == cost["g_parameters"] + cost["d_parameters"] > 0
  assert cost["train_seconds"] > 0
  gan = json.load(open(workdir / "stages" / "gan.json"))
  assert gan["strategy"] == "conditional" and gan["nan_restarts"] == 0
  assert all(np.isfinite(v) for v in gan["final_losses"].values())
  assert (workdir / "gan" / "conditional" / "meta.json").is_file()
  assert set(results["stage_seconds"]) == {"train", "validate", "gan", "generate", "finetune", "test"}


def test_conditional_steps_resume_exactly_and_generate_per_class(pipeline_run, tmp_path):
  """The pipeline's conditional GAN again, on its two weak digit classes, stopped after 2 steps and
  resumed to 4 in another workdir: finite losses at every step, and the same images per class,
  bit for bit, as the uninterrupted run wrote."""
  from mdjax.data import registry
  from mdjax.gan import generate
  from mdjax.pipeline import stages
  workdir, _ = pipeline_run
  config = pipeline_config()
  splits = registry.load_splits(config.data)
  weak = json.load(open(workdir / "results.json"))["worst_classes"]
  images = {k: stages.class_images(splits.train, splits.train.labels, k, 32, config.data.augment)
            for k in weak}
  want = {k: -(-len(images[k]) // 2) for k in weak}
  written, labels = generate.load_generated(workdir / "generated")

  part = tmp_path / "gan"
  half = config.gan.copy_and_resolve_references()
  half.steps = 2
  first = conditional.train_conditional_gan(images, half, str(part), seed=0, progress=False)
  resumed = conditional.train_conditional_gan(images, config.gan, str(part), seed=0,
                                              num_samples=want, progress=False)
  assert [h["step"] for h in first.history + resumed.history] == [1, 2, 3, 4]
  for h in first.history + resumed.history:
    assert all(np.isfinite(h[k]) for k in ("d_loss", "g_loss", "recon_loss", "d_real", "d_fake"))
  assert resumed.class_indices == tuple(sorted(weak)) and resumed.nan_restarts == 0
  for k in weak:
    assert resumed.generated[k].shape == (want[k], 32, 32, 3)
    np.testing.assert_array_equal(resumed.generated[k], written[labels == k])
  assert not np.array_equal(resumed.generated[weak[0]][:4], resumed.generated[weak[1]][:4])
  grids = part / "samples" / f"class_{weak[0]:04d}"
  assert (grids / "step_0000004.png").is_file() and (grids / "real.png").is_file()

  # Other images in that workdir are refused, not mixed in.
  other = {k: v[:5] for k, v in images.items()}
  with pytest.raises(UserError, match="different run"):
    conditional.train_conditional_gan(other, config.gan, str(part), seed=0, progress=False)
