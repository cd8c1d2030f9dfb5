"""Mixup, CutMix, HardMix, soft-target cross-entropy, PGD and RandAugment against small cases
worked out by hand, then each option in a few steps of the real training loop."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from mdjax import config as config_lib
from mdjax import optim
from mdjax.core import mesh as mesh_lib
from mdjax.data import pipeline, randaugment
from mdjax.data.sources import ArraySource, Concat
from mdjax.train import adversarial, mixing, steps
from mdjax.train import classifier as clf

# ------------------------------------------------------------------------------------------------
# Mixup and the soft-target loss


def test_mixup_targets_are_the_same_convex_combination_as_the_images():
  b, c, size = 6, 6, 4
  labels = np.arange(b) % c
  targets = jax.nn.one_hot(labels, c)
  images = np.random.default_rng(0).random((b, size, size, 3)).astype(np.float32)
  mixed, soft = mixing.mixup(jax.random.PRNGKey(3), jnp.asarray(images), targets, alpha=1.0)
  mixed, soft = np.asarray(mixed), np.asarray(soft)
  np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
  # Every row is lam * onehot(own) + (1 - lam) * onehot(partner), with one lam for the batch and
  # the partners a permutation; the images are mixed with the same lam and partner.
  lams, partners = [], []
  for i in range(b):
    lam = soft[i, labels[i]]
    if lam > 1 - 1e-6:  # a fixed point of the permutation: mixed with itself
      partners.append(i)
      np.testing.assert_allclose(mixed[i], images[i], atol=1e-6)
      continue
    j = int(np.argmax(np.where(np.arange(c) == labels[i], -1, soft[i])))
    partners.append(j)
    lams.append(lam)
    expected = lam * np.eye(c)[labels[i]] + (1 - lam) * np.eye(c)[labels[j]]
    np.testing.assert_allclose(soft[i], expected, atol=1e-6)
    np.testing.assert_allclose(mixed[i], lam * images[i] + (1 - lam) * images[j], atol=1e-6)
  assert np.ptp(lams) < 1e-6 and 0 < lams[0] < 1
  assert sorted(partners) == list(range(b)) and partners != list(range(b))


def test_soft_cross_entropy_and_label_smoothing_by_hand():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]], np.float32)
  targets = np.array([[0.7, 0.3, 0.0], [0.0, 0.25, 0.75]], np.float32)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  hand = -(targets * log_p).sum(1).mean()
  assert float(mixing.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) == \
      pytest.approx(hand, rel=1e-6)
  s = 0.1  # optax.smooth_labels: (1 - s) y + s / C
  smoothed = (1 - s) * targets + s / 3
  hand_smooth = -(smoothed * log_p).sum(1).mean()
  assert float(mixing.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), s)) == \
      pytest.approx(hand_smooth, rel=1e-6)
  np.testing.assert_allclose(optax.smooth_labels(targets, s), smoothed, atol=1e-7)
  # The train step's loss: one-hot targets give the same value as class indices, smoothed alike.
  labels = jnp.array([0, 2])
  assert float(steps.cross_entropy(jnp.asarray(logits), jax.nn.one_hot(labels, 3), s)) == \
      pytest.approx(float(steps.cross_entropy(jnp.asarray(logits), labels, s)), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# CutMix and HardMix


def _constant_images(b, size):
  """Example i is the constant image (i + 1) / 100, so a pasted pixel names its source."""
  return jnp.broadcast_to((jnp.arange(b, dtype=jnp.float32) + 1)[:, None, None, None] / 100,
                          (b, size, size, 3))


def _sources(mixed):
  return np.rint(np.asarray(mixed)[..., 0] * 100).astype(int) - 1  # [B, H, W]: source example


def test_cutmix_label_weight_is_the_pasted_box_area_including_clipped_boxes():
  b, size = 8, 8
  images, targets = _constant_images(b, size), jax.nn.one_hot(jnp.arange(b), b)
  cutmix = jax.jit(mixing.cutmix, static_argnums=3)
  clipped = 0
  for seed in range(16):
    mixed, soft = cutmix(jax.random.PRNGKey(seed), images, targets, 1.0)
    src = _sources(mixed)
    soft = np.asarray(soft)
    # The box actually pasted: the bounding box of the pixels changed anywhere in the batch.
    rows, cols = np.nonzero((src != np.arange(b)[:, None, None]).any(0))
    top, left, bottom, right = ((rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
                                if len(rows) else (0, 0, 0, 0))
    clipped += bool(min(top, left) == 0 or max(bottom, right) == size) and bottom > top
    area = (bottom - top) * (right - left) / size ** 2
    for i in range(b):
      changed = src[i] != i
      j = int(np.argmax(np.bincount(src[i].ravel(), minlength=b) * (np.arange(b) != i))) \
          if changed.any() else i
      if j == i:  # the permutation's fixed point: pasted onto itself
        np.testing.assert_allclose(soft[i], np.eye(b)[i], atol=1e-6)
        continue
      # The changed pixels are exactly the box, all from one partner ...
      expected = np.zeros((size, size), bool)
      expected[top:bottom, left:right] = True
      np.testing.assert_array_equal(changed, expected)
      assert set(src[i][changed].tolist()) <= {j}
      # ... and the label weights are the areas: 1 - box / image for i, box / image for j.
      assert soft[i, i] == pytest.approx(1 - area, abs=1e-6)
      assert soft[i, j] == pytest.approx(area, abs=1e-6)
      assert soft[i].sum() == pytest.approx(1.0, abs=1e-6)
  assert clipped >= 3  # the border cases were exercised


def test_hard_set_is_the_top_fraction_by_misclassification_rate():
  n = 20
  mistakes = np.ones(n, np.int32)  # rate 0.1 ...
  visits = np.full(n, 10, np.int32)
  mistakes[[15, 3, 5]] = [10, 9, 8]  # ... except 15 (1.0), 3 (0.9) and 5 (0.8)
  mistakes[7] = 0  # never misclassified: never hard
  counts = {"mistakes": jnp.asarray(mistakes), "visits": jnp.asarray(visits)}
  assert np.flatnonzero(mixing.hard_set(counts, 0.1)).tolist() == [3, 15]  # k = 2
  assert np.flatnonzero(mixing.hard_set(counts, 0.15)).tolist() == [3, 5, 15]  # k = 3
  # Ties at the threshold all count; unvisited or never-wrong examples never do.
  tied = {"mistakes": jnp.array([1, 1, 1, 0]), "visits": jnp.array([1, 1, 1, 0])}
  assert mixing.hard_set(tied, 0.25).tolist() == [True, True, True, False]
  updated = mixing.update_counts(counts, jnp.array([7, 8]), jnp.array([True, False]))
  assert int(updated["mistakes"][7]) == 1 and int(updated["mistakes"][8]) == 1
  assert int(updated["visits"][7]) == 11 and int(updated["visits"][8]) == 11


@pytest.mark.parametrize("hard_members, may_source", [
    ([3], {3: set(), "other": {3}}),  # one hard member: everyone else takes from it; it stays put
    ([3, 5], {3: {5}, 5: {3}, "other": {3, 5}}),
])
def test_hardmix_takes_patches_only_from_the_hard_members_of_the_batch(hard_members, may_source):
  b, size = 8, 8
  images, targets = _constant_images(b, size), jax.nn.one_hot(jnp.arange(b), b)
  hard = jnp.zeros(b, bool).at[jnp.array(hard_members)].set(True)
  hardmix = jax.jit(mixing.hardmix, static_argnums=4)
  seen = set()
  for seed in range(16):
    mixed, soft = hardmix(jax.random.PRNGKey(seed), images, targets, hard, 1.0)
    src, soft = _sources(mixed), np.asarray(soft)
    for i in range(b):
      allowed = may_source.get(i, may_source["other"])
      sources = set(src[i].ravel().tolist()) - {i}
      assert sources <= allowed, (seed, i, sources)
      seen |= sources
      if not allowed:
        np.testing.assert_allclose(soft[i], np.eye(b)[i], atol=1e-6)  # unmixed
      else:  # the label weight of the source is the share of its pixels
        for j in sources:
          assert soft[i, j] == pytest.approx(np.mean(src[i] == j), abs=1e-6)
        np.testing.assert_allclose(soft[i].sum(), 1.0, atol=1e-6)
  assert seen == set(hard_members)
  # No hard member in the batch: nothing is mixed.
  mixed, soft = hardmix(jax.random.PRNGKey(0), images, targets, jnp.zeros(b, bool), 1.0)
  np.testing.assert_array_equal(np.asarray(mixed), np.asarray(images))
  np.testing.assert_array_equal(np.asarray(soft), np.asarray(targets))


# ------------------------------------------------------------------------------------------------
# PGD


def test_pgd_stays_in_the_eps_ball_and_in_range_and_raises_the_loss():
  rng = np.random.default_rng(0)
  b, size, c = 6, 4, 3
  images = rng.random((b, size, size, 3)).astype(np.float32)
  images[0] = 0.0
  images[1] = 1.0  # the [0, 1] clip matters at both ends
  weights = jnp.asarray(rng.normal(size=(size * size * 3, c)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, c, b))

  def loss(x):
    return steps.cross_entropy(x.reshape(b, -1) @ weights, labels)

  eps, n_steps = 0.03, 4
  step_size = adversarial.pgd_step_size(eps, n_steps)
  assert step_size == pytest.approx(2.5 * eps / n_steps)
  assert adversarial.pgd_step_size(eps, n_steps, 0.01) == 0.01
  adv = jax.jit(adversarial.pgd_attack, static_argnums=(0, 3, 4, 5))(
      loss, jax.random.PRNGKey(1), jnp.asarray(images), eps, n_steps, step_size)
  adv = np.asarray(adv)
  assert np.abs(adv - images).max() <= eps + 1e-6
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  assert np.abs(adv - images).max() > eps / 2  # it did move
  assert float(loss(jnp.asarray(adv))) > float(loss(jnp.asarray(images))) + 0.1


# ------------------------------------------------------------------------------------------------
# RandAugment


def _uint8_images(n=8, size=12):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return ArraySource(images, np.arange(n) % 3)


def test_randaugment_ops_at_magnitude_zero_are_identities():
  image = _uint8_images(1)[0]["image"]
  for name, op in randaugment.OPS.items():
    if name in ("auto_contrast", "equalize"):  # they have no magnitude
      continue
    out = np.asarray(op(Image.fromarray(image), 0.0, np.random.default_rng(0)))
    np.testing.assert_array_equal(out, image, err_msg=name)


def test_randaugment_is_seeded_and_leaves_the_rest_alone():
  src = _uint8_images()
  element = src[0]
  plain = pipeline.train_transform(12, "crop_flip")
  ra = pipeline.train_transform(12, "crop_flip", randaugment_layers=2, randaugment_magnitude=15)
  off = pipeline.train_transform(12, "crop_flip", randaugment_layers=0, randaugment_magnitude=15)
  run = lambda t, seed: t(element, np.random.default_rng(seed))["image"]  # noqa: E731
  np.testing.assert_array_equal(run(ra, 1), run(ra, 1))
  assert any(not np.array_equal(run(ra, 1), run(ra, s)) for s in (2, 3))
  np.testing.assert_array_equal(run(off, 1), run(plain, 1))  # 0 layers: the old transform exactly
  # Batches: the same seed gives the same images; another epoch augments each example anew.
  kw = dict(batch_size=8, image_size=12, seed=0, augment="none", randaugment_layers=2,
            randaugment_magnitude=20, with_index=True, place=False)
  a = [next(pipeline.train_batches(src, **kw)) for _ in range(2)]
  it = pipeline.train_batches(src, **kw)
  e0, e1 = next(it), next(it)  # 8 examples, batch 8: one step per epoch
  np.testing.assert_array_equal(a[0]["image"], e0["image"])
  assert sorted(e0["index"].tolist()) == list(range(8))
  by_index = lambda batch: batch["image"][np.argsort(batch["index"])]  # noqa: E731
  assert not np.array_equal(by_index(e0), by_index(e1))
  other = next(pipeline.train_batches(src, **{**kw, "seed": 1}))
  assert not np.array_equal(by_index(e0), by_index(other))
  np.testing.assert_array_equal(e0["label"], src.labels[e0["index"]])
  # Evaluation is untouched: it has no RandAugment argument and yields the plain resized images.
  ev = next(pipeline.eval_batches(src, batch_size=8, image_size=12, place=False))
  np.testing.assert_array_equal(ev["image"], src.images.astype(np.float32) * np.float32(1 / 255))


# ------------------------------------------------------------------------------------------------
# Each option in the real training loop

NUM_CLASSES, SIZE = 3, 8


class _Tiny(nn.Module):
  """Conv + BatchNorm + dropout + Dense, in mdjax.models' {"backbone", "head"} layout."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), use_bias=False, name="backbone")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x).mean((1, 2)))
    return nn.Dense(NUM_CLASSES, name="head")(x)


