"""Weak classes that are weak: Fashion-MNIST's files, which classes are picked, the GANs' stopping
rule, memorisation, and the fine-tune's treatments of generated images, each against a small case
computed by hand (or by scikit-learn)."""

from __future__ import annotations

import dataclasses
import gzip
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdjax import config as config_lib
from mdjax.core import mesh as mesh_lib
from mdjax.data import pipeline, registry
from mdjax.data.sources import ArraySource, Splits, real_and_generated
from mdjax.errors import DataError
from mdjax.gan import chunks, ensemble, generate, monitor, quality
from mdjax.pipeline import stages
from mdjax.train import refit, steps

import test_gan_ensemble as tge


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST's idx files.
# ------------------------------------------------------------------------------------------------
def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
  """An idx file as LeCun's format defines it: 0, 0, type 0x08, ndim, big-endian dims, data."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
  with (gzip.open if compress else open)(path, "wb") as fh:
    fh.write(raw)


def fake_fashion(folder, n_train=40, n_test=20, compress=True):
  rng = np.random.default_rng(0)
  data = {}
  for split, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    suffix = ".gz" if compress else ""
    write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{suffix}"), images, compress)
    write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{suffix}"), labels, compress)
    data[split] = (images, labels)
  return data


def fashion_config(root="", **data):
  config = config_lib.base_config()
  config.data.name, config.data.root = "fashion_mnist", str(root)
  config.data.val_fraction = 0.25
  for k, v in data.items():
    config.data[k] = v
  return config


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_the_four_idx_files(tmp_path, compress):
  data = fake_fashion(tmp_path, compress=compress)
  splits = registry.load_splits(fashion_config(tmp_path).data)
  assert splits.class_names[6] == "Shirt" and splits.num_classes == 10
  assert len(splits.train) + len(splits.val) == 40 and len(splits.test) == 20
  # The test split is the t10k files, image for image, as grey RGB.
  test_images, test_labels = data["t10k"]
  np.testing.assert_array_equal(splits.test.labels, test_labels)
  for i in (0, 7, 19):
    image = splits.test[i]["image"]
    assert image.shape == (28, 28, 3)
    np.testing.assert_array_equal(image[..., 1], test_images[i])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_fashion_mnist_missing_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.DATA_DIR_ENV, str(tmp_path / "home"))
  monkeypatch.setattr(registry, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "system"))
  with pytest.raises(DataError) as error:
    registry.load_splits(fashion_config().data)
  message = str(error.value)
  assert str(tmp_path / "home" / "fashion_mnist") in message and str(tmp_path / "system") in message
  assert "apt-get install dataset-fashion-mnist" in message
  # The system folder is the fallback: files there are found without any setting.
  os.makedirs(tmp_path / "system")
  fake_fashion(tmp_path / "system")
  assert registry.load_splits(fashion_config().data).num_classes == 10


def test_read_idx_refuses_truncated_and_foreign_files(tmp_path):
  write_idx(tmp_path / "ok", np.zeros((3, 2, 2), np.uint8), compress=False)
  assert registry.read_idx(str(tmp_path / "ok")).shape == (3, 2, 2)
  raw = (tmp_path / "ok").read_bytes()
  (tmp_path / "short").write_bytes(raw[:-3])
  with pytest.raises(DataError, match="truncated"):
    registry.read_idx(str(tmp_path / "short"))
  (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
  with pytest.raises(DataError, match="not an idx file"):
    registry.read_idx(str(tmp_path / "png"))


# ------------------------------------------------------------------------------------------------
# Which classes are weak.
# ------------------------------------------------------------------------------------------------
def test_worst_classes_break_accuracy_ties_by_validation_loss():
  accuracy = np.array([1.0, 1.0, 1.0, 0.9, 0.8])
  loss = np.array([0.01, 0.30, 0.05, 0.2, 0.4])
  # Two of the three flawless classes must come in: the two the classifier is least sure of.
  assert stages.worst_classes(accuracy, 4, loss) == [1, 2, 3, 4]
  assert stages.worst_classes(accuracy, 2, loss) == [3, 4]
  # Without losses, and on equal losses, the lower index still decides.
  assert stages.worst_classes(accuracy, 4) == [0, 1, 3, 4]
  assert stages.worst_classes(accuracy, 4, np.full(5, 0.1)) == [0, 1, 3, 4]


def _splits(counts):
  labels = np.repeat(np.arange(len(counts)), counts)
  src = ArraySource(np.zeros((len(labels), 2, 2, 3), np.uint8), labels)
  return Splits(src, src, src, [f"c{k}" for k in range(len(counts))])


def test_imbalance_is_said_once_with_the_classes_named():
  assert registry.imbalance(_splits([50, 40, 30])) is None
  few = registry.imbalance(_splits([50, 8, 30]))
  assert "fewer than 10" in few and "c1" in few and "20x" not in few
  skewed = registry.imbalance(_splits([500, 20, 30]))
  assert "c0, 500 images" in skewed and "c1, 20" in skewed


def test_a_dataset_of_one_class_stops_at_once(tmp_path):
  from PIL import Image
  os.makedirs(tmp_path / "only")
  for i in range(6):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "only" / f"{i}.png")
  config = config_lib.base_config()
  config.data.name, config.data.root = "folder", str(tmp_path)
  with pytest.raises(DataError, match="1 class .*at least two"):
    registry.load_splits(config.data)


def test_validation_change_names_what_fell():
  lowered = stages.validation_change({"overall": 0.90, "weak": 0.70},
                                     {"overall": 0.91, "weak": 0.65})
  assert lowered == ["weak"]
  assert stages.validation_change({"overall": 0.90, "weak": 0.70},
                                  {"overall": 0.90, "weak": 0.70}) == []
  assert stages.validation_change({"overall": 0.9, "weak": 0.7},
                                  {"overall": 0.8, "weak": 0.6}) == ["overall", "weak"]


# ------------------------------------------------------------------------------------------------
# The stopping rule.
# ------------------------------------------------------------------------------------------------
def _check(step, judge, diversity=0.9, fd=10.0, recall=0.6):
  return {"step": step, "judge_fraction": judge, "judge_recall": recall,
          "diversity_ratio": diversity, "frechet_distance": fd, "memorisation": 0.0}


def _rule(**thresholds) -> monitor.StopRule:
  """The default config's stopping rule with `thresholds` changed."""
  return dataclasses.replace(monitor.StopRule.from_config(config_lib.base_config().gan),
                             **thresholds)


