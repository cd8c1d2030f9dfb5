"""Architectural Heritage Elements (10 classes, the 128x128 version): 20 + 20 epochs, batch 20,
nWPC = ceil(0.5 n) = 5.

    python -m mdjax.main --config=configs/heritage.py --config.data.root=/data/heritage
"""

from mdjax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "heritage"
  config.data.image_size = 128
  config.data.augment = "resized_crop_flip"
  config.model.backbone = "wrn101"
  config.train.epochs = 20
  config.finetune.epochs = 20
  config.train.batch_size = 20
  config.gan.resolution = 128
  return config_lib.finalize(config, arg)
