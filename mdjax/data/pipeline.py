"""The grain input pipeline: decode, resize, augment, batch, shard per process, place on devices.

Determinism: epoch e of a run with seed s is shuffled with seed (s, e) and augmented with a seed
derived from (s, e) and the example's position, so the same seed gives the same batches in the
same order on any machine and any number of processes. The position in the stream is a pure
function of the training step, which is why a checkpoint only needs the step to resume the data
exactly (`train_batches(start_step=...)`).

Multi-process: every process shuffles the full dataset identically and reads only its own
contiguous slice of each global batch (`jax.process_index()`), so the global batches do not
depend on the number of processes; the slices become one global jax.Array sharded over the
"data" axis of a mesh of all devices.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from mdjax.core import mesh as mesh_lib
from mdjax.data import images as image_io
from mdjax.data import randaugment as randaugment_lib
from mdjax.data.sources import Source
from mdjax.errors import ConfigError, DataError

# A function of images float32 [B, H, W, 3] in [0, 1] (a classifier, a feature extractor).
ImageFn = Callable[[np.ndarray], np.ndarray]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training drops each epoch's last partial batch; evaluation never does."""
  return num_examples // batch_size


def _check_batch(batch_size: int, mesh: jax.sharding.Mesh, key: str) -> int:
  n_dev, n_proc = mesh.size, jax.process_count()
  if batch_size % n_dev or batch_size % n_proc:
    raise ConfigError(key, batch_size, f"a multiple of the number of devices ({n_dev}) "
                      f"and of processes ({n_proc})")
  return batch_size // n_proc


def _epoch_seed(seed: int, epoch: int) -> int:
  # Mixed so that (seed, epoch) pairs do not collide (seed 1 epoch 0 vs seed 0 epoch 1).
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _to_unit_float(image: np.ndarray) -> np.ndarray:
  return image.astype(np.float32) * (1.0 / 255.0)


# Training augmentations (`config.data.augment`), and the view of an image evaluation takes:
#   none               the image resized to a square.
#   crop               padded by 1/8 (reflect) and cropped back at a random offset: shifts of up to
#                      1/8 of the side. For digits and other characters, where a mirrored image is
#                      another shape (a mirrored 2 resembles a 5).
#   crop_flip          crop, then a horizontal flip half the time (CIFAR-10's usual recipe).
#   resized_crop_flip  for photos (224 px datasets): a random region of crop_min_scale-100% of the
#                      area with aspect ratio 3/4-4/3, resized to the input size and flipped half
#                      the time; evaluation takes the centred square of 87.5% of the shorter side.
#                      Neither squashes a non-square photo.
AUGMENTATIONS = ("none", "crop", "crop_flip", "resized_crop_flip")
_EVAL_CROP = {"resized_crop_flip": 0.875}
_RATIO = (3 / 4, 4 / 3)


def _check_augment(augment: str) -> None:
  if augment not in AUGMENTATIONS:
    raise ConfigError("data.augment", augment, "one of " + ", ".join(AUGMENTATIONS))


def random_resized_box(height: int, width: int, rng: np.random.Generator,
                       min_scale: float = 0.08) -> tuple[int, int, int, int]:
  """A random crop box (left, top, right, bottom) for `resized_crop_flip`.

  The sampling of torchvision's RandomResizedCrop (area fraction uniform in [min_scale, 1], log
  aspect ratio uniform in [log 3/4, log 4/3], up to 10 tries, then the centred largest box of an
  allowed ratio), written here on numpy so it runs inside grain's per-example random_map with its
  seeded generator.
  """
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(min_scale, 1.0)
    aspect = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      return (left, top, left + w, top + h)
  ratio = width / height
  w, h = width, height
  if ratio < _RATIO[0]:
    h = int(round(width / _RATIO[0]))
  elif ratio > _RATIO[1]:
    w = int(round(height * _RATIO[1]))
  top, left = (height - h) // 2, (width - w) // 2
  return (left, top, left + w, top + h)


