"""The dataset registry: `config.data.name` -> train / val / test splits with class names.

Each loader is a function registered under its dataset's name; adding a dataset is adding one
function. Loaders never download: where data is missing they raise a DataError that says where
mdjax looked and how to obtain and place the data.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from mdjax.data import images as image_io
from mdjax.data import tfds_source
from mdjax.data.sources import ArraySource, FileSource, Source, Splits, carve, stratified_split
from mdjax.errors import DataError

# `config.data.name` -> its loader; filled by @register below, in the order the loaders appear.
DATASETS: dict[str, Callable[[ml_collections.ConfigDict], Splits]] = {}

# Where a dataset is looked for when config.data.root is empty.
DATA_DIR_ENV = "MDJAX_DATA_DIR"


def register(name: str):
  def wrap(fn):
    DATASETS[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  return sorted(DATASETS)


def load_splits(data_config: ml_collections.ConfigDict) -> Splits:
  """Loads `data_config.name`; every split is non-empty and labels index `class_names`."""
  if data_config.name not in DATASETS:
    raise DataError(f"unknown dataset {data_config.name!r}; registered: {', '.join(names())}")
  splits = DATASETS[data_config.name](data_config)
  if splits.num_classes < 2:
    raise DataError(f"dataset {data_config.name!r} has {splits.num_classes} class "
                    f"({', '.join(splits.class_names) or 'none'}); a classifier needs at least two, "
                    "and mistake-driven training compares them. Add the other classes' folders.")
  if data_config.max_train_per_class:
    splits.train = limit_per_class(splits.train, int(data_config.max_train_per_class),
                                   int(data_config.split_seed))
  for name in ("train", "val", "test"):
    if len(getattr(splits, name)) == 0:
      raise DataError(f"dataset {data_config.name!r} has an empty {name} split "
                      f"(data.val_fraction={data_config.val_fraction}, "
                      f"data.test_fraction={data_config.test_fraction}); add data or change the fractions.")
  return splits


# The case this method is for, said once at the start of a run: a class with fewer training images
# than FEW_IMAGES (a GAN cannot learn it; FastGAN's authors report distorted results below ~20),
# or a largest class more than IMBALANCE times the smallest.
FEW_IMAGES, IMBALANCE = 10, 20


def imbalance(splits: Splits) -> str | None:
  """One line about a training split with very few images in a class or classes of very different
  sizes, or None."""
  counts = splits.train.class_counts(splits.num_classes)
  small = int(np.argmin(counts))
  notes = []
  if counts[small] < FEW_IMAGES:
    few = [splits.class_names[k] for k in np.flatnonzero(counts < FEW_IMAGES)]
    notes.append(f"{len(few)} class(es) have fewer than {FEW_IMAGES} training images "
                 f"({', '.join(few[:5])}{', ...' if len(few) > 5 else ''}): a class GAN cannot "
                 "learn from so few, and its accuracy figures move by whole images")
  if counts.max() > IMBALANCE * max(counts[small], 1):
    big = int(np.argmax(counts))
    notes.append(f"the largest class ({splits.class_names[big]}, {counts[big]} images) has more "
                 f"than {IMBALANCE}x the smallest ({splits.class_names[small]}, {counts[small]}): "
                 "fine-tuning shifts the classifier towards the classes that get generated images")
  return "; ".join(notes) if notes else None


def limit_per_class(source: Source, max_per_class: int, seed: int) -> Source:
  """At most `max_per_class` examples of every class, drawn at random (seeded) within each class.

  The limited-data regime (`data.max_train_per_class`): only the training split shrinks, so
  validation and test accuracy stay comparable with a full-data run on the same split.
  """
  rng = np.random.default_rng([seed, max_per_class])
  keep = []
  for c in np.unique(source.labels):
    idx = np.flatnonzero(source.labels == c)
    keep.append(idx if len(idx) <= max_per_class else rng.choice(idx, max_per_class, replace=False))
  return source.subset(np.sort(np.concatenate(keep)))


def default_root(name: str) -> str:
  base = os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), "mdjax_data")
  return os.path.join(base, name)


def _root(data_config, name: str) -> str:
  return os.path.abspath(os.path.expanduser(data_config.root or default_root(name)))


# ----------------------------------------------------------------------------------------------
# digits: the embedded default.
# ----------------------------------------------------------------------------------------------

@register("digits")
def load_digits(data_config) -> Splits:
  """scikit-learn's 1,797 real 8x8 handwritten digits as 8x8 RGB.

  Kept at their native size: the classifier's input pipeline and the GANs each resize them once to
  their own resolution (data.image_size, gan.resolution).
  """
  # Imported here: scikit-learn takes about a second to import, and only this dataset needs it.
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top

  digits = sk_digits()
  grey = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
  src = ArraySource(np.repeat(grey[..., None], 3, axis=-1), digits.target)
  train, val, test = carve(src, None, data_config)
  return Splits(train, val, test, [str(i) for i in range(10)], origin="scikit-learn load_digits")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: the four original idx files (real 28x28 grey photos of clothes, 10 classes).
# ----------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Where Debian's `dataset-fashion-mnist` package puts the files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
  """An idx file (LeCun's MNIST format, optionally gzipped) as a numpy array.

  The format: two zero bytes, a type byte (0x08 = uint8, the only one these datasets use), the
  number of dimensions, then each dimension as a big-endian uint32, then the data. Read with numpy
  because the format is four header fields; no extra dependency is worth that.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as fh:
      raw = fh.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read {path} ({e}); replace the file with an intact copy.") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DataError(f"{path} is not an idx file of uint8 data (its header bytes are "
                    f"{raw[:4].hex()}); expected the original Fashion-MNIST/MNIST files.")
  ndim = raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
  data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=header)
  if data.size != int(np.prod(shape)):
    raise DataError(f"{path} is truncated: its header promises shape {shape} "
                    f"({int(np.prod(shape))} values) but it holds {data.size}; replace the file.")
  return data.reshape(shape)


