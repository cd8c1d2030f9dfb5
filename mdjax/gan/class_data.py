"""Each weak class's images for its GAN: checked, resized, stacked, padded, drawn as batches.

The classes' images are stacked into one uint8 array [K, capacity, R, R, 3] padded with zeros
beyond each class's count, kept on device (sharded like the GAN states), and each step draws a
batch for class k from row k only: indices are a random permutation of [0, count_k) (padding slots
get a score above every real one, so they are never chosen), so a class can never see another
class's images or padding. Within a batch sampling is without replacement (with wrap-around when a
class has fewer images than the batch). Images are resized to `gan.resolution` here with PIL
bicubic (non-square images are stretched; crop before calling if that matters) and mapped to
[-1, 1] inside the step.

Classes are trained in chunks of at most `gan.chunk_size` (Stanford Cars selects 40 weak classes;
40 stacked FastGAN states or 40 unrolled copies of the step are more than one program should hold):
chunks run one after the other, their sizes are balanced (10 classes with chunk_size 8 -> 5 + 5,
not 8 + 2) and every chunk uses the same padded image capacity, so all chunks of one size share one
compiled program.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mdjax.errors import DataError


def prepare_class_images(images: np.ndarray, resolution: int, *, class_index: int = -1) -> np.ndarray:
  """Checks one class's images and resizes them to uint8 [N, R, R, 3] (PIL bicubic)."""
  images = np.asarray(images)
  where = f"class {class_index}" if class_index >= 0 else "images"
  if images.dtype != np.uint8:
    raise DataError(f"{where}: expected uint8 images, got {images.dtype}. Convert with "
                    "np.clip(x * 255, 0, 255).astype(np.uint8) for images in [0, 1].")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(f"{where}: expected images [N, H, W, 3] (or grayscale [N, H, W]), got shape "
                    f"{images.shape}.")
  if len(images) == 0:
    raise DataError(f"{where}: no images; a class GAN needs at least one training image.")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.shape[1:3] != (resolution, resolution):
    images = np.stack([
        np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC))
        for im in images])
  return np.ascontiguousarray(images)


def is_grey(images: np.ndarray) -> bool:
  """Whether every image of uint8 [N, H, W, 3] is grey (its three channels equal)."""
  return bool(np.all(images[..., :1] == images[..., 1:]))


def stack_class_images(images_per_class: Sequence[np.ndarray],
                       capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-class uint8 [N_k, R, R, 3] -> (uint8 [K, capacity, R, R, 3] zero-padded, int32 counts [K])."""
  counts = np.asarray([len(x) for x in images_per_class], np.int32)
  capacity = int(capacity or counts.max())
  shape = images_per_class[0].shape[1:]
  stacked = np.zeros((len(images_per_class), capacity) + shape, np.uint8)
  for k, x in enumerate(images_per_class):
    stacked[k, :len(x)] = x
  return stacked, counts


def batch_indices(key: jax.Array, count: jax.Array, capacity: int, batch_size: int) -> jax.Array:
  """`batch_size` indices in [0, count): a random subset (wrapping when count < batch_size).

  Written by hand because `jax.random.choice(replace=False)` needs a static population size, and
  the count differs per class inside one vmapped/mapped/unrolled program. Image i gets the score
  `uniform(fold_in(key, i))`, which does not depend on `capacity`, so a class draws the same
  batches whatever the other classes' sizes (its result does not depend on its chunk).
  """
  scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(capacity))
  scores = jnp.where(jnp.arange(capacity) < count, scores, 2.0)  # padding sorts last
  order = jnp.argsort(scores)
  return order[jnp.arange(batch_size) % jnp.maximum(count, 1)]


def balanced_chunks(class_indices: Sequence[int], chunk_size: int) -> list[list[int]]:
  """Splits classes into ceil(K / chunk_size) chunks whose sizes differ by at most one."""
  n = math.ceil(len(class_indices) / chunk_size)
  base, extra = divmod(len(class_indices), n)
  chunks, start = [], 0
  for j in range(n):
    size = base + (j < extra)
    chunks.append(list(class_indices[start:start + size]))
    start += size
  return chunks


def fingerprint(images: np.ndarray) -> str:
  """A short digest of a class's images: which data a checkpoint was trained on."""
  return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
