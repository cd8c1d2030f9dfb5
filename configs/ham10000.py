"""HAM10000 dermoscopy (7 classes): 20 + 20 epochs, batch 28, nWPC = ceil(0.5 n) = 4, 224x224.

Reads the Kaggle layout (`HAM10000_metadata.csv` beside `HAM10000_images_part_1/2`):

    python -m mdjax.main --config=configs/ham10000.py --config.data.root=/data/ham10000
"""

from mdjax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "ham10000"
  config.data.image_size = 224
  config.data.augment = "resized_crop_flip"
  config.model.backbone = "wrn101"
  config.train.epochs = 20
  config.finetune.epochs = 20
  config.train.batch_size = 28
  config.gan.resolution = 256
  return config_lib.finalize(config, arg)
