"""Generating images from the per-class GANs and storing them so a crash never fakes a result.

Layout of a generated set (the fine-tuning stage reads it with `load_generated`):

    <out_dir>/
      class_0003/000000.png ...     one directory per class, named by class index
      index.json                    every image: file, class index, class name, source GAN step
      COMPLETE                      written last; holds the image count and the index's sha256

Atomicity: everything is written into a temporary sibling directory `.<name>.tmp-<uuid>` (same
filesystem, so the rename is atomic), every file and the directory are fsync'ed, the directory is
renamed onto `<out_dir>` (an existing set is first moved aside, since POSIX cannot rename onto a
non-empty directory) and only then is `COMPLETE` written (itself via write-temp-then-rename). A run
killed at any point leaves either the previous complete set, or a directory without `COMPLETE`,
which `load_generated` refuses; rerunning the generation replaces it. Stale temporary directories
from killed runs are removed by the next write (one writer per target directory is assumed).

PNG is lossless, so what is read back is bit-identical to what the generator produced (after the
[-1, 1] -> uint8 quantisation).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from mdjax.core import files
from mdjax.errors import DataError

INDEX_FILE = "index.json"
COMPLETE_FILE = "COMPLETE"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------
def to_uint8(images) -> np.ndarray:
  """Generator output float [-1, 1] -> uint8 [0, 255] (round to nearest, clipped)."""
  images = np.asarray(images, np.float32)
  return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def _jit_sample(sample_fn):
  # One jitted wrapper per sampler: generating for many classes (or again) compiles once.
  return jax.jit(sample_fn, static_argnums=2)


def _batches(sample_fn, state, rng: jax.Array, batch_size: int) -> Iterator[np.ndarray]:
  """Endless uint8 batches from one GAN; batch i uses `fold_in(rng, i)`."""
  sample = _jit_sample(sample_fn)
  for i in itertools.count():
    yield to_uint8(sample(state, jax.random.fold_in(rng, i), batch_size))


def generate_images(sample_fn: Callable[[Any, jax.Array, int], jax.Array], state, n: int,
                    rng: jax.Array, *, batch_size: int = 64) -> np.ndarray:
  """Draws `n` images from one GAN in batches; returns uint8 [n, R, R, 3].

  Args:
    sample_fn: `(state, rng, n) -> float [n, R, R, 3] in [-1, 1]` from the EMA generator (the
      contract's `sample` with the config bound); jitted here with `n` static.
    state: that class's GAN state.
    rng: key; batch i uses `fold_in(rng, i)`, so a rerun with the same `batch_size` gives the
      same images.
    batch_size: images per generator call; every call uses this size (one compile), the surplus
      of the last batch is dropped.
  """
  if n <= 0:
    return np.zeros((0,), np.uint8)
  stream = _batches(sample_fn, state, rng, batch_size)
  return np.concatenate([next(stream) for _ in range(-(-n // batch_size))])[:n]


@dataclasses.dataclass
class Accepted:
  """What `generate_accepted` returns: the kept images, and how many were drawn to get them."""
  images: np.ndarray  # uint8 [<= n, R, R, 3]
  drawn: int  # images generated in all
  passed: int  # of those, how many `accept` kept (>= len(images): the last batch's surplus)

  @property
  def acceptance_rate(self) -> float:
    return self.passed / self.drawn if self.drawn else float("nan")


def generate_accepted(sample_fn: Callable[[Any, jax.Array, int], jax.Array], state, n: int,
                      rng: jax.Array, accept: Callable[[np.ndarray], np.ndarray], *,
                      max_draws: int, batch_size: int = 64) -> Accepted:
  """Draws from one GAN until `n` images pass `accept` or `max_draws` images were drawn.

  The same stream as `generate_images` (with the same `rng` and `batch_size`), filtered:
  `accept(uint8 [B, R, R, 3]) -> bool [B]` keeps an image. Returns the first `n` kept images in
  draw order (fewer if the cap was reached first) with the counts for the acceptance rate.
  """
  kept, drawn, passed = [], 0, 0
  if n > 0:
    for batch in _batches(sample_fn, state, rng, batch_size):
      batch = batch[:max_draws - drawn]
      drawn += len(batch)
      ok = np.asarray(accept(batch), bool)
      passed += int(ok.sum())
      kept.append(batch[ok])
      if passed >= n or drawn >= max_draws:
        break
  images = np.concatenate(kept)[:n] if kept else np.zeros((0,), np.uint8)
  return Accepted(images, drawn, passed)


def generate_hardest(sample_fn: Callable[[Any, jax.Array, int], jax.Array], state, n: int,
                     rng: jax.Array, score: Callable[[np.ndarray], np.ndarray], threshold: float,
                     *, max_draws: int, batch_size: int = 64) -> Accepted:
  """The `n` images the classifier finds hardest but still plausible, from `max_draws` draws.

  Classifier-feedback selection (feedback-guided synthesis): `score(uint8 [B, R, R, 3])` gives
  each image the classifier's probability of its class; images scoring above `threshold` are
  plausible, and of those the `n` with the lowest scores are kept (the ones nearest the class's
  boundary, where the classifier errs), in draw order. The same stream as `generate_images`.
  """
  if n <= 0:
    return Accepted(np.zeros((0,), np.uint8), 0, 0)
  images = generate_images(sample_fn, state, max_draws, rng, batch_size=batch_size)
  scores = np.asarray(score(images), np.float64)
  plausible = np.flatnonzero(scores > threshold)
  hardest = np.sort(plausible[np.argsort(scores[plausible], kind="stable")[:n]])
  return Accepted(images[hardest], len(images), len(plausible))


# How `draw_class` keeps images when scored: the first that pass, or the hardest that pass.
SELECTIONS = ("first", "hardest")


def draw_class(sample_fn: Callable[[Any, jax.Array, int], jax.Array], state, n: int,
               rng: jax.Array, *, score: Callable[[np.ndarray], np.ndarray] | None = None,
               threshold: float = 0.0, select: str = "first", max_draws: int = 10,
               batch_size: int = 64) -> tuple[np.ndarray, Accepted | None]:
  """`n` images of one class: all drawn (no `score`), or filtered by the classifier's probability
  `score` above `threshold`, keeping the first that pass (`generate_accepted`) or the hardest
  (`generate_hardest`), from at most `max_draws` x `n` draws. Returns (images, counts or None)."""
  if score is None:
    return generate_images(sample_fn, state, n, rng, batch_size=batch_size), None
  if select == "hardest":
    out = generate_hardest(sample_fn, state, n, rng, score, threshold, max_draws=max_draws * n,
                           batch_size=batch_size)
  else:
    out = generate_accepted(sample_fn, state, n, rng, lambda images: score(images) > threshold,
                            max_draws=max_draws * n, batch_size=batch_size)
  return out.images, out


# ------------------------------------------------------------------------------------------------
# Files.
# ------------------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _write_png(path: Path, image: np.ndarray) -> None:
  """One image file (fsync'ed). Module-level so tests can simulate a crash mid-set."""
  _write_bytes(path, _png_bytes(image))


# ------------------------------------------------------------------------------------------------
# Grids.
# ------------------------------------------------------------------------------------------------
def make_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [n, H, W, 3] -> one uint8 image with the n images on a grid (white padding)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = image
  return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, *, ncols: int | None = None) -> Path:
  """Writes a PNG grid of uint8 images atomically; returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path, _png_bytes(make_grid(images, ncols=ncols)))
  return path


# ------------------------------------------------------------------------------------------------
# Generated sets.
# ------------------------------------------------------------------------------------------------
def _class_dir(class_index: int) -> str:
  return f"class_{int(class_index):04d}"


def is_complete(out_dir: str | os.PathLike) -> bool:
  """Whether `out_dir` holds a generated set whose writing finished."""
  return (Path(out_dir) / COMPLETE_FILE).is_file()


def write_generated(out_dir: str | os.PathLike, images_by_class: Mapping[int, np.ndarray], *,
                    class_names: Sequence[str] | Mapping[int, str] | None = None,
                    source_step: int | Mapping[int, int] | None = None) -> Path:
  """Stores generated images atomically (see the module docstring); replaces an existing set.

  Args:
    out_dir: target directory.
    images_by_class: {class index: uint8 [N, R, R, 3]}.
    class_names: names indexed by class index (list over all classes, or a mapping).
    source_step: the GAN step the images come from (one int, or per class).
  Returns:
    The final directory.
  """
  out_dir = Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
    shutil.rmtree(stale, ignore_errors=True)
  for stale in out_dir.parent.glob(f".{out_dir.name}.old-*"):
    shutil.rmtree(stale, ignore_errors=True)

  def name_of(k):
    if class_names is None:
      return str(k)
    return str(class_names[k])

  def step_of(k):
    if source_step is None or isinstance(source_step, (int, np.integer)):
      return None if source_step is None else int(source_step)
    return int(source_step[k])

  tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
  tmp.mkdir()
  entries, classes = [], []
  try:
    for k in sorted(images_by_class):
      images = np.asarray(images_by_class[k])
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"class {k}: expected uint8 [N, H, W, 3], got {images.dtype} {images.shape}.")
      cdir = tmp / _class_dir(k)
      cdir.mkdir()
      for i, image in enumerate(images):
        rel = f"{_class_dir(k)}/{i:06d}.png"
        _write_png(tmp / rel, image)
        entries.append({"file": rel, "class_index": int(k), "class_name": name_of(k),
                        "source_step": step_of(k)})
      files.fsync_dir(cdir)
      classes.append({"class_index": int(k), "class_name": name_of(k), "count": len(images),
                      "source_step": step_of(k)})
    index = json.dumps({"version": FORMAT_VERSION, "num_images": len(entries), "classes": classes,
                        "images": entries}, indent=1).encode()
    _write_bytes(tmp / INDEX_FILE, index)
    files.fsync_dir(tmp)
  except BaseException:
    # A failed write (a full disk) frees what it wrote at once; a killed one leaves `tmp` for the
    # next write to remove (above).
    shutil.rmtree(tmp, ignore_errors=True)
    raise

  old = None
  if out_dir.exists():
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex}"
    os.replace(out_dir, old)
  os.replace(tmp, out_dir)
  files.fsync_dir(out_dir.parent)
  marker = {"num_images": len(entries), "index_sha256": hashlib.sha256(index).hexdigest()}
  files.write_atomic(out_dir / COMPLETE_FILE, json.dumps(marker).encode())
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return out_dir


def read_index(out_dir: str | os.PathLike) -> dict:
  """The index of a complete generated set (raises DataError for a missing or incomplete set)."""
  out_dir = Path(out_dir)
  how_to_fix = "Rerun the generate stage (it rewrites the set), or delete the directory."
  if not out_dir.is_dir():
    raise DataError(f"No generated images at {out_dir}: the directory does not exist. "
                    "Run the generate stage first.")
  if not is_complete(out_dir):
    raise DataError(f"The generated set at {out_dir} is incomplete (no {COMPLETE_FILE} marker): "
                    f"its writing was interrupted. {how_to_fix}")
  marker = json.loads((out_dir / COMPLETE_FILE).read_text())
  index_bytes = (out_dir / INDEX_FILE).read_bytes()
  if hashlib.sha256(index_bytes).hexdigest() != marker["index_sha256"]:
    raise DataError(f"The generated set at {out_dir} is inconsistent: {INDEX_FILE} does not match "
                    f"the {COMPLETE_FILE} marker (modified after writing?). {how_to_fix}")
  index = json.loads(index_bytes)
  if index.get("version") != FORMAT_VERSION or len(index["images"]) != marker["num_images"]:
    raise DataError(f"The generated set at {out_dir} has an unexpected format. {how_to_fix}")
  return index


def load_generated(out_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a complete generated set: (images uint8 [N, R, R, 3], labels int32 [N]).

  Refuses (DataError) a directory whose writing did not finish, or whose files are missing.
  """
  out_dir = Path(out_dir)
  index = read_index(out_dir)
  images, labels = [], []
  for entry in index["images"]:
    path = out_dir / entry["file"]
    if not path.is_file():
      raise DataError(f"The generated set at {out_dir} lacks {entry['file']} listed in its index. "
                      "Rerun the generate stage.")
    with Image.open(path) as im:
      images.append(np.asarray(im.convert("RGB")))
    labels.append(entry["class_index"])
  if not images:
    return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int32)
  return np.stack(images), np.asarray(labels, np.int32)
