"""The embedded default: scikit-learn's real 8x8 handwritten digits, upsampled to 32x32 RGB.

No download; under 10 minutes on a 2-core CPU. A small CIFAR-style WRN-10-2 trunk stands in for
the ImageNet Wide-ResNet (no pretrained weights at 32x32; a WRN-16-4 SAM step takes seconds on such
a CPU), with the paper's Progressive SpinalNet head, SELU and SAM. The class GANs run 200 steps
with gan.ensemble=auto: `lax.map` over the classes on CPU, as fast as separate programs and
compiled once for all classes; vmap on GPUs. On a CPU vmap and unrolling compile longer than 200
steps can repay (figures: benchmarks/RESULTS.md).

    python -m mdjax.main --config=configs/default.py
    python -m mdjax.main --config=configs/default.py:smoke --workdir=/tmp/mdjax-smoke
"""

from mdjax import config as config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "digits"
  config.data.image_size = 32
  config.data.val_fraction = 0.15
  config.data.test_fraction = 0.25
  config.model.backbone = "wrn10_2"
  config.model.head_width = 64
  config.model.dropout = 0.2
  config.train.epochs = 6
  config.train.batch_size = 64
  config.train.base_optimizer = "sgd"
  config.train.learning_rate = 0.05
  config.train.schedule = "cosine"
  config.train.weight_decay = 5e-4
  config.finetune.epochs = 3
  config.finetune.learning_rate = 0.01
  config.mistake.nwpc = "auto"  # ceil(0.5 * 10) = 5 classes
  config.gan.resolution = 32
  config.gan.ensemble = "auto"
  config.gan.steps = 200
  config.gan.ngf = 16
  config.gan.ndf = 16
  config.gan.nz = 64
  config.gan.sample_every = 100
  config.gan.checkpoint_every = 100
  return config_lib.finalize(config, arg)
