"""Random-access sources of labelled images, and the splits a dataset is made of.

A source is anything with `__len__`, `__getitem__(i) -> {"image": uint8 [H, W, 3], "label": int}`
and a `labels` array; grain reads it directly. Labels are kept in memory so splits can be
stratified and a class's images found without decoding anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mdjax.data import images as image_io


@dataclasses.dataclass
class Splits:
  train: "Source"
  val: "Source"
  test: "Source"
  class_names: list[str]
  # Where the data came from, for the run summary (a folder, a tfds dir, "scikit-learn").
  origin: str = ""

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def summary(self) -> str:
    lines = [f"{len(self.class_names)} classes from {self.origin or 'memory'}"]
    for name in ("train", "val", "test"):
      src = getattr(self, name)
      counts = np.bincount(src.labels, minlength=self.num_classes)
      lines.append(f"  {name:5s} {len(src):7d} images, per class {counts.min()}-{counts.max()}")
    return "\n".join(lines)


class Source:
  """Base class: subclasses provide `labels` and `load_image(i)`."""

  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def load_image(self, index: int) -> np.ndarray:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    return {"image": self.load_image(index), "label": int(self.labels[index])}

  def subset(self, indices: Sequence[int] | np.ndarray) -> "Subset":
    return Subset(self, np.asarray(indices, dtype=np.int64))

  def class_counts(self, num_classes: int) -> np.ndarray:
    return np.bincount(self.labels, minlength=num_classes)


class ArraySource(Source):
  """Images held in memory as one uint8 [N, H, W, 3] array (digits, generated images, tests)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"ArraySource needs uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = np.asarray(labels, dtype=np.int32)

  def load_image(self, index: int) -> np.ndarray:
    return self.images[index]


class FileSource(Source):
  """Images decoded from files on demand; paths were checked when the dataset was scanned."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int]):
    if len(paths) != len(labels):
      raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
    self.paths = list(paths)
    self.labels = np.asarray(labels, dtype=np.int32)

  def load_image(self, index: int) -> np.ndarray:
    return image_io.load_rgb(self.paths[index])


class Subset(Source):
  """A view on some examples of another source."""

  def __init__(self, parent: Source, indices: np.ndarray):
    self.parent = parent
    self.indices = indices
    self.labels = parent.labels[indices]

  def load_image(self, index: int) -> np.ndarray:
    return self.parent.load_image(int(self.indices[index]))


class Concat(Source):
  """Several sources one after another (real + generated images for fine-tuning)."""

  def __init__(self, parts: Sequence[Source]):
    self.parts = [p for p in parts if len(p)]
    self.labels = (np.concatenate([p.labels for p in self.parts]).astype(np.int32)
                   if self.parts else np.zeros((0,), np.int32))
    self._starts = np.cumsum([0] + [len(p) for p in self.parts])

  def _locate(self, index: int) -> tuple[Source, int]:
    part = int(np.searchsorted(self._starts, index, side="right") - 1)
    return self.parts[part], index - int(self._starts[part])

  def load_image(self, index: int) -> np.ndarray:
    part, i = self._locate(int(index))
    return part.load_image(i)

  def __getitem__(self, index: int) -> dict:
    part, i = self._locate(int(index))
    return part[i]  # the part's own element: a Tagged part keeps its flag


class Tagged(Source):
  """`parent`'s examples with a "generated" flag (1.0 generated, 0.0 real) in every element, for
  the fine-tune's treatment of generated images (mdjax.train.steps.make_train_step)."""

  def __init__(self, parent: Source, generated: bool):
    self.parent, self.flag = parent, np.float32(1.0 if generated else 0.0)
    self.labels = parent.labels

  def load_image(self, index: int) -> np.ndarray:
    return self.parent.load_image(index)

  def __getitem__(self, index: int) -> dict:
    return {**super().__getitem__(index), "generated": self.flag}


def real_and_generated(real: Source, generated: Source) -> Concat:
  """The fine-tune's training set: the real images, then the generated ones, each tagged; its
  `generated` attribute is the flag of every example (bool [N])."""
  both = Concat([Tagged(real, False), Tagged(generated, True)])
  both.generated = np.concatenate([np.zeros(len(real), bool), np.ones(len(generated), bool)])
  return both


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices (rest, carved): `fraction` of every class carved out, at least one where possible.

  Written here rather than with sklearn's train_test_split because that one refuses classes with a
  single example and rounds per split, not per class; per-class rounding keeps small classes
  (Caltech-101 has 31-image classes) represented in every split.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  carved, rest = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    rng.shuffle(idx)
    n = int(round(fraction * len(idx)))
    if fraction > 0 and len(idx) >= 2:
      n = min(max(n, 1), len(idx) - 1)
    carved.append(idx[:n])
    rest.append(idx[n:])
  return np.sort(np.concatenate(rest)), np.sort(np.concatenate(carved))


def carve(train: Source, test: Source | None, data_config) -> tuple[Source, Source, Source]:
  """Adds the splits a source lacks: test from everything, then val from train, both stratified."""
  if test is None:
    rest, test_idx = stratified_split(train.labels, data_config.test_fraction, data_config.split_seed)
    train, test = train.subset(rest), train.subset(test_idx)
  rest, val_idx = stratified_split(train.labels, data_config.val_fraction, data_config.split_seed + 1)
  return train.subset(rest), train.subset(val_idx), test
