"""Input pipeline throughput (images/s): digits in memory, and a folder of JPEGs at 224x224.

    python benchmarks/input_pipeline.py [--images 512] [--batch 64] [--threads 2]
        [--digits-size 32 --digits-batch 64 --digits-augment crop] [--folder-size 224]

The digits case is the training stream of the default run (in memory, resized, augmented); the
folder dataset is written to a temporary directory from scikit-image's real photos, cut into
varied crops of 300-500 pixels and saved as JPEG, so decoding and resizing cost what they would on
real data. Prints one line per case and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image


def make_jpeg_folder(root: str, n: int, classes: int = 8) -> None:
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  photos = [skdata.chelsea(), skdata.astronaut(), skdata.coffee(), skdata.rocket()]
  rng = np.random.default_rng(0)
  for i in range(n):
    photo = photos[i % len(photos)]
    h, w = rng.integers(300, min(500, photo.shape[0]) + 1), rng.integers(300, min(500, photo.shape[1]) + 1)
    y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
    folder = os.path.join(root, f"class_{i % classes}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(photo[y:y + h, x:x + w]).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def measure(it, steps: int, batch: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(next(it))  # start-up (threads, first decode) is not throughput
  start = time.perf_counter()
  for _ in range(steps):
    b = next(it)
  jax.block_until_ready(b)
  return steps * batch / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--digits-size", type=int, default=32)
  parser.add_argument("--digits-batch", type=int, default=0, help="default: --batch")
  parser.add_argument("--digits-augment", default="crop")
  parser.add_argument("--folder-size", type=int, default=224)
  args = parser.parse_args()
  digits_batch = args.digits_batch or args.batch

  from mdjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mdjax.data import pipeline, registry  # pylint: disable=g-import-not-at-top

  results = {}
  cfg = config_lib.base_config().data
  digits = registry.load_splits(cfg)
  it = pipeline.train_batches(digits.train, batch_size=digits_batch, image_size=args.digits_size,
                              seed=0, augment=args.digits_augment, num_threads=args.threads)
  key = f"digits_{args.digits_size}_train_images_per_s"
  results[key] = measure(it, args.steps, digits_batch)
  print(f"digits {args.digits_size}x{args.digits_size} train ({args.digits_augment}), batch "
        f"{digits_batch}: {results[key]:.0f} images/s")

  with tempfile.TemporaryDirectory() as root:
    make_jpeg_folder(root, args.images)
    cfg.name, cfg.root, cfg.num_threads = "folder", root, args.threads
    start = time.perf_counter()
    splits = registry.load_splits(cfg)
    results["folder_scan_s"] = time.perf_counter() - start
    print(f"folder scan + check of {args.images} JPEGs: {results['folder_scan_s']:.2f} s")
    steps = min(args.steps, pipeline.steps_per_epoch(len(splits.train), args.batch) - 1)
    it = pipeline.train_batches(splits.train, batch_size=args.batch, image_size=args.folder_size,
                                seed=0, augment="resized_crop_flip", num_threads=args.threads)
    key, size = f"folder_{args.folder_size}_train_images_per_s", args.folder_size
    results[key] = measure(it, steps, args.batch)
    print(f"folder JPEG -> {size}x{size} train (decode, random resized crop, flip), batch "
          f"{args.batch}: {results[key]:.0f} images/s")
  results.update(threads=args.threads, batch=args.batch, digits_batch=digits_batch,
                 digits_size=args.digits_size, folder_size=args.folder_size, images=args.images,
                 cpus=os.cpu_count())
  print(json.dumps(results))


if __name__ == "__main__":
  main()
