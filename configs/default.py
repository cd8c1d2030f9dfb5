"""The embedded default: scikit-learn's real 8x8 handwritten digits (no download), on a 2-core CPU
in under 10 minutes.

    python -m mdjax.main --config=configs/default.py
    python -m mdjax.main --config=configs/default.py:limited    # 20 training images per class
    python -m mdjax.main --config=configs/default.py:smoke --workdir=/tmp/mdjax-smoke

The paper's method with the paper's Progressive SpinalNet head, SELU and SAM; a small CIFAR-style
WRN-10-2 trunk stands in for the ImageNet Wide-ResNet (no pretrained weights fit 8x8 digits). The
classifier reads the digits at 16x16 (2x their native size: 4x cheaper than 32x32, and as
accurate), shifted by up to one native pixel and never mirrored (a mirrored 2 resembles a 5).
The class GANs work at 32x32, FastGAN's smallest size here (one compiled program for the weak
classes: run class by class on one CPU device, vmapped over them on GPUs), each until its images
pass the independent judge (an SVC on the raw 8x8 pixels, `gan.judge`) and are as close to the
class as two halves of its own images (mdjax.gan.monitor): the digits stop at 200-400 steps. The
budget, `gan.max_steps` = 1,000, is for other data run with this config (a folder of 28x28 images
needs more); the conditional GAN and distillation keep the fixed 300 steps (`gan.steps`).
Their EMA generator averages with decay 0.95 (a horizon of ~20 steps; the reference's 0.999 is a
horizon of 1,000 of its 50,000 steps): at 0.999, even bias-corrected, the average over 200 steps
still leans on the first, unformed generators, and an SVC on real digits recognises only 74-78% of
its samples against 97-99.5% at 0.95.
Why each recipe value is what it is: benchmarks/RESULTS.md, "Classifier recipe on digits".

`limited` keeps 20 training images per class (the limited-data regime the paper argues FastGAN
suits): validation and test splits are unchanged, and the classifier trains for more epochs so
that it takes about as many steps.
"""

from mdjax import config as config_lib


def limited(config):
  config.data.max_train_per_class = 20
  config.train.epochs = 80  # 200 images: 6 steps per epoch
  config.finetune.epochs = 15


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.augment = "crop"
  config.data.val_fraction = 0.15
  config.data.test_fraction = 0.25
  config.model.backbone = "wrn10_2"
  config.model.head_width = 64
  config.model.dropout = 0.2
  config.train.epochs = 15
  config.train.batch_size = 32
  config.train.base_optimizer = "sgd"
  config.train.learning_rate = 0.05
  config.train.schedule = "cosine"
  config.train.weight_decay = 5e-4
  config.finetune.epochs = 3
  config.finetune.learning_rate = 0.01
  config.mistake.nwpc = "auto"  # ceil(0.5 * 10) = 5 classes
  config.gan.resolution = 32
  config.gan.ensemble = "auto"
  config.gan.steps = 300  # the fixed schedule (the conditional GAN, distillation)
  config.gan.max_steps = 1000  # a budget: class GANs stop when their images pass (gan.stop_*)
  config.gan.ngf = 16
  config.gan.ndf = 16
  config.gan.nz = 64
  config.gan.ema_decay = 0.95
  config.gan.judge = "pixels"
  config.gan.judge_resolution = 0  # the images' own size: 8 for the digits, 28 for 28x28 folders
  config.gan.sample_every = 100
  config.gan.checkpoint_every = 100
  # GAN distillation (off by default): 3 rounds of 1 fine-tuning epoch, the fine-tune's 3 epochs;
  # every later round adds a quarter of the GANs' 300 pre-training steps.
  config.distill.rounds = 3
  config.distill.epochs = 1
  config.distill.round_gan_steps = 75
  return config_lib.finalize(config, arg, variants={"limited": limited})