def test_stop_rule_needs_judge_diversity_and_a_distance_that_stopped_improving():
  rule = _rule(judge=0.9, diversity=0.6, fd_gain=0.05, patience=1, fd_floor=2.0)
  # Judge relative to the judge's own recall: 0.55 >= 0.9 x 0.6 = 0.54 passes, 0.53 does not.
  assert rule.passes(_check(100, 0.55)) and not rule.passes(_check(100, 0.53))
  assert rule.shortfalls(_check(100, 0.53, diversity=0.5)) == ["judge 0.53 < 0.54",
                                                               "diversity 0.50 < 0.60"]
  # The first check never stops a class: nothing to say its distance stopped improving.
  assert not rule.should_stop([_check(100, 0.9)])
  # 9.6 is not 5% below 10 -> no longer improving -> stop; 9.4 is -> go on.
  assert rule.should_stop([_check(100, 0.9, fd=10.0), _check(200, 0.9, fd=9.6)])
  assert not rule.should_stop([_check(100, 0.9, fd=10.0), _check(200, 0.9, fd=9.4)])
  # Compared with the best earlier check, not the last one.
  assert rule.should_stop([_check(100, 0.9, fd=8.0), _check(200, 0.9, fd=12.0),
                           _check(300, 0.9, fd=7.9)])
  # A plateaued distance alone does not stop a class whose images fail the judge.
  assert not rule.should_stop([_check(100, 0.2, fd=10.0), _check(200, 0.2, fd=10.0)])
  # Off: never stops.
  assert not _rule(judge=0.0).should_stop([_check(1, 1.0), _check(2, 1.0)])
  # With patience 2 one flat check is not enough; two in a row are, and any gain in them resets.
  patient = _rule(judge=0.9, diversity=0.6, fd_gain=0.05, patience=2, fd_floor=2.0)
  flat = [_check(100, 0.9, fd=10.0), _check(200, 0.9, fd=9.8)]
  assert not patient.should_stop(flat)
  assert patient.should_stop(flat + [_check(300, 0.9, fd=9.9)])
  assert not patient.should_stop(flat + [_check(300, 0.9, fd=9.0)])
  assert not patient.should_stop([_check(100, 0.9, fd=10.0), _check(200, 0.9, fd=9.0),
                                  _check(300, 0.9, fd=8.9)])
  # As close to the class as two halves of its real images (times fd_floor): stop at once, even
  # at the first check and while still improving; not when the images fail the judge.
  near = dict(_check(100, 0.9, fd=0.25), fd_floor=0.15)
  assert patient.should_stop([near])
  assert not patient.should_stop([dict(near, fd_floor=0.12)])  # 0.25 > 2 x 0.12
  assert not patient.should_stop([dict(near, judge_fraction=0.1)])
  assert not _rule(fd_floor=0.0).should_stop([near])


