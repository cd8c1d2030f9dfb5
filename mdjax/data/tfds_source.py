"""Datasets prepared by tensorflow-datasets, read as random-access ArrayRecord sources.

`tfds.data_source` needs no TensorFlow to read (building the dataset does). tfds' SkipDecoding
would spare decoding while the labels are scanned, but it needs TensorFlow, so labels are read
with the images once, up front.
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
from PIL import Image

from mdjax.data import images as image_io
from mdjax.data.sources import Source, Splits, carve
from mdjax.errors import DataError

# Which tfds split plays which role; a missing val split is carved from train.
SPLITS = {"cifar10": ("train", None, "test"), "caltech101": ("train", None, "test")}


def is_prepared(name: str, data_dir: str) -> bool:
  return bool(glob.glob(os.path.join(data_dir, name, "*", "*", "dataset_info.json")) or
              glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json")))


class TfdsSource(Source):
  """One tfds split; `labels` are read once up front."""

  def __init__(self, data_source):
    self._ds = data_source
    self.labels = np.asarray([int(self._ds[i]["label"]) for i in range(len(self._ds))], np.int32)

  def load_image(self, index: int) -> np.ndarray:
    image = self._ds[index]["image"]
    if isinstance(image, (bytes, np.bytes_)):
      with Image.open(io.BytesIO(image)) as img:
        return np.asarray(image_io.to_rgb(img), np.uint8)
    image = np.asarray(image, np.uint8)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def load(name: str, data_dir: str, data_config) -> Splits:
  # Imported here: tensorflow_datasets takes over a second to import, and only tfds-prepared
  # datasets need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  train_split, val_split, test_split = SPLITS[name]
  try:
    sources = {s: tfds.data_source(name, split=s, data_dir=data_dir)
               for s in (train_split, val_split, test_split) if s}
    info = tfds.builder(name, data_dir=data_dir).info
  except Exception as e:  # tfds raises many kinds for an unprepared or half-prepared dir
    raise DataError(f"cannot read tfds dataset {name!r} from {data_dir}: {e}. Prepare it with "
                    f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`.") from None
  class_names = list(info.features["label"].names)
  train = TfdsSource(sources[train_split])
  test = TfdsSource(sources[test_split])
  if val_split is None:
    train, val, test = carve(train, test, data_config)
  else:
    val = TfdsSource(sources[val_split])
  return Splits(train, val, test, class_names, origin=os.path.join(data_dir, name))
