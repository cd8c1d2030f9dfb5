"""The grain input pipeline: determinism, resumption, sharding, exact evaluation coverage."""


import jax
import numpy as np
import pytest

from mdjax.core import mesh as mesh_lib
from mdjax.data import pipeline
from mdjax.data.sources import ArraySource
from mdjax.errors import ConfigError

from local_processes import run_processes


def make_source(n=50, size=12, num_classes=5):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
  # Example i carries its own index in pixel (0, 0, 0) so batches can be traced back to examples.
  images[:, 0, 0, 0] = np.arange(n)
  return ArraySource(images, np.arange(n) % num_classes)


def ids(batch):
  return np.round(np.asarray(batch["image"])[:, 0, 0, 0] * 255).astype(int)


def take(it, k):
  return [next(it) for _ in range(k)]


def test_train_batches_are_deterministic_sharded_and_reshuffled_per_epoch():
  src = make_source()
  mesh = mesh_lib.data_mesh()
  assert mesh.size == 4
  kw = dict(batch_size=8, image_size=12, seed=3, mesh=mesh, augment="none")
  a, b = take(pipeline.train_batches(src, **kw), 12), take(pipeline.train_batches(src, **kw), 12)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
  batch = a[0]
  assert batch["image"].shape == (8, 12, 12, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {2}
  steps = pipeline.steps_per_epoch(len(src), 8)
  assert steps == 6
  epoch0 = np.concatenate([ids(x) for x in a[:steps]])
  epoch1 = np.concatenate([ids(x) for x in a[steps:2 * steps]])
  assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48  # no repeats within an epoch
  assert not np.array_equal(epoch0, epoch1)  # reshuffled
  np.testing.assert_array_equal(np.asarray(a[0]["label"]), ids(a[0]) % 5)  # labels follow images
  other = take(pipeline.train_batches(src, **{**kw, "seed": 4}), 1)[0]
  assert not np.array_equal(ids(other), ids(a[0]))


def test_resuming_at_a_step_continues_the_same_stream():
  src = make_source()
  kw = dict(batch_size=8, image_size=12, seed=1, augment="crop_flip")
  full = take(pipeline.train_batches(src, **kw), 14)
  resumed = take(pipeline.train_batches(src, start_step=9, **kw), 5)
  for x, y in zip(full[9:], resumed):
    np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))


def test_augmentation_crops_and_flips_within_range():
  src = make_source(n=16, size=16)
  plain = take(pipeline.train_batches(src, batch_size=16, image_size=16, seed=0, augment="none"), 1)[0]
  aug = take(pipeline.train_batches(src, batch_size=16, image_size=16, seed=0, augment="crop_flip"), 1)[0]
  x, y = np.asarray(plain["image"]), np.asarray(aug["image"])
  assert x.min() >= 0 and y.max() <= 1 and x.shape == y.shape
  assert not np.array_equal(x, y)
  np.testing.assert_array_equal(np.asarray(plain["label"]), np.asarray(aug["label"]))


def _windows(image, pad):
  """Every pad-and-crop view of `image` (reflect padding), as the crop policy draws them."""
  s = image.shape[0]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
  return [padded[y:y + s, x:x + s] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]