def train_transform(image_size: int, augment: str, crop_min_scale: float = 0.08,
                    randaugment_layers: int = 0, randaugment_magnitude: float = 9):
  """The per-example training transform of policy `augment` (see AUGMENTATIONS), then
  RandAugment's `randaugment_layers` ops at `randaugment_magnitude` (mdjax.data.randaugment; 0
  layers: off, and no random numbers drawn for it).

  An element's "index" (its position in the training set, `train_batches(with_index=True)`) and
  "generated" flag (mdjax.data.sources.Tagged) are passed through.
  """
  _check_augment(augment)
  pad = max(1, image_size // 8)

  def transform(element, rng: np.random.Generator):
    image = element["image"]
    if augment == "resized_crop_flip":
      box = random_resized_box(image.shape[0], image.shape[1], rng, crop_min_scale)
      image = image_io.resize(image, image_size, box)
    else:
      image = image_io.resize(image, image_size)
    if augment in ("crop", "crop_flip"):
      padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
      y, x = rng.integers(0, 2 * pad + 1, size=2)
      image = padded[y:y + image_size, x:x + image_size]
    if augment.endswith("_flip") and rng.random() < 0.5:
      image = image[:, ::-1]
    if randaugment_layers:
      # On the final crop: at the input size, where it costs least.
      image = randaugment_lib.randaugment(image, rng, randaugment_layers, randaugment_magnitude)
    out = {"image": _to_unit_float(image), "label": np.int32(element["label"])}
    if "index" in element:
      out["index"] = np.int32(element["index"])
    if "generated" in element:
      out["generated"] = np.float32(element["generated"])
    return out

  return transform


def eval_image(image: np.ndarray, image_size: int, augment: str = "none") -> np.ndarray:
  """The view of `image` that evaluation takes, matching the training policy `augment`."""
  crop = _EVAL_CROP.get(augment)
  return image_io.center_crop(image, image_size, crop) if crop else image_io.resize(image, image_size)


def whole_image(image: np.ndarray, size: int, augment: str = "none") -> np.ndarray:
  """The whole image as a square (what the class GANs learn from): the centred square of a photo
  for `resized_crop_flip` datasets, which are not square, else a plain resize."""
  if augment == "resized_crop_flip":
    return image_io.center_crop(image, size)
  return image_io.resize(image, size)


def eval_transform(image_size: int, augment: str = "none"):
  _check_augment(augment)

  def transform(element):
    return {"image": _to_unit_float(eval_image(element["image"], image_size, augment)),
            "label": np.int32(element["label"]), "mask": np.float32(element.get("mask", 1.0))}
  return transform


def _read_options(num_threads: int, prefetch: int, batch: int) -> grain.ReadOptions:
  # In-memory sources decode nothing; threads would only contend for the GIL there.
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, prefetch) * batch)


def _place(batches: Iterator[dict], sharding: NamedSharding) -> Iterator[dict]:
  for local in batches:
    yield {k: jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(v))
           for k, v in local.items()}


def train_batches(source: Source, *, batch_size: int, image_size: int, seed: int,
                  mesh: jax.sharding.Mesh | None = None, augment: str = "none",
                  crop_min_scale: float = 0.08, randaugment_layers: int = 0,
                  randaugment_magnitude: float = 9, with_index: bool = False, start_step: int = 0,
                  num_threads: int = 2, prefetch: int = 4, place: bool = True,
                  sampler: Sampler | None = None) -> Iterator[dict]:
  """Endless training batches, reshuffled every epoch, starting at global step `start_step`.

  Yields {"image": float32 [B, S, S, 3] in [0, 1], "label": int32 [B]} as global arrays sharded
  over the "data" axis (or as this process's numpy arrays with `place=False`); with `with_index`
  also "index": int32 [B], each example's position in `source` (HardMix counts mistakes by it).
  A `sampler` chooses which examples of `source` epoch e holds (`sampler(e)`, `len(sampler)` of
  them; e.g. `PriorSampler`); without one every epoch holds every example once.
  """
  mesh = mesh or mesh_lib.data_mesh()
  local_batch = _check_batch(batch_size, mesh, "train.batch_size")
  epoch_size = len(source) if sampler is None else len(sampler)
  steps = steps_per_epoch(epoch_size, batch_size)
  if steps == 0:
    raise ConfigError("train.batch_size", batch_size,
                      f"at most the training set size ({epoch_size} examples)")
  transform = train_transform(image_size, augment, crop_min_scale, randaugment_layers,
                              randaugment_magnitude)
  options = _read_options(num_threads, prefetch, local_batch)
  indexed = _Indexed(source) if with_index else source
  pid = jax.process_index()

  def epoch_batches(epoch: int, first: int):
    s = _epoch_seed(seed, epoch)
    # Shuffle and augment by global position, then let each process gather its slice of every
    # global batch: the global batches are the same whatever the number of processes.
    epoch_source = indexed if sampler is None else _Gather(indexed, sampler(epoch))
    ds = grain.MapDataset.source(epoch_source).shuffle(seed=s).random_map(transform, seed=s)
    positions = _local_positions(steps, batch_size, local_batch, pid)[first * local_batch:]
    ds = grain.MapDataset.source(_Gather(ds, positions)).batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(options))

  start_epoch, first = divmod(start_step, steps)
  stream = itertools.chain.from_iterable(
      epoch_batches(e, first if e == start_epoch else 0) for e in itertools.count(start_epoch))
  return _place(stream, mesh_lib.batch_sharding(mesh)) if place else stream


