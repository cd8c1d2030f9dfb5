"""Does a judge the pipeline did not train recognise a run's generated images?

    python benchmarks/external_judge.py --generated=runs/<run>/generated --real=ROOT/train \
        [--heldout=ROOT/test] [--C=10] [--json=judge.json]

The pipeline judges its own class GANs (`gan.judge`) and stops them on that judgement, so its
figures are not an independent check. This script fits a scikit-learn `SVC` on the raw pixels of
the real images in `--real` (`<class>/<image>` folders), reports its accuracy on `--heldout`
(or on a stratified fifth of `--real` it holds back), and the share of each generated class's
images it assigns to that class, beside its recall of the class's real held-out images. Generated
images are matched to classes by name (`generated/index.json`), resized to the real images' size
and read as grey when every real image is grey. The last line printed is JSON (also `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _files(folder: str) -> list[str]:
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_SUFFIXES))


def read_folder(root: str) -> tuple[list[str], list[list[str]]]:
  """Class names (sorted sub-folders of `root`) and each class's image files."""
  if not os.path.isdir(root):
    raise SystemExit(f"external_judge: error: {root} is not a folder; expected <class>/<image> "
                     "sub-folders of real images")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  files = [_files(os.path.join(root, c)) for c in classes]
  if len(classes) < 2 or not all(files):
    raise SystemExit(f"external_judge: error: {root} needs at least two class sub-folders, each "
                     "with images")
  return classes, files


def read_rgb(files: list[str], size: tuple[int, int]) -> np.ndarray:
  """Images as uint8 [N, H, W, 3], resized (bilinear) to `size`; each file is read once."""
  rows = []
  for f in files:
    with Image.open(f) as image:
      rows.append(np.asarray(image.convert("RGB").resize(size, Image.BILINEAR)))
  return np.stack(rows)


def pixels(rgb: np.ndarray, grey: bool) -> np.ndarray:
  """Rows of pixels in [0, 1]: one channel when the data is grey (its channels are equal)."""
  x = rgb[..., :1] if grey else rgb
  return x.reshape(len(x), -1).astype(np.float32) / 255.0


def judge(generated: str, real: str, heldout: str | None = None, c: float = 10.0,
          seed: int = 0) -> dict:
  classes, files = read_folder(real)
  flat = [f for fs in files for f in fs]
  with Image.open(flat[0]) as first:
    size = first.size
  real_rgb = read_rgb(flat, size)
  grey = bool((real_rgb.max(-1) == real_rgb.min(-1)).all())
  mode = "L" if grey else "RGB"
  x = pixels(real_rgb, grey)
  y = np.concatenate([np.full(len(fs), k) for k, fs in enumerate(files)])
  if heldout:
    held_classes, held_files = read_folder(heldout)
    if held_classes != classes:
      raise SystemExit(f"external_judge: error: {heldout} has classes {held_classes}, {real} has "
                       f"{classes}; expected the same class folders")
    x_train, y_train = x, y
    x_held = pixels(read_rgb([f for fs in held_files for f in fs], size), grey)
    y_held = np.concatenate([np.full(len(fs), k) for k, fs in enumerate(held_files)])
  else:
    x_train, x_held, y_train, y_held = train_test_split(x, y, test_size=0.2, stratify=y,
                                                        random_state=seed)
  svc = SVC(C=c).fit(x_train, y_train)
  predicted = svc.predict(x_held)
  recall = {name: float(np.mean(predicted[y_held == k] == k)) for k, name in enumerate(classes)}
  index_path = os.path.join(generated, "index.json")
  if not os.path.isfile(index_path):
    raise SystemExit(f"external_judge: error: no {index_path}; expected a run's `generated` "
                     "folder (written by its generate stage)")
  with open(index_path) as f:
    index = json.load(f)
  per_class = {}
  for entry in index["images"]:
    per_class.setdefault(entry["class_name"], []).append(os.path.join(generated, entry["file"]))
  fractions = {}
  for name, gen_files in per_class.items():
    if name not in classes:
      raise SystemExit(f"external_judge: error: generated class {name!r} is not a folder of "
                       f"{real} ({', '.join(classes)})")
    assigned = svc.predict(pixels(read_rgb(gen_files, size), grey))
    fractions[name] = {"images": len(gen_files),
                       "judge_fraction": float(np.mean(assigned == classes.index(name))),
                       "real_recall": recall[name]}
  return {"judge": f"SVC(C={c}) on raw {mode} pixels at {size[0]}x{size[1]}",
          "train_images": int(len(y_train)), "heldout_images": int(len(y_held)),
          "heldout_accuracy": float(np.mean(predicted == y_held)), "classes": fractions}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--generated", required=True, help="a run's generated/ folder")
  parser.add_argument("--real", required=True, help="real images, <class>/<image>")
  parser.add_argument("--heldout", default=None, help="held-out real images, <class>/<image>")
  parser.add_argument("--C", type=float, default=10.0, help="the SVC's C")
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args()
  result = judge(args.generated, args.real, args.heldout, args.C)
  print(f"{result['judge']}, fit on {result['train_images']} real images: held-out accuracy "
        f"{result['heldout_accuracy']:.3f} on {result['heldout_images']}")
  for name, r in result["classes"].items():
    print(f"  {name}: {r['judge_fraction']:.3f} of {r['images']} generated images assigned to it "
          f"(its real held-out images: {r['real_recall']:.3f})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
