"""Each weak class's images for its GAN: checked, resized, stacked and padded, and drawn as batches.

Moved out of mdjax.gan.ensemble; see that module's docstring ("Data").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
    from PIL import Image  # pylint: disable=import-outside-toplevel
    images = np.stack([
        np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC))
        for im in images])
  return np.ascontiguousarray(images)


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


