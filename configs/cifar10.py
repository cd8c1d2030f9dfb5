"""CIFAR-10 (32x32, 10 classes) as in the paper: 30 epochs, batch 28, nWPC = ceil(0.5 n) = 5.

Needs the tfds-prepared dataset (see README, "Data"):

    python -m mdjax.main --config=configs/cifar10.py --config.data.root=~/tensorflow_datasets
    python -m mdjax.main --config=configs/cifar10.py:optimizer=adam,activation=gelu
"""

from mdjax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.augment = "crop_flip"
  config.data.val_fraction = 0.1
  config.model.backbone = "wrn101"  # ImageNet-style trunk; give --config.model.weights for transfer
  config.train.epochs = 30
  config.finetune.epochs = 30
  config.train.batch_size = 28
  config.gan.resolution = 32
  return config_lib.finalize(config, arg)