class Sampler:
  """Which examples of a source each epoch holds: `sampler(epoch)` -> indices, `len(sampler)`
  of them in every epoch (a pure function of the epoch, so a resumed run sees the same epochs)."""

  def __len__(self) -> int:
    raise NotImplementedError

  def __call__(self, epoch: int) -> np.ndarray:
    raise NotImplementedError


class PriorSampler(Sampler):
  """Fine-tuning on real + generated images with the real class priors kept.

  Appending a class's generated images enlarges its share of every epoch, and the classifier
  learns the larger share as a larger prior (the classes that get images gain, the others lose).
  Here a class with n real and g generated images keeps n examples per epoch: round(n g / (n + g))
  of them generated and the rest real, each drawn afresh every epoch (seeded by the seed, epoch
  and class), so generated images take part of their class's share instead of adding to it.
  Classes without generated images take all their real images. Epochs hold as many examples as
  the real set.
  """

  def __init__(self, labels: np.ndarray, generated: np.ndarray, seed: int):
    self.labels, self.generated = np.asarray(labels), np.asarray(generated, bool)
    self.seed = int(seed)
    self._classes = np.unique(self.labels)

  def __len__(self) -> int:
    return int((~self.generated).sum())

  def share(self, real: int, generated: int) -> int:
    """How many of a class's `real` places per epoch go to its generated images."""
    return int(round(real * generated / (real + generated))) if generated else 0

  def __call__(self, epoch: int) -> np.ndarray:
    picks = []
    for c in self._classes:
      real = np.flatnonzero((self.labels == c) & ~self.generated)
      fake = np.flatnonzero((self.labels == c) & self.generated)
      k = self.share(len(real), len(fake))
      rng = np.random.default_rng([self.seed, int(epoch), int(c)])
      picks += [rng.choice(real, len(real) - k, replace=False), rng.choice(fake, k, replace=False)]
    return np.sort(np.concatenate(picks))


def _local_positions(num_batches: int, batch_size: int, local_batch: int, pid: int) -> np.ndarray:
  """Positions of this process's examples: the pid-th contiguous slice of every global batch."""
  starts = np.arange(num_batches)[:, None] * batch_size + pid * local_batch
  return (starts + np.arange(local_batch)[None, :]).reshape(-1)


class _Indexed:
  """`source` with each element's own position added as "index"."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return {**self.source[i], "index": int(i)}


class _Gather:
  """Elements `positions` of `parent` (a source or MapDataset), optionally with an eval mask."""

  def __init__(self, parent, positions: np.ndarray, mask: np.ndarray | None = None):
    self.parent, self.positions, self.mask = parent, positions, mask

  def __len__(self):
    return len(self.positions)

  def __getitem__(self, i):
    element = self.parent[int(self.positions[i])]
    if self.mask is not None:
      element = {**element, "mask": self.mask[i]}
    return element


def eval_batches(source: Source, *, batch_size: int, image_size: int,
                 mesh: jax.sharding.Mesh | None = None, augment: str = "none",
                 num_threads: int = 2, prefetch: int = 4, place: bool = True) -> Iterator[dict]:
  """One pass in order; every example exactly once, the last batch padded with mask 0.

  `augment` is the policy the model trains with; evaluation takes its matching view (`eval_image`).

  Yields {"image", "label", "mask": float32 [B]}; padding keeps every batch the same shape, so
  the jitted eval step compiles once.
  """
  mesh = mesh or mesh_lib.data_mesh()
  local_batch = _check_batch(batch_size, mesh, "eval batch size")
  n = len(source)
  num_batches = max(1, math.ceil(n / batch_size))
  positions = _local_positions(num_batches, batch_size, local_batch, jax.process_index())
  mask = (positions < n).astype(np.float32)
  positions = np.where(positions < n, positions, 0)  # padding: masked copies of example 0
  ds = grain.MapDataset.source(_Gather(source, positions, mask))
  ds = ds.map(eval_transform(image_size, augment))
  ds = ds.batch(local_batch)
  stream = iter(ds.to_iter_dataset(_read_options(num_threads, prefetch, local_batch)))
  return _place(stream, mesh_lib.batch_sharding(mesh)) if place else stream


def eval_batch_size(requested: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the device and process counts that is >= `requested`."""
  unit = math.lcm(mesh.size, jax.process_count())
  return unit * math.ceil(requested / unit)


def _as_unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] or float [0, 1] NHWC -> float32 [0, 1] (the classifier contract)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise DataError(f"expected images of shape [N, H, W, 3], got {images.shape}.")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def apply_in_batches(fn: ImageFn, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
  """Applies `fn` (images [B,H,W,3] in [0,1] -> array [B, ...]) over all images.

  Every batch is padded to `batch_size` by repeating its final image so a jitted `fn` compiles
  once for all classes; the padded rows are dropped.
  """
  images = _as_unit_float(images)
  n = len(images)
  outputs = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    outputs.append(np.asarray(fn(batch))[:real])
  return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)