def _idx_file(folder: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


@register("fashion_mnist")
def load_fashion_mnist(data_config) -> Splits:
  """Fashion-MNIST (Xiao et al. 2017) from its four idx files: 60,000 training and 10,000 test
  images, 28x28 grey, kept at their native size (as RGB with equal channels).

  Looked for in `data.root`, else ~/mdjax_data/fashion_mnist ($MDJAX_DATA_DIR), then Debian's
  /usr/share/datasets/fashion-mnist. Validation is carved from the training images.
  """
  looked = ([_root(data_config, "fashion_mnist")] if data_config.root else
            [_root(data_config, "fashion_mnist"), FASHION_MNIST_SYSTEM_DIR])
  for folder in looked:
    found = {split: [_idx_file(folder, stem) for stem in stems]
             for split, stems in FASHION_MNIST_FILES.items()}
    if all(all(paths) for paths in found.values()):
      break
  else:
    raise _missing(
        "Fashion-MNIST", looked,
        "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
        "files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz from github.com/zalandoresearch/fashion-mnist in one folder.")
  sources = {}
  for split, (images_path, labels_path) in found.items():
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise DataError(f"{images_path} and {labels_path} do not pair up: images {images.shape}, "
                      f"labels {labels.shape}; expected [N, H, W] images and [N] labels.")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
      raise DataError(f"{labels_path} has label {labels.max()}; Fashion-MNIST labels are 0-9.")
    sources[split] = ArraySource(np.repeat(images[..., None], 3, axis=-1), labels)
  train, val, test = carve(sources["train"], sources["test"], data_config)
  return Splits(train, val, test, list(FASHION_MNIST_CLASSES), origin=os.path.dirname(images_path))


# ----------------------------------------------------------------------------------------------
# Image folders: generic, Stanford Cars, Architectural Heritage, Caltech-101's folder.
# ----------------------------------------------------------------------------------------------

def _class_dirs(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder)
                if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def scan_class_folders(folder: str, data_config, class_names: list[str] | None = None,
                       exclude: tuple[str, ...] = ()) -> tuple[FileSource, list[str]]:
  """`folder/<class>/<image>` -> a FileSource with the files that decode; classes sorted by name."""
  names_here = [c for c in _class_dirs(folder) if c not in exclude]
  class_names = class_names or names_here
  index = {c: i for i, c in enumerate(class_names)}
  unknown = sorted(set(names_here) - set(index))
  if unknown:
    raise DataError(f"{folder} has class folders {unknown[:5]} that the train split does not have; "
                    "every split must use the same class folder names.")
  paths, labels = [], []
  for c in names_here:
    cdir = os.path.join(folder, c)
    for root, _, files in os.walk(cdir):
      for f in sorted(files):
        if image_io.is_image_file(f) or os.path.getsize(os.path.join(root, f)) == 0:
          paths.append(os.path.join(root, f))
          labels.append(index[c])
  ok = image_io.check_files(paths, strict=data_config.strict, what=folder,
                            num_threads=max(2, data_config.num_threads))
  paths = [p for p, good in zip(paths, ok) if good]
  labels = [lab for lab, good in zip(labels, ok) if good]
  present = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
  empty = [class_names[i] for i in range(len(class_names)) if class_names[i] in names_here and present[i] == 0]
  if empty:
    raise DataError(f"class folder {os.path.join(folder, empty[0])} has no usable image "
                    f"({len(empty)} such class folder(s)); add images or remove the folder.")
  return FileSource(paths, labels), class_names


SPLIT_DIR_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
                   "test": ("test", "testing")}


