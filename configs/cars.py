"""Stanford Cars (196 classes): 20 + 20 epochs, batch 20, nWPC = ceil(0.2 n) = 40, 224x224.

Reads the class-folder layout of the common Kaggle re-packs (`train/<class>/*.jpg`,
`test/<class>/*.jpg`); see README, "Data":

    python -m mdjax.main --config=configs/cars.py --config.data.root=/data/stanford_cars
    python -m mdjax.main --config=configs/cars.py:optimizer=adam,activation=gelu,backbone=efficientnet_b7
"""

from mdjax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "cars"
  config.data.image_size = 224
  config.data.augment = "resized_crop_flip"
  config.model.backbone = "wrn101"
  config.train.epochs = 20
  config.finetune.epochs = 20
  config.train.batch_size = 20
  config.gan.resolution = 256
  return config_lib.finalize(config, arg)
