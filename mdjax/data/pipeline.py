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
from collections.abc import Iterator

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from mdjax.core import mesh as mesh_lib
from mdjax.data import images as image_io
from mdjax.data.sources import Source
from mdjax.errors import ConfigError

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


# `config.data.augment`: "crop_flip" is `train_transform(augment=True)`, "none" resizes only.
AUGMENTATIONS = ("crop_flip", "none")


def train_transform(image_size: int, augment: bool):
  """Resize to image_size, then pad by 1/8 (reflect), random-crop back and random-flip."""
  pad = max(1, image_size // 8)

  def transform(element, rng: np.random.Generator):
    image = image_io.resize(element["image"], image_size)
    if augment:
      padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
      y, x = rng.integers(0, 2 * pad + 1, size=2)
      image = padded[y:y + image_size, x:x + image_size]
      if rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": _to_unit_float(image), "label": np.int32(element["label"])}

  return transform


def eval_transform(image_size: int):
  def transform(element):
    image = image_io.resize(element["image"], image_size)
    return {"image": _to_unit_float(image), "label": np.int32(element["label"]),
            "mask": np.float32(element.get("mask", 1.0))}
  return transform


def _read_options(num_threads: int, prefetch: int, batch: int) -> grain.ReadOptions:
  # In-memory sources decode nothing; threads would only contend for the GIL there.
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, prefetch) * batch)


def _place(batches: Iterator[dict], sharding: NamedSharding) -> Iterator[dict]:
  for local in batches:
    yield {k: jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(v))
           for k, v in local.items()}


def train_batches(source: Source, *, batch_size: int, image_size: int, seed: int,
                  mesh: jax.sharding.Mesh | None = None, augment: bool = True, start_step: int = 0,
                  num_threads: int = 2, prefetch: int = 4, place: bool = True) -> Iterator[dict]:
  """Endless training batches, reshuffled every epoch, starting at global step `start_step`.

  Yields {"image": float32 [B, S, S, 3] in [0, 1], "label": int32 [B]} as global arrays sharded
  over the "data" axis (or as this process's numpy arrays with `place=False`).
  """
  mesh = mesh or mesh_lib.data_mesh()
  local_batch = _check_batch(batch_size, mesh, "train.batch_size")
  steps = steps_per_epoch(len(source), batch_size)
  if steps == 0:
    raise ConfigError("train.batch_size", batch_size,
                      f"at most the training set size ({len(source)} examples)")
  transform = train_transform(image_size, augment)
  options = _read_options(num_threads, prefetch, local_batch)
  pid = jax.process_index()

  def epoch_batches(epoch: int, first: int):
    s = _epoch_seed(seed, epoch)
    # Shuffle and augment by global position, then let each process gather its slice of every
    # global batch: the global batches are the same whatever the number of processes.
    ds = grain.MapDataset.source(source).shuffle(seed=s).random_map(transform, seed=s)
    positions = _local_positions(steps, batch_size, local_batch, pid)[first * local_batch:]
    ds = grain.MapDataset.source(_Gather(ds, positions)).batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(options))

  start_epoch, first = divmod(start_step, steps)
  stream = itertools.chain.from_iterable(
      epoch_batches(e, first if e == start_epoch else 0) for e in itertools.count(start_epoch))
  return _place(stream, mesh_lib.batch_sharding(mesh)) if place else stream


def _local_positions(num_batches: int, batch_size: int, local_batch: int, pid: int) -> np.ndarray:
  """Positions of this process's examples: the pid-th contiguous slice of every global batch."""
  starts = np.arange(num_batches)[:, None] * batch_size + pid * local_batch
  return (starts + np.arange(local_batch)[None, :]).reshape(-1)


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
                 mesh: jax.sharding.Mesh | None = None, num_threads: int = 2, prefetch: int = 4,
                 place: bool = True) -> Iterator[dict]:
  """One pass in order; every example exactly once, the last batch padded with mask 0.

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
  ds = grain.MapDataset.source(_Gather(source, positions, mask)).map(eval_transform(image_size))
  ds = ds.batch(local_batch)
  stream = iter(ds.to_iter_dataset(_read_options(num_threads, prefetch, local_batch)))
  return _place(stream, mesh_lib.batch_sharding(mesh)) if place else stream


def eval_batch_size(requested: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the device and process counts that is >= `requested`."""
  unit = math.lcm(mesh.size, jax.process_count())
  return unit * math.ceil(requested / unit)