def _find_split_dir(root: str, split: str) -> str | None:
  for name in SPLIT_DIR_NAMES[split]:
    path = os.path.join(root, name)
    if os.path.isdir(path):
      return path
  return None


def load_folder_splits(root: str, data_config, origin: str, exclude: tuple[str, ...] = ()) -> Splits:
  """`root/{train,val,test}/<class>/*` where present; a flat `root/<class>/*` is split stratified."""
  train_dir = _find_split_dir(root, "train")
  if train_dir is None:
    train, class_names = scan_class_folders(root, data_config, exclude=exclude)
    train, val, test = carve(train, None, data_config)
    return Splits(train, val, test, class_names, origin=origin)
  train, class_names = scan_class_folders(train_dir, data_config, exclude=exclude)
  test_dir, val_dir = _find_split_dir(root, "test"), _find_split_dir(root, "val")
  test = scan_class_folders(test_dir, data_config, class_names, exclude)[0] if test_dir else None
  if val_dir:
    val = scan_class_folders(val_dir, data_config, class_names, exclude)[0]
    if test is None:
      rest, test_idx = stratified_split(train.labels, data_config.test_fraction, data_config.split_seed)
      train, test = train.subset(rest), train.subset(test_idx)
    return Splits(train, val, test, class_names, origin=origin)
  train, val, test = carve(train, test, data_config)
  return Splits(train, val, test, class_names, origin=origin)


def _has_class_folders(path: str) -> bool:
  if not os.path.isdir(path):
    return False
  return any(os.path.isdir(os.path.join(path, d)) for d in os.listdir(path) if not d.startswith("."))


def _missing(name: str, looked: list[str], how: str) -> DataError:
  where = ", ".join(looked)
  return DataError(f"{name} not found (looked in {where}). {how} "
                   f"Pass the folder with --config.data.root=PATH or set ${DATA_DIR_ENV}.")


@register("folder")
def load_folder(data_config) -> Splits:
  """Your own data: `root/<class>/*.jpg|png` or `root/{train,val,test}/<class>/...`."""
  if not data_config.root:
    raise DataError("data.name='folder' needs --config.data.root=PATH, a folder laid out as "
                    "PATH/<class>/<images> or PATH/{train,val,test}/<class>/<images>.")
  root = _root(data_config, "folder")
  if not _has_class_folders(root):
    raise _missing("image folder dataset", [root],
                   "Lay it out as ROOT/<class>/<images> or ROOT/{train,val,test}/<class>/<images>.")
  return load_folder_splits(root, data_config, origin=root)


@register("cars")
def load_cars(data_config) -> Splits:
  """Stanford Cars in the class-folder layout of the common Kaggle re-packs.

  tfds' cars196 cannot be used: its download URLs have been dead since 2023.
  """
  root = _root(data_config, "cars")
  candidates = [root, os.path.join(root, "car_data"), os.path.join(root, "car_data", "car_data")]
  for c in candidates:
    if _find_split_dir(c, "train") and _has_class_folders(_find_split_dir(c, "train")):
      return load_folder_splits(c, data_config, origin=c)
  raise _missing(
      "Stanford Cars", candidates,
      "Download the Kaggle dataset 'Stanford Car Dataset by classes folder' (jutrera/"
      "stanford-car-dataset-by-classes-folder, archive car_data.zip; e.g. `kaggle datasets download "
      "-d jutrera/stanford-car-dataset-by-classes-folder`) and unzip it so that "
      "ROOT/car_data/car_data/train/<class>/*.jpg and .../test/<class>/*.jpg exist.")


@register("heritage")
def load_heritage(data_config) -> Splits:
  """Architectural Heritage Elements (10 classes), the 128x128 version, as class folders."""
  root = _root(data_config, "heritage")
  candidates = [root, os.path.join(root, "dataset"), os.path.join(root, "Dataset")]
  for c in candidates:
    if _has_class_folders(c):
      return load_folder_splits(c, data_config, origin=c)
  raise _missing(
      "Architectural Heritage Elements", candidates,
      "Download the 128x128 version of the Architectural Heritage Elements dataset (Llamas et al. "
      "2017; e.g. Kaggle 'ikobzev/architectural-heritage-elements-image64-dataset' or the authors' "
      "archive) and unzip it so that ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg exist "
      "(or ROOT/<class>/*.jpg, which mdjax splits).")


