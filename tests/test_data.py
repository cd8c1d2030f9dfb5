"""Dataset sources on small data made here (including corrupt files of each kind)."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from mdjax import config as config_lib
from mdjax.data import registry, tfds_source
from mdjax.errors import DataError


def data_config(**overrides):
  config = config_lib.base_config().data
  for k, v in overrides.items():
    config[k] = v
  return config


def write_image(path, color, size=(20, 16), mode="RGB", fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.new("RGB", size, color)
  if mode != "RGB":
    img = img.convert(mode)
  img.save(path, format=fmt)


def make_class_folders(root, classes=("ant", "bee", "cat"), per_class=6, start=0):
  for ci, c in enumerate(classes):
    for i in range(per_class):
      write_image(os.path.join(root, c, f"{start + i}.png"), (40 * ci, 10 * i, 200))


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------

def test_digits_splits_are_stratified_disjoint_and_reproducible():
  cfg = data_config(name="digits", image_size=32, val_fraction=0.15, test_fraction=0.25)
  a, b = registry.load_splits(cfg), registry.load_splits(cfg)
  assert a.num_classes == 10 and a.class_names[3] == "3"
  assert len(a.train) + len(a.val) + len(a.test) == 1797
  for name in ("train", "val", "test"):
    counts = np.bincount(getattr(a, name).labels, minlength=10)
    share = counts / counts.sum()
    assert np.all(np.abs(share - 0.1) < 0.02), (name, counts)  # stratified
    np.testing.assert_array_equal(getattr(a, name).labels, getattr(b, name).labels)
  # Native 8x8 (grey as RGB); the input pipeline and the GANs resize to their own sizes.
  image = a.train[0]["image"]
  assert image.shape == (8, 8, 3) and image.dtype == np.uint8
  assert np.array_equal(image[..., 0], image[..., 2]) and image.max() > 200
  other = registry.load_splits(data_config(name="digits", split_seed=1))
  assert not np.array_equal(other.test.labels, a.test.labels)


def test_max_train_per_class_limits_only_the_training_split():
  full = registry.load_splits(data_config(name="digits"))
  limited = registry.load_splits(data_config(name="digits", max_train_per_class=20))
  again = registry.load_splits(data_config(name="digits", max_train_per_class=20))
  assert np.bincount(limited.train.labels, minlength=10).tolist() == [20] * 10
  np.testing.assert_array_equal(limited.train.labels, again.train.labels)  # seeded
  assert all(np.array_equal(limited.train[i]["image"], again.train[i]["image"]) for i in range(200))
  # A subset of the full training split, drawn across each class (not its first 20 images).
  full_images = {full.train[i]["image"].tobytes() for i in range(len(full.train))}
  assert all(limited.train[i]["image"].tobytes() in full_images for i in range(200))
  for name in ("val", "test"):
    np.testing.assert_array_equal(getattr(limited, name).labels, getattr(full, name).labels)
  first20 = np.concatenate([np.flatnonzero(full.train.labels == c)[:20] for c in range(10)])
  assert set(limited.train.indices.tolist()) != set(first20.tolist())


def test_digits_split_indices_are_disjoint():
  splits = registry.load_splits(data_config(name="digits"))
  test_idx = set(splits.test.indices.tolist())
  # train and val are views on the non-test part: map them back to indices of the full set
  rest = splits.train.parent
  train_idx = set(rest.indices[splits.train.indices].tolist())
  val_idx = set(rest.indices[splits.val.indices].tolist())
  assert not (train_idx & val_idx) and not (train_idx & test_idx) and not (val_idx & test_idx)
  assert len(train_idx | val_idx | test_idx) == 1797


# ---------------------------------------------------------------------------------------------
# image folders with bad files
# ---------------------------------------------------------------------------------------------

def make_corrupt_files(folder):
  """One file of each broken kind, all with image extensions."""
  os.makedirs(folder, exist_ok=True)
  open(os.path.join(folder, "empty.jpg"), "wb").close()
  with open(os.path.join(folder, "notes.png"), "w") as fh:
    fh.write("this is not an image")
  good = os.path.join(folder, "tmp_full.jpg")
  write_image(good, (90, 20, 20), size=(64, 64))
  data = open(good, "rb").read()
  os.remove(good)
  with open(os.path.join(folder, "truncated.jpg"), "wb") as fh:
    fh.write(data[: len(data) // 2])


def test_folder_converts_colour_modes_and_skips_bad_files(tmp_path, caplog):
  root = tmp_path / "ds"
  make_class_folders(root, per_class=5)
  write_image(str(root / "ant" / "grey.png"), (100, 100, 100), mode="L")
  write_image(str(root / "ant" / "cmyk.jpg"), (10, 200, 30), mode="CMYK", fmt="JPEG")
  rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
  rgba.save(root / "bee" / "rgba.png")
  write_image(str(root / "bee" / "palette.png"), (0, 0, 255), mode="P")
  make_corrupt_files(str(root / "cat"))
  splits = registry.load_splits(data_config(name="folder", root=str(root), val_fraction=0.2,
                                            test_fraction=0.2))
  assert splits.class_names == ["ant", "bee", "cat"]
  total = len(splits.train) + len(splits.val) + len(splits.test)
  assert total == 15 + 4  # 3 corrupt files skipped
  assert "Skipping 3 unreadable image file(s)" in caplog.text and "empty.jpg" in caplog.text
  from mdjax.data import images
  assert images.load_rgb(str(root / "ant" / "grey.png")).shape == (16, 20, 3)
  assert images.load_rgb(str(root / "ant" / "cmyk.jpg")).shape == (16, 20, 3)
  np.testing.assert_array_equal(images.load_rgb(str(root / "bee" / "rgba.png"))[0, 0], [255, 255, 255])
  assert images.load_rgb(str(root / "bee" / "palette.png"))[0, 0, 2] > 200
  for split in (splits.train, splits.val, splits.test):
    for i in range(len(split)):
      element = split[i]
      assert element["image"].ndim == 3 and element["image"].shape[-1] == 3


def test_strict_mode_fails_on_the_first_bad_file(tmp_path):
  root = tmp_path / "ds"
  make_class_folders(root)
  make_corrupt_files(str(root / "bee"))
  with pytest.raises(DataError, match=r"unreadable image .*bee.*3 bad file"):
    registry.load_splits(data_config(name="folder", root=str(root), strict=True))


def test_class_folder_without_usable_image_is_named(tmp_path):
  root = tmp_path / "ds"
  make_class_folders(root)
  make_corrupt_files(str(root / "dog"))
  with pytest.raises(DataError, match=r"dog has no usable image"):
    registry.load_splits(data_config(name="folder", root=str(root)))


def test_folder_with_split_directories(tmp_path):
  root = tmp_path / "ds"
  make_class_folders(root / "train", per_class=8)
  make_class_folders(root / "test", per_class=3)
  splits = registry.load_splits(data_config(name="folder", root=str(root), val_fraction=0.25))
  assert len(splits.test) == 9 and len(splits.train) + len(splits.val) == 24
  assert np.all(np.bincount(splits.val.labels) == 2)
  make_class_folders(root / "val", per_class=1)
  splits = registry.load_splits(data_config(name="folder", root=str(root)))
  assert len(splits.val) == 3 and len(splits.test) == 9 and len(splits.train) == 24


def test_folder_requires_root(tmp_path):
  with pytest.raises(DataError, match="needs --config.data.root"):
    registry.load_splits(data_config(name="folder"))
  with pytest.raises(DataError, match="not found"):
    registry.load_splits(data_config(name="folder", root=str(tmp_path / "nothing")))


def test_cars_kaggle_layout(tmp_path):
  root = tmp_path / "cars"
  inner = root / "car_data" / "car_data"
  make_class_folders(inner / "train", classes=("AM General Hummer SUV 2000", "Acura RL Sedan 2012"))
  make_class_folders(inner / "test", classes=("AM General Hummer SUV 2000", "Acura RL Sedan 2012"),
                     per_class=2)
  splits = registry.load_splits(data_config(name="cars", root=str(root)))
  assert splits.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
  assert len(splits.test) == 4


def test_missing_cars_message(tmp_path, monkeypatch):
  monkeypatch.setenv(registry.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(DataError) as info:
    registry.load_splits(data_config(name="cars"))
  message = str(info.value)
  assert str(tmp_path / "cars") in message and "car_data.zip" in message and "--config.data.root" in message


def test_heritage_and_caltech_folders(tmp_path):
  make_class_folders(tmp_path / "heritage" / "train", classes=("altar", "apse", "dome"))
  make_class_folders(tmp_path / "heritage" / "test", classes=("altar", "apse", "dome"), per_class=2)
  heritage = registry.load_splits(data_config(name="heritage", root=str(tmp_path / "heritage")))
  assert heritage.class_names == ["altar", "apse", "dome"] and len(heritage.test) == 6

  cal = tmp_path / "caltech" / "101_ObjectCategories"
  make_class_folders(cal, classes=("BACKGROUND_Google", "accordion", "airplanes"), per_class=10)
  caltech = registry.load_splits(data_config(name="caltech101", root=str(tmp_path / "caltech")))
  assert caltech.class_names == ["accordion", "airplanes"]  # the clutter class is not a class
  assert len(caltech.train) + len(caltech.val) + len(caltech.test) == 20


def test_missing_caltech_and_cifar_messages(tmp_path):
  with pytest.raises(DataError, match=r"101_ObjectCategories.*tfds build caltech101"):
    registry.load_splits(data_config(name="caltech101", root=str(tmp_path)))
  with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz.*tfds build cifar10"):
    registry.load_splits(data_config(name="cifar10", root=str(tmp_path)))


def test_cifar10_through_tfds_data_source():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=40):
    splits = tfds_source.load("cifar10", "/nonexistent", data_config(name="cifar10"))
  assert splits.num_classes == 10
  assert len(splits.test) == 40 and len(splits.train) + len(splits.val) == 40
  element = splits.train[0]
  assert element["image"].shape == (32, 32, 3) and element["image"].dtype == np.uint8


def test_ham10000_splits_by_lesion(tmp_path):
  root = tmp_path / "ham"
  rows = []
  for i in range(70):
    dx = registry.HAM_CLASSES[i % 7]
    lesion = f"HAM_{i // 2:07d}" if i < 28 else f"HAM_{i:07d}"  # some lesions have two photos
    dx = registry.HAM_CLASSES[(i // 2) % 7] if i < 28 else dx
    image_id = f"ISIC_{i:07d}"
    part = "HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2"
    write_image(str(root / part / f"{image_id}.jpg"), (i, 100, 50), fmt="JPEG")
    rows.append({"lesion_id": lesion, "image_id": image_id, "dx": dx})
  with open(root / "HAM10000_metadata.csv", "w", newline="") as fh:
    writer = csv.DictWriter(fh, ["lesion_id", "image_id", "dx"])
    writer.writeheader()
    writer.writerows(rows)
  splits = registry.load_splits(data_config(name="ham10000", root=str(root)))
  assert splits.class_names == registry.HAM_CLASSES
  lesion_of = {r["image_id"]: r["lesion_id"] for r in rows}
  seen = {}
  for name in ("train", "val", "test"):
    for p in getattr(splits, name).paths:
      lesion = lesion_of[os.path.splitext(os.path.basename(p))[0]]
      assert seen.setdefault(lesion, name) == name  # a lesion never straddles two splits
  assert sum(len(getattr(splits, n)) for n in ("train", "val", "test")) == 70
  with pytest.raises(DataError, match="HAM10000_metadata.csv"):
    registry.load_splits(data_config(name="ham10000", root=str(tmp_path / "none")))