@pytest.mark.parametrize("augment,flips", [("crop", False), ("crop_flip", True)])
def test_crop_policies_shift_and_flip_only_when_asked(augment, flips):
  """`crop` (digits, characters) never mirrors an image; `crop_flip` does, about half the time."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
  transform = pipeline.train_transform(16, augment)
  windows = _windows(image, 2)
  mirrored = 0
  for seed in range(40):
    out = transform({"image": image, "label": 0}, np.random.default_rng(seed))["image"]
    out = np.rint(out * 255).astype(np.uint8)
    plain = any(np.array_equal(out, w) for w in windows)
    flipped = any(np.array_equal(out, w[:, ::-1]) for w in windows)
    assert plain or flipped
    mirrored += flipped and not plain
  assert (10 <= mirrored <= 30) if flips else mirrored == 0


def test_random_resized_box_stays_inside_with_the_allowed_area_and_ratio():
  rng = np.random.default_rng(0)
  for h, w in [(300, 200), (64, 256), (50, 50)]:
    for _ in range(200):
      left, top, right, bottom = pipeline.random_resized_box(h, w, rng, min_scale=0.2)
      assert 0 <= left < right <= w and 0 <= top < bottom <= h
      cw, ch = right - left, bottom - top
      assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05
      assert cw * ch >= 0.2 * h * w * 0.9 or (cw, ch) in ((w, round(w * 3 / 4)), (round(h * 4 / 3), h))
  # A 1:4 strip admits no 3/4-4/3 region of >= 90% of its area: the fallback is its centred box.
  assert pipeline.random_resized_box(64, 256, rng, min_scale=0.9) == (85, 0, 170, 64)


def test_photos_train_on_random_regions_and_evaluate_on_the_centre():
  """resized_crop_flip: a non-square photo is never squashed; evaluation sees its centre."""
  h, w = 40, 80
  image = np.zeros((h, w, 3), np.uint8)
  image[:, :16] = 255  # a white band on the left, clear of the centred square (x 20-60)
  view = pipeline.eval_image(image, 16, "resized_crop_flip")
  assert view.shape == (16, 16, 3) and view.max() == 0  # the centre crop drops the band
  assert pipeline.eval_image(image, 16, "crop").max() == 255  # other policies resize the whole image
  np.testing.assert_array_equal(pipeline.whole_image(image, 16, "resized_crop_flip"), view * 0)
  transform = pipeline.train_transform(16, "resized_crop_flip", crop_min_scale=0.08)
  outs = [transform({"image": image, "label": 1}, np.random.default_rng(s))["image"] for s in range(30)]
  assert all(o.shape == (16, 16, 3) for o in outs)
  whites = [float(o.mean()) for o in outs]
  assert min(whites) == 0 and max(whites) > 0.3  # some regions miss the band, some are largely band
  assert len({round(x, 3) for x in whites}) > 5  # the regions vary


def test_unknown_augmentation_is_a_config_error():
  with pytest.raises(ConfigError, match="data.augment"):
    pipeline.train_transform(16, "flip")


def test_resize_to_image_size():
  src = make_source(n=8, size=20)
  batch = take(pipeline.train_batches(src, batch_size=8, image_size=10, seed=0), 1)[0]
  assert batch["image"].shape == (8, 10, 10, 3)


@pytest.mark.parametrize("n, batch", [(50, 8), (8, 8), (3, 8), (33, 4)])
def test_eval_batches_cover_every_example_exactly_once(n, batch):
  src = make_source(n=n)
  seen, masked = [], 0.0
  for b in pipeline.eval_batches(src, batch_size=batch, image_size=12):
    assert b["image"].shape[0] == batch
    mask = np.asarray(b["mask"])
    seen.extend(ids(b)[mask > 0].tolist())
    masked += mask.sum()
  assert sorted(seen) == list(range(n)) and masked == n


def test_batch_size_must_divide_over_devices():
  with pytest.raises(ConfigError, match="multiple of the number of devices"):
    next(pipeline.train_batches(make_source(), batch_size=6, image_size=12, seed=0))
  with pytest.raises(ConfigError, match="at most the training set size"):
    next(pipeline.train_batches(make_source(n=4), batch_size=8, image_size=12, seed=0))
  assert pipeline.eval_batch_size(10, mesh_lib.data_mesh()) == 12


def test_two_processes_build_one_global_batch(tmp_path, free_port):
  """Two local JAX processes, 2 CPU devices each: their parts form the single-process batch."""
  runs = run_processes("multiprocess_worker.py", free_port, tmp_path, timeout=240)
  assert all(r.returncode == 0 for r in runs), [r.stdout for r in runs]
  parts = [np.load(tmp_path / f"ids_{i}.npy") for i in range(2)]
  src = make_source()
  single = take(pipeline.train_batches(src, batch_size=8, image_size=12, seed=5, augment="none"), 3)
  # Process p holds the p-th half of every global batch of the single-process stream.
  for step in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), ids(single[step]))
  ev = [np.load(tmp_path / f"eval_{i}.npy") for i in range(2)]
  assert sorted(np.concatenate(ev).tolist()) == list(range(50))


def test_two_processes_agree_on_which_stages_are_done(tmp_path, free_port):
  """A process that looks for a stage's record after process 0 wrote it still runs the stage
  (process 0's answer counts): otherwise it would skip the stage's barrier and collectives."""
  runs = run_processes("stages_multiprocess_worker.py", free_port, tmp_path / "w", timeout=180)
  outs = [r.stdout for r in runs]
  assert all(r.returncode == 0 for r in runs), outs
  assert [o.strip().splitlines()[-1] for o in outs] == ["ran done", "ran done"], outs