def _config(**train):
  c = config_lib.base_config()
  c.data.image_size = SIZE
  c.data.num_threads = 0
  c.data.augment = "none"
  c.train.update(dict(batch_size=8, epochs=1, log_every=2, checkpoint_every=100,
                      base_optimizer="adam", learning_rate=0.01, schedule="constant"))
  c.train.update(train)  # optimizer: SAM with its per-device perturbation, the defaults
  config_lib.validate(c)
  return c


def _real_and_generated():
  rng = np.random.default_rng(0)
  real = ArraySource(rng.integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8), np.arange(16) % 3)
  generated = ArraySource(rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8),
                          np.arange(8) % 3)
  return Concat([real, generated])  # a fine-tune's training set: 24 examples, 3 steps per epoch


@pytest.mark.parametrize("options, n_devices", [
    (dict(train=dict(mix="mixup", label_smoothing=0.1)), 1),
    (dict(train=dict(mix="cutmix", mix_alpha=0.5), data=dict(randaugment_layers=2)), 1),
    (dict(train=dict(mix="hardmix", hardmix_fraction=0.3, pgd_eps=0.03, pgd_steps=2)), 4),
], ids=["mixup", "cutmix+randaugment", "hardmix+pgd"])
def test_each_option_trains_with_sam_and_a_finite_loss(options, n_devices, tmp_path):
  # One device where that tests the same code, for compile time; HardMix + PGD under per-device
  # SAM on four, where the batch transforms see the global batch and the body a quarter of it.
  config = _config(**options["train"])
  config.data.update(options.get("data", {}))
  source = _real_and_generated()
  mesh = mesh_lib.data_mesh(jax.devices()[:n_devices])
  result = clf.train_classifier(config, source, None, str(tmp_path), NUM_CLASSES, model=_Tiny(),
                                tag="finetune", mesh=mesh)
  assert int(result.state.step) == 3
  assert all(np.isfinite(result.history["train_loss"]))
  counts = result.state.hard_examples
  if config.train.mix != "hardmix":
    assert counts is None
  else:
    # One count per example of real + generated; an epoch visits each exactly once.
    np.testing.assert_array_equal(np.asarray(counts["visits"]), np.ones(len(source)))
    assert 0 < int(np.asarray(counts["mistakes"]).sum()) <= len(source)
    # The counts are checkpointed: a finished run restores them with the rest of the state.
    again = clf.train_classifier(config, source, None, str(tmp_path), NUM_CLASSES, model=_Tiny(),
                                 tag="finetune", mesh=mesh)
    np.testing.assert_array_equal(np.asarray(again.state.hard_examples["mistakes"]),
                                  np.asarray(counts["mistakes"]))


def test_short_names_in_the_config_argument():
  config = config_lib.finalize(config_lib.base_config(), "mix=hardmix,randaugment=2,pgd_eps=0.03")
  assert (config.train.mix, config.data.randaugment_layers, config.train.pgd_eps) == (
      "hardmix", 2, 0.03)
  config_lib.validate(config)


def test_hardmix_needs_the_example_indices():
  config = _config(mix="hardmix")
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  tx = optim.make_optimizer(config, steps_per_epoch=1)
  state = steps.create_train_state(_Tiny(), tx, jax.random.PRNGKey(0), (SIZE, SIZE, 3), mesh)
  step = steps.make_train_step(_Tiny(), tx, config, mesh)
  with pytest.raises(ValueError, match="with_index=True"):
    step(state, {"image": np.zeros((8, SIZE, SIZE, 3), np.float32), "label": np.zeros(8, np.int32)})
