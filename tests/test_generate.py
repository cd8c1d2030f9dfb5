"""Generated-image storage (atomic sets, index, grids) and sample-quality metrics."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mdjax.errors import DataError
from mdjax.gan import generate, quality


def _images(n, value, size=8):
  rng = np.random.default_rng(value)
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_write_and_load_roundtrip(tmp_path):
  sets = {3: _images(4, 1), 7: _images(2, 2)}
  out = generate.write_generated(tmp_path / "gen", sets, class_names=["c%d" % i for i in range(10)],
                                 source_step={3: 100, 7: 200})
  assert generate.is_complete(out)
  images, labels = generate.load_generated(out)
  np.testing.assert_array_equal(images, np.concatenate([sets[3], sets[7]]))  # PNG is lossless
  np.testing.assert_array_equal(labels, [3, 3, 3, 3, 7, 7])
  index = json.loads((out / generate.INDEX_FILE).read_text())
  assert index["images"][0] == {"file": "class_0003/000000.png", "class_index": 3,
                                "class_name": "c3", "source_step": 100}
  assert index["classes"][1]["count"] == 2 and index["classes"][1]["source_step"] == 200
  # No temporary or moved-aside directories are left behind.
  assert [p.name for p in tmp_path.iterdir()] == ["gen"]


def test_crash_mid_write_leaves_no_complete_set_and_rerun_completes(tmp_path, monkeypatch):
  out = tmp_path / "gen"
  real_writer = generate._write_png
  calls = {"n": 0}

  def crashing_writer(path, image):
    calls["n"] += 1
    if calls["n"] > 3:
      raise OSError("disk full (simulated)")
    real_writer(path, image)

  sets = {0: _images(3, 1), 1: _images(3, 2)}
  monkeypatch.setattr(generate, "_write_png", crashing_writer)
  with pytest.raises(OSError, match="simulated"):
    generate.write_generated(out, sets)
  assert not generate.is_complete(out)
  with pytest.raises(DataError, match="does not exist|incomplete"):
    generate.load_generated(out)

  monkeypatch.setattr(generate, "_write_png", real_writer)
  generate.write_generated(out, sets)
  images, labels = generate.load_generated(out)
  assert images.shape == (6, 8, 8, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
  assert [p.name for p in tmp_path.iterdir()] == ["gen"]  # the crashed run's temp dir is gone


def test_crash_after_rename_before_marker_is_refused(tmp_path, monkeypatch):
  """The last window: files in place but no marker yet -> still refused, old set not kept."""
  out = tmp_path / "gen"
  generate.write_generated(out, {0: _images(2, 1)})

  def crash(path, data):
    raise KeyboardInterrupt

  monkeypatch.setattr(generate.files, "write_atomic", crash)  # the COMPLETE marker's write
  with pytest.raises(KeyboardInterrupt):
    generate.write_generated(out, {0: _images(5, 2)})
  assert out.is_dir() and not generate.is_complete(out)
  with pytest.raises(DataError, match="incomplete"):
    generate.load_generated(out)


def test_tampered_or_missing_files_are_refused(tmp_path):
  out = generate.write_generated(tmp_path / "gen", {0: _images(2, 1)})
  (out / "class_0000" / "000001.png").unlink()
  with pytest.raises(DataError, match="lacks"):
    generate.load_generated(out)
  index = out / generate.INDEX_FILE
  index.write_text(index.read_text().replace('"count": 2', '"count": 3'))
  with pytest.raises(DataError, match="inconsistent"):
    generate.load_generated(out)


def test_generate_images_batches_and_quantises():
  def sample(state, rng, n):
    return jnp.clip(state + jax.random.normal(rng, (n, 4, 4, 3)), -1, 1)

  images = generate.generate_images(sample, jnp.float32(0.0), 10, jax.random.key(0), batch_size=4)
  assert images.shape == (10, 4, 4, 3) and images.dtype == np.uint8
  again = generate.generate_images(sample, jnp.float32(0.0), 10, jax.random.key(0), batch_size=4)
  np.testing.assert_array_equal(images, again)
  assert len(np.unique(images.reshape(10, -1), axis=0)) == 10  # batches use different keys
  np.testing.assert_array_equal(generate.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])


def test_save_grid(tmp_path):
  images = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(5)])
  path = generate.save_grid(images, tmp_path / "s" / "grid.png", ncols=3)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
  assert grid[2, 2, 0] == 0 and grid[2, 8, 0] == 10 and grid[8, 2, 0] == 30
  assert grid[8, 14, 0] == 255  # the empty sixth cell stays white


def test_frechet_distance_zero_for_identical_and_grows_with_shift():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(40, 64))  # fewer samples than dimensions: rank-deficient covariance
  assert quality.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-4)
  d_small = quality.frechet_distance(feats, feats + 0.5)
  d_large = quality.frechet_distance(feats, feats + 2.0)
  # A pure mean shift by c in every one of F dimensions costs F * c^2.
  assert d_small == pytest.approx(64 * 0.25, rel=1e-3)
  assert d_large == pytest.approx(64 * 4.0, rel=1e-3)
  scaled = quality.frechet_distance(feats, feats * 2.0)
  assert scaled > 1.0  # a covariance change is seen as well
  with pytest.raises(DataError, match="at least 2"):
    quality.frechet_distance(feats[:1], feats)


def test_diversity_ratio_by_hand():
  # Three points on a line at 0, 3 and 4: pairwise distances 3, 4 and 1, mean 8/3.
  points = np.array([[0.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
  assert quality.mean_pairwise_distance(points) == pytest.approx(8 / 3)
  # A set half as spread out (scaled by 0.5 about any point) has ratio 0.5; one image drawn again
  # and again (mode collapse) has ratio 0 however good that image is.
  assert quality.diversity_ratio(points, 0.5 * points + 7.0) == pytest.approx(0.5)
  assert quality.diversity_ratio(points, np.repeat(points[1:2], 5, axis=0)) == 0.0
  rng = np.random.default_rng(0)
  real = rng.normal(size=(600, 8))
  # Two samples of the same distribution: about 1 (the subset of 512 rows is used for both).
  assert quality.diversity_ratio(real[:300], real[300:]) == pytest.approx(1.0, abs=0.05)
  assert np.isnan(quality.diversity_ratio(np.zeros((3, 2)), points))
  with pytest.raises(DataError, match="at least 2"):
    quality.mean_pairwise_distance(points[:1])


def test_class_frechet_distances_with_feature_fn():
  real = {0: _images(12, 1), 1: _images(12, 2)}
  gen = {0: real[0], 1: np.clip(real[1].astype(int) + 60, 0, 255).astype(np.uint8)}
  feature_fn = jax.jit(lambda x: x.reshape(x.shape[0], -1)[:, :16])
  d = quality.class_frechet_distances(feature_fn, real, gen, batch_size=5)
  assert d[0] == pytest.approx(0.0, abs=1e-5) and d[1] > 0.01


def test_target_class_fraction_known_classifier():
  # The "classifier" predicts class = brightness bucket: mean < 0.5 -> class 0, else class 1.
  def classify(images):
    bright = jnp.mean(images, axis=(1, 2, 3)) >= 0.5
    return jnp.stack([~bright, bright], axis=-1).astype(jnp.float32)

  dark = np.zeros((4, 8, 8, 3), np.uint8)
  light = np.full((4, 8, 8, 3), 255, np.uint8)
  mixed = np.concatenate([dark[:1], light[:3]])  # 3 of 4 assigned to class 1
  fractions = quality.target_class_fraction(classify, {0: dark, 1: mixed}, batch_size=3)
  assert fractions == {0: 1.0, 1: 0.75}


def test_generate_accepted_keeps_drawing_until_enough_pass():
  """The filtered stream is the plain stream with rejected images removed, in draw order."""
  def sample(state, rng, n):
    return jnp.clip(state + jax.random.normal(rng, (n, 4, 4, 3)), -1, 1)

  accept = lambda images: images.mean(axis=(1, 2, 3)) > 127.5  # about half of them  # noqa: E731
  key = jax.random.key(0)
  out = generate.generate_accepted(sample, jnp.float32(0.0), 10, key, accept, max_draws=200,
                                   batch_size=4)
  stream = generate.generate_images(sample, jnp.float32(0.0), out.drawn, key, batch_size=4)
  expected = stream[accept(stream)]
  assert out.images.shape == (10, 4, 4, 3) and np.all(accept(out.images))
  np.testing.assert_array_equal(out.images, expected[:10])
  assert out.passed == len(expected) >= 10 and out.drawn % 4 == 0
  assert 0 < out.acceptance_rate < 1 and out.acceptance_rate == out.passed / out.drawn
  # The cap stops a generator whose images rarely pass; what passed so far is kept.
  rare = lambda images: images.mean(axis=(1, 2, 3)) > 140  # noqa: E731
  capped = generate.generate_accepted(sample, jnp.float32(0.0), 10, key, rare, max_draws=9,
                                      batch_size=4)
  assert capped.drawn == 9 and len(capped.images) == capped.passed < 10
  np.testing.assert_array_equal(capped.images, stream[:9][rare(stream[:9])])
