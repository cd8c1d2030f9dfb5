"""Fashion-MNIST (Zalando; 28x28 grey photos of clothes, 10 classes): real, offline, and with
genuinely weak classes (shirt, confused with T-shirt, pullover and coat).

    apt-get install dataset-fashion-mnist      # or put the four idx files in ~/mdjax_data/fashion_mnist
    python -m mdjax.main --config=configs/fashion_mnist.py:cpu --config.controls=true
    python -m mdjax.main --config=configs/fashion_mnist.py                     # all 54,000 (GPU)

A small CIFAR-style WRN-10-2 trunk with the paper's Progressive SpinalNet head and SELU, trained
with plain SGD with momentum at the images' native 28x28, shifted by up to 3 pixels and mirrored
(clothes are left-right symmetric). SGD rather than the paper's SAM: on the `cpu` variant SAM
reached 0.892 validation accuracy after 15 epochs against SGD's 0.905, at twice the cost per step
(benchmarks/RESULTS.md, "Fashion-MNIST recipe"); `optimizer=sam` restores it.

The class GANs work at 32x32 and train until their images pass the independent judge (an SVC on
the raw 28x28 pixels) and their Frechet distance stops improving (mdjax.gan.monitor), at most
1,500 steps: the shirts improved visibly from step 300 to 800 (benchmarks/RESULTS.md, "Class
GANs on Fashion-MNIST").

`cpu` keeps 1,000 training images per class (validation and test unchanged: 6,000 and 10,000
images), for 2-core CPUs; its run times are in benchmarks/RESULTS.md ("Fashion-MNIST").
"""

from mdjax import config as config_lib


def cpu(config):
  config.data.max_train_per_class = 1000


def get_config(arg=None):
  config = config_lib.base_config()
  config.data.name = "fashion_mnist"
  config.data.image_size = 28
  config.data.augment = "crop_flip"
  config.data.val_fraction = 0.1
  config.model.backbone = "wrn10_2"
  config.model.head_width = 64
  config.model.dropout = 0.2
  config.train.epochs = 15
  config.train.batch_size = 64
  config.train.optimizer = "sgd"
  config.train.learning_rate = 0.05
  config.train.schedule = "cosine"
  config.train.weight_decay = 5e-4
  config.finetune.epochs = 3
  config.finetune.learning_rate = 0.01
  config.mistake.nwpc = 3
  config.gan.resolution = 32
  config.gan.steps = 300  # the fixed schedule (the conditional GAN, distillation)
  config.gan.max_steps = 1500  # class GANs stop earlier once their images pass (gan.stop_*)
  config.gan.ngf = 16
  config.gan.ndf = 16
  config.gan.nz = 64
  config.gan.ema_decay = 0.95
  config.gan.judge = "pixels"
  config.gan.judge_resolution = 0  # the images' own 28x28
  config.gan.sample_every = 100
  config.gan.checkpoint_every = 100
  return config_lib.finalize(config, arg, variants={"cpu": cpu})
