"""Caltech-101 (101 classes): 20 + 20 epochs, batch 28, nWPC = ceil(0.2 n) = 21, 224x224.

Reads a tfds-prepared caltech101 or the extracted `101_ObjectCategories` folder:

    python -m mdjax.main --config=configs/caltech101.py --config.data.root=/data/101_ObjectCategories
"""

from mdjax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "caltech101"
  config.data.image_size = 224
  config.data.augment = "resized_crop_flip"
  config.model.backbone = "wrn101"
  config.train.epochs = 20
  config.finetune.epochs = 20
  config.train.batch_size = 28
  config.gan.resolution = 256
  return config_lib.finalize(config, arg)