@register("caltech101")
def load_caltech101(data_config) -> Splits:
  """Caltech-101 from a tfds-prepared data dir, or from the extracted 101_ObjectCategories folder.

  The folder's BACKGROUND_Google clutter class is left out: the paper counts 101 classes.
  """
  root = _root(data_config, "caltech101")
  for c in (root, os.path.join(root, "101_ObjectCategories"),
            os.path.join(root, "caltech-101", "101_ObjectCategories")):
    if _has_class_folders(c) and os.path.isdir(os.path.join(c, "accordion")):
      return load_folder_splits(c, data_config, origin=c, exclude=("BACKGROUND_Google",))
  if tfds_source.is_prepared("caltech101", root):
    return tfds_source.load("caltech101", root, data_config)
  raise _missing(
      "Caltech-101", [root, os.path.join(root, "101_ObjectCategories")],
      "Either extract caltech-101.zip (data.caltech.edu/records/mzrjq-6wc02) so that "
      "ROOT/101_ObjectCategories/<class>/*.jpg exists, or prepare it with tfds: put caltech-101.zip "
      "in ROOT/downloads/manual/ and run `tfds build caltech101 --data_dir=ROOT` (needs tensorflow).")


@register("cifar10")
def load_cifar10(data_config) -> Splits:
  """CIFAR-10 through `tfds.data_source` from a prepared tfds data dir (ArrayRecord)."""
  root = os.path.abspath(os.path.expanduser(
      data_config.root or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"))
  if tfds_source.is_prepared("cifar10", root):
    return tfds_source.load("cifar10", root, data_config)
  raise _missing(
      "CIFAR-10 (tfds 'cifar10', ArrayRecord)", [os.path.join(root, "cifar10")],
      "Put cifar-10-binary.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) in "
      "ROOT/downloads/manual/ and run `pip install tensorflow && tfds build cifar10 "
      "--data_dir=ROOT --file_format=array_record`.")


# ----------------------------------------------------------------------------------------------
# HAM10000: metadata CSV + image folders.
# ----------------------------------------------------------------------------------------------

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@register("ham10000")
def load_ham10000(data_config) -> Splits:
  """HAM10000 in the Kaggle layout; split by lesion so one lesion's photos never straddle splits."""
  root = _root(data_config, "ham10000")
  meta = os.path.join(root, "HAM10000_metadata.csv")
  if not os.path.isfile(meta):
    raise _missing(
        "HAM10000", [meta],
        "Download the Kaggle dataset 'kmader/skin-cancer-mnist-ham10000' and unzip it so that "
        "ROOT/HAM10000_metadata.csv and ROOT/HAM10000_images_part_1/*.jpg (and part_2) exist.")
  by_id = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      if image_io.is_image_file(f):
        by_id[os.path.splitext(f)[0]] = os.path.join(dirpath, f)
  rows = []
  with open(meta, newline="") as fh:
    reader = csv.DictReader(fh)
    missing_cols = {"image_id", "dx", "lesion_id"} - set(reader.fieldnames or ())
    if missing_cols:
      raise DataError(f"{meta} lacks column(s) {sorted(missing_cols)}; expected the HAM10000 "
                      "metadata with lesion_id, image_id and dx.")
    for row in reader:
      if row["dx"] not in HAM_CLASSES:
        raise DataError(f"{meta}: unknown diagnosis {row['dx']!r} for {row['image_id']}; "
                        f"expected one of {HAM_CLASSES}.")
      rows.append(row)
  absent = [r["image_id"] for r in rows if r["image_id"] not in by_id]
  if absent:
    logging.warning("HAM10000: %d image(s) listed in the metadata are missing, e.g. %s",
                    len(absent), absent[:3])
  rows = [r for r in rows if r["image_id"] in by_id]
  paths = [by_id[r["image_id"]] for r in rows]
  ok = image_io.check_files(paths, strict=data_config.strict, what=root,
                            num_threads=max(2, data_config.num_threads))
  rows = [r for r, good in zip(rows, ok) if good]
  if not rows:
    raise DataError(f"no usable HAM10000 image under {root}.")
  # Split lesions, not images: each lesion is one example for stratification (all its images share dx).
  lesions = sorted({r["lesion_id"] for r in rows})
  lesion_dx = {r["lesion_id"]: HAM_CLASSES.index(r["dx"]) for r in rows}
  lesion_labels = np.array([lesion_dx[les] for les in lesions])
  rest, test_l = stratified_split(lesion_labels, data_config.test_fraction, data_config.split_seed)
  train_l, val_l = (rest[i] for i in stratified_split(lesion_labels[rest], data_config.val_fraction,
                                                      data_config.split_seed + 1))
  which = {}
  for name, idx in (("train", train_l), ("val", val_l), ("test", test_l)):
    for i in idx:
      which[lesions[i]] = name

  def split(name):
    sel = [r for r in rows if which[r["lesion_id"]] == name]
    return FileSource([by_id[r["image_id"]] for r in sel], [HAM_CLASSES.index(r["dx"]) for r in sel])

  return Splits(split("train"), split("val"), split("test"), list(HAM_CLASSES), origin=root)