class ScriptedMonitor(monitor.Monitor):
  """Checks from a script (class -> verdicts by check), in place of a judge."""

  def __init__(self, script):
    super().__init__(None, {}, _rule(patience=1))
    self.script, self.calls = script, []

  def check(self, k, step, images):
    self.calls.append((k, step))
    passed = self.script[k][step // 3 - 1]
    row = _check(step, 1.0 if passed else 0.0, fd=10.0)
    row["passed"] = self.rule.passes(row)
    return row


@pytest.mark.parametrize("strategy,devices", [("per_class", 1), ("map", 2), ("vmap", 2)])
def test_a_class_stops_when_its_images_pass_and_keeps_its_state(tmp_path, strategy, devices):
  fns = tge.tiny()
  data = {0: tge.noisy_images(6, 0), 3: tge.noisy_images(4, 1)}
  # Checks every 3 steps (sample_every=3), budget 9: class 0 passes from its 1st check and its
  # distance is flat, so it stops at its 2nd (step 6); class 3 never passes and trains 9 steps.
  script = {0: [True, True, True], 3: [False, False, False]}
  mesh = mesh_lib.class_mesh(jax.devices()[:devices])
  kw = dict(cfg={"steps": 9, "ensemble": strategy, "checkpoint_every": 3}, mesh=mesh,
            num_samples=2)
  watcher = ScriptedMonitor(script)
  result = tge._train(tmp_path, "w", fns, data, monitor=watcher, **kw)
  assert result.stopping["0"]["steps"] == 6 and result.stopping["0"]["stopped"] == "passed"
  assert result.stopping["3"]["steps"] == 9 and result.stopping["3"]["stopped"] == "budget"
  assert [c["step"] for c in result.stopping["0"]["curve"]] == [3, 6]
  assert [c["step"] for c in result.stopping["3"]["curve"]] == [3, 6, 9]
  assert sorted(watcher.calls) == [(0, 3), (0, 6), (3, 3), (3, 6), (3, 9)]
  # The stopped class's state is the one it stopped with: a separate training of 6 steps.
  capacity = max(len(x) for x in data.values())
  padded = {k: np.concatenate([x, np.zeros((capacity - len(x),) + x.shape[1:], np.uint8)])
            for k, x in data.items()}
  alone = tge.separate_training(fns, 3, 0, padded[0], 6, 4, count=len(data[0]))
  tge.assert_trees_close(result.states[0], alone, atol=1e-6)
  assert int(result.states[3]["t"]) == 9 and int(result.states[0]["t"]) == 6
  # Its history stops where it stopped; the other class's goes on.
  assert max(h["step"] for h in result.history[0]) == 6
  assert max(h["step"] for h in result.history[3]) == 9
  # Resumed, nothing is judged or trained again, and the record is the same.
  again = ScriptedMonitor(script)
  resumed = tge._train(tmp_path, "w", fns, data, monitor=again, **kw)
  assert again.calls == [] and resumed.stopping == result.stopping
  np.testing.assert_array_equal(resumed.generated[0], result.generated[0])


def test_an_interrupted_stopping_run_resumes_to_the_same_decisions(tmp_path):
  fns = tge.tiny()
  data = {0: tge.noisy_images(6, 0), 3: tge.noisy_images(4, 1)}
  script = {0: [True, True, True], 3: [False, True, True]}
  kw = dict(mesh=mesh_lib.class_mesh(jax.devices()[:1]))
  cfg = {"steps": 9, "checkpoint_every": 3, "ensemble": "per_class"}
  full = tge._train(tmp_path, "full", fns, data, monitor=ScriptedMonitor(script), cfg=cfg, **kw)
  # Killed after the checkpoint at step 3 (a budget of 3), then resumed with the budget of 9.
  tge._train(tmp_path, "cut", fns, data, monitor=ScriptedMonitor(script),
             cfg=dict(cfg, steps=3), **kw)
  resumed = tge._train(tmp_path, "cut", fns, data, monitor=ScriptedMonitor(script), cfg=cfg, **kw)
  # Class 3 fails its first check and passes at its second, where its distance is flat: both stop
  # at step 6, in the resumed run as in the uninterrupted one.
  assert {k: v["steps"] for k, v in resumed.stopping.items()} == {"0": 6, "3": 6}
  assert resumed.stopping == full.stopping
  for k in data:
    tge.assert_trees_close(resumed.states[k], full.states[k], atol=0)


# ------------------------------------------------------------------------------------------------
# Memorisation.
# ------------------------------------------------------------------------------------------------
def test_a_class_s_own_distance_is_two_halves_of_its_real_images():
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.repeat((digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
  from mdjax.gan import judge as judge_lib
  judge = judge_lib.fit_judge(images[:1200], digits.target[:1200], images[1200:],
                              digits.target[1200:], 10, kind="pixels", resolution=8)
  real = images[:1200][digits.target[:1200] == 3]
  watcher = monitor.Monitor(judge, {3: real}, _rule())
  order = np.random.default_rng(3).permutation(len(real))
  half = len(real) // 2
  expected = quality.frechet_distance(judge.embed(judge.features(real[order[:half]])),
                                      judge.embed(judge.features(real[order[half:]])))
  assert watcher.fd_floor(3) == pytest.approx(expected) and 0 < expected
  # Other digits are much farther from the 3s than the 3s from each other.
  eights = judge.embed(judge.features(images[:1200][digits.target[:1200] == 8]))
  assert quality.frechet_distance(judge.embed(judge.features(real)), eights) > 5 * expected
  row = watcher.check(3, 100, real[order[:60]])
  assert row["fd_floor"] == watcher.fd_floor(3) and row["judge_fraction"] > 0.9
  # Halves of 32 images in the judge's 32 dimensions: no floor (their covariances are
  # rank-deficient); 33 are enough.
  assert judge.embed(judge.features(real[:2])).shape[1] == 32
  small = monitor.Monitor(judge, {3: real[:64], 4: real[:66]}, _rule())
  assert small.fd_floor(3) is None and small.fd_floor(4) is not None
  assert small.check(3, 100, real[order[:60]])["fd_floor"] is None


def test_memorisation_scores_copies_one_and_fresh_images_near_the_percentile():
  from sklearn.datasets import load_digits
  digits = load_digits()
  x = digits.data[digits.target == 3]  # 183 real 3s, 64 pixels each
  train, fresh = x[:120], x[120:]
  copies = train[np.random.default_rng(0).choice(120, 40)] + 1e-6
  assert quality.memorisation(train, copies) == 1.0
  # Fresh 3s are as near the training 3s as those are to each other: ~5% fall under the 5th
  # percentile of the training images' own nearest-neighbour distances.
  assert quality.memorisation(train, fresh) <= 0.15
  assert quality.memorisation(train, np.concatenate([fresh, copies])) > 0.35


# ------------------------------------------------------------------------------------------------
# The fine-tune's treatments of generated images.
# ------------------------------------------------------------------------------------------------
def test_generated_images_loss_weight_is_a_weighted_mean():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([0, 1, 0])
  generated = jnp.array([0.0, 1.0, 1.0])
  ce = -np.log(np.exp(np.asarray(logits))[np.arange(3), np.asarray(labels)]
               / np.exp(np.asarray(logits)).sum(-1))
  weights = steps.generated_weights(generated, 0.25)
  np.testing.assert_allclose(weights, [1.0, 0.25, 0.25])
  expected = (ce[0] + 0.25 * ce[1] + 0.25 * ce[2]) / 1.5
  np.testing.assert_allclose(steps.cross_entropy(logits, labels, 0.0, weights), expected, rtol=1e-6)
  np.testing.assert_allclose(steps.cross_entropy(logits, labels), ce.mean(), rtol=1e-6)


def test_prior_sampler_keeps_each_class_at_its_real_count():
  # Class 0: 4 real; class 1: 4 real + 2 generated -> round(4 * 2 / 6) = 1 generated, 3 real.
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
  generated = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
  sampler = pipeline.PriorSampler(labels, generated, seed=0)
  assert len(sampler) == 8
  seen = set()
  for epoch in range(6):
    idx = sampler(epoch)
    assert len(idx) == 8 and len(set(idx.tolist())) == 8
    assert np.bincount(labels[idx]).tolist() == [4, 4]
    assert generated[idx].sum() == 1 and set(idx[:4].tolist()) == {0, 1, 2, 3}
    seen |= set(idx[generated[idx]].tolist())
    np.testing.assert_array_equal(sampler(epoch), idx)  # a pure function of the epoch
  assert seen == {8, 9}  # both generated images take turns


def test_prior_sampler_feeds_the_training_stream(tmp_path):
  real = ArraySource(np.zeros((8, 4, 4, 3), np.uint8), np.array([0] * 4 + [1] * 4))
  fake = ArraySource(np.full((2, 4, 4, 3), 255, np.uint8), np.array([1, 1]))
  both = real_and_generated(real, fake)
  sampler = pipeline.PriorSampler(both.labels, both.generated, seed=0)
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  stream = pipeline.train_batches(both, batch_size=8, image_size=4, seed=0, mesh=mesh,
                                  sampler=sampler, place=False)
  batch = next(stream)
  assert batch["image"].shape[0] == 8 and batch["generated"].sum() == 1
  assert batch["image"][batch["generated"] == 1].min() == 1.0  # the white generated image


def test_separate_norms_normalise_real_images_as_if_alone():
  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False, norm_mask=None):
      x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x, mask=norm_mask)
      return x.mean(axis=(1, 2))

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(6, 3, 3, 2)) + np.arange(6)[:, None, None, None])
  generated = jnp.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
  model = Tiny()
  variables = model.init(jax.random.PRNGKey(0), images)
  logits, stats = steps.apply_with_separate_norms(model, variables, images, generated,
                                                  jax.random.PRNGKey(1))
  real, fake = np.flatnonzero(generated == 0), np.flatnonzero(generated == 1)
  alone_real, upd = model.apply(variables, images[real], train=True, mutable=["batch_stats"])
  alone_fake, _ = model.apply(variables, images[fake], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(logits[real], alone_real, atol=1e-5)
  np.testing.assert_allclose(logits[fake], alone_fake, atol=1e-5)
  # The running averages learn from the real images only.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), stats,
               upd["batch_stats"])
  mixed, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert np.abs(np.asarray(mixed)[real] - np.asarray(alone_real)).max() > 0.1


