"""Decoding image files into RGB uint8 arrays, and finding the files that cannot be decoded.

Real datasets contain zero-byte files, truncated downloads, stray non-images and odd colour modes
(grey, CMYK, RGBA, palette). Scanning decodes every file once (JPEGs at reduced scale through
PIL's draft mode, which still reads the whole stream and so still catches truncation) so a broken
file is found before training, not hours into it.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageFile

from mdjax.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# A truncated file must fail loudly, never decode as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode to RGB; transparency is composited onto white rather than dropped to black."""
  if img.mode == "RGB":
    return img
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA"):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")  # L, I;16, CMYK, YCbCr, P without transparency, ...


def load_rgb(path: str) -> np.ndarray:
  """Decodes one file to uint8 [H, W, 3]. Raises DataError naming the file if it cannot."""
  try:
    with Image.open(path) as img:
      img.load()
      return np.asarray(to_rgb(img), dtype=np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot decode image {path}: {e}. Remove or replace the file.") from None


def _check(path: str) -> str | None:
  """None if `path` decodes, else a short reason."""
  try:
    if os.path.getsize(path) == 0:
      return "empty file"
    with Image.open(path) as img:
      img.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still reading every byte
      img.load()
    return None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    return str(e) or type(e).__name__


def check_files(paths: Sequence[str], *, strict: bool, what: str, num_threads: int = 8) -> list[bool]:
  """Which of `paths` decode. Bad files are counted and named in one warning, or raise if strict."""
  # PIL releases the GIL while decoding, so threads give a real speed-up on big folders.
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    reasons = list(pool.map(_check, paths, chunksize=64))
  bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
  if bad and strict:
    path, reason = bad[0]
    raise DataError(f"unreadable image {path} ({reason}) in {what}; {len(bad)} bad file(s) in all. "
                    "Remove them, or set --config.data.strict=false to skip bad files with a warning.")
  if bad:
    named = "; ".join(f"{p} ({r})" for p, r in bad[:3])
    logging.warning("Skipping %d unreadable image file(s) in %s, e.g. %s", len(bad), what, named)
  return [r is None for r in reasons]


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def resize(image: np.ndarray, size: int, box: tuple[float, float, float, float] | None = None
           ) -> np.ndarray:
  """uint8 [H, W, 3] (or its region `box` = (left, top, right, bottom)) to uint8 [size, size, 3].

  Bilinear, antialiased when shrinking; cropping through PIL's `box` resamples the region once
  instead of cropping and then resizing.
  """
  if box is None and image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box),
                    dtype=np.uint8)


def center_box(height: int, width: int, fraction: float = 1.0) -> tuple[float, float, float, float]:
  """The centred square of side `fraction` x the shorter side, as a PIL box."""
  side = fraction * min(height, width)
  top, left = (height - side) / 2, (width - side) / 2
  return (left, top, left + side, top + side)


def center_crop(image: np.ndarray, size: int, fraction: float = 1.0) -> np.ndarray:
  """The centred square (`center_box`) resized to size x size: no squashing of non-square images."""
  return resize(image, size, center_box(image.shape[0], image.shape[1], fraction))