def test_last_layer_refit_equals_scikit_learns_balanced_logistic_regression():
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(0)
  counts = [60, 25, 10]  # imbalanced: class weights matter
  labels = np.repeat(np.arange(3), counts)
  centres = rng.normal(size=(3, 5)) * 1.5
  x = (centres[labels] + rng.normal(size=(len(labels), 5))).astype(np.float32)
  l2 = 1e-2
  weights = refit.class_balanced_weights(labels, 3)
  np.testing.assert_allclose([weights[labels == k].sum() for k in range(3)], [95 / 3] * 3,
                             rtol=1e-6)
  kernel, bias = refit.fit_logistic(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(weights),
                                    jnp.zeros((5, 3)), jnp.zeros(3), jnp.float32(l2), steps=300)
  # scikit-learn's objective, 1/2 ||w||^2 + C sum_i s_i CE_i with balanced s_i, is ours times
  # N / l2 with C = 1 / (N l2).
  reference = LogisticRegression(C=1.0 / (len(labels) * l2), class_weight="balanced",
                                 max_iter=5000, tol=1e-10).fit(x, labels)
  ours = jax.nn.softmax(x @ np.asarray(kernel) + np.asarray(bias))
  np.testing.assert_allclose(ours, reference.predict_proba(x), atol=2e-3)


def test_hardest_selection_keeps_the_least_sure_plausible_images():
  def sample(state, rng, n):
    del state
    return jax.random.uniform(rng, (n, 2, 2, 3), minval=-1.0, maxval=1.0)

  def score(images):  # a stand-in classifier: its class probability is the mean brightness
    return images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0

  key = jax.random.PRNGKey(3)
  stream = generate.generate_images(sample, None, 8, key, batch_size=4)
  s = score(stream)
  threshold = np.sort(s)[2]  # the two darkest images are implausible
  out = generate.generate_hardest(sample, None, 3, key, score, threshold, max_draws=8,
                                  batch_size=4)
  plausible = [i for i in range(8) if s[i] > threshold]
  expected = sorted(sorted(plausible, key=lambda i: s[i])[:3])
  np.testing.assert_array_equal(out.images, stream[expected])
  assert (out.drawn, out.passed) == (8, 5)
  assert all(s[i] <= min(s[j] for j in plausible if j not in expected) for i in expected)
