"""The config schema shared by every file in `configs/`, its argument strings and its validation.

A dataset config (`configs/cars.py`) starts from `base_config()`, sets the paper's values for its
dataset, and ends with `finalize(config, arg)`, which applies the short argument string
(`configs/cars.py:optimizer=adam,activation=gelu,smoke`). Command-line overrides
(`--config.train.epochs=3`) are applied by ml_collections after that, so `mdjax.main` calls
`validate(config)` once everything is set.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import ml_collections

from mdjax.errors import ConfigError, UnknownConfigKeyError
from mdjax.pipeline import plan

# Short names accepted in the config argument string, mapped to the key they set.
ARG_SHORTCUTS = {
    "optimizer": "train.optimizer",
    "base_optimizer": "train.base_optimizer",
    "activation": "model.activation",
    "backbone": "model.backbone",
    "head": "model.head",
    "nwpc": "mistake.nwpc",
    "nsamples": "mistake.nsamples_ratio",
    "mistake": "mistake.enabled",
    "ensemble": "gan.ensemble",
    "seed": "seed",
    "mix": "train.mix",
    "randaugment": "data.randaugment_layers",
    "pgd_eps": "train.pgd_eps",
}


def base_config() -> ml_collections.ConfigDict:
  """Every key mdjax reads, with the defaults of the paper's main configuration."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Several seeds ("0,1,2") run the whole pipeline once per seed and report mean and std.
  c.seeds = ""
  c.stages = ",".join(plan.STAGES)
  # auto: resume a workdir made by the same config; force: resume even if the config differs;
  # never: refuse a workdir that already holds a run.
  c.resume = "auto"
  # Also run the control experiments: real-only fine-tune and full GAN augmentation.
  c.controls = False

  c.data = d = ml_collections.ConfigDict()
  d.name = "digits"
  d.root = ""  # folder (or tfds data_dir) holding the dataset; "" means the dataset's default.
  d.image_size = 32
  d.val_fraction = 0.1  # carved from train, stratified, where the source has no validation split
  d.test_fraction = 0.2  # carved from the whole set where the source has no test split
  d.split_seed = 0
  d.strict = False  # True: a corrupt image file is an error instead of a skipped file
  # The limited-data regime: keep at most this many training images per class (0 = all), drawn at
  # random within each class (seed split_seed); validation and test splits are unchanged.
  d.max_train_per_class = 0
  # Training augmentation (mdjax.data.pipeline.AUGMENTATIONS): "none", "crop" (shifts; digits and
  # characters), "crop_flip" (CIFAR), "resized_crop_flip" (photos; evaluation takes a centre crop).
  d.augment = "crop_flip"
  d.crop_min_scale = 0.08  # resized_crop_flip: the smallest crop, as a fraction of the image area
  d.num_threads = 2
  d.prefetch = 4
  # RandAugment (Cubuk et al. 2019; mdjax.data.randaugment) after `augment`: N ops per training
  # image (0 = off) at magnitude M on the paper's 0-30 scale.
  d.randaugment_layers = 0
  d.randaugment_magnitude = 9

  c.model = m = ml_collections.ConfigDict()
  m.backbone = "wrn101"
  m.head = "progressive_spinal"
  m.head_width = 200
  m.dropout = 0.35
  m.activation = "selu"
  m.weights = ""  # a torchvision-format state_dict file for the backbone; "" = random init
  m.freeze_backbone = False
  m.backbone_lr_mult = 1.0  # transfer learning: the backbone's learning rate as a fraction
  m.dtype = "float32"

  c.train = t = ml_collections.ConfigDict()
  t.epochs = 20
  t.batch_size = 28
  t.optimizer = "sam"
  t.base_optimizer = "sgd"  # what SAM wraps
  t.learning_rate = 1e-3
  t.momentum = 0.9
  t.weight_decay = 0.0
  t.schedule = "step"
  t.step_epochs = 7  # SpinalNet's recipe: x0.1 every 7 epochs
  t.step_gamma = 0.1
  t.warmup_epochs = 0.0
  t.label_smoothing = 0.0
  t.sam_rho = 0.05
  t.sam_adaptive = False
  t.sam_perturbation = "per_device"  # m-sharpness as in the official SAM code; or "global"
  t.log_every = 10  # steps
  t.checkpoint_every = 100  # steps; also at every epoch end
  t.max_checkpoints = 2
  # Mixed-sample augmentation on device (mdjax.train.mixing): "none", "mixup", "cutmix" or
  # "hardmix" (CutMix with patches from the examples the model most often misclassifies: the top
  # hardmix_fraction of the training set by misclassification rate). The mixing ratio is drawn
  # from Beta(mix_alpha, mix_alpha). Applies to the fine-tune too.
  t.mix = "none"
  t.mix_alpha = 1.0
  t.hardmix_fraction = 0.1
  # PGD adversarial training (Madry et al. 2018; mdjax.train.adversarial) in the input space
  # [0, 1]: an L-inf radius (0 = off), ascent steps, and a step size (0 = 2.5 eps / steps).
  t.pgd_eps = 0.0
  t.pgd_steps = 3
  t.pgd_step_size = 0.0

  # Fine-tuning the trained classifier on real + generated images (Algorithm 1, line 11).
  c.finetune = f = ml_collections.ConfigDict()
  f.epochs = 20
  f.learning_rate = 1e-3
  # How the fine-tune treats generated images (beyond the paper, which adds them as they are; each
  # off by default). generated_weight: their loss weight against real images' 1 (He et al.,
  # ICLR 2023 weigh the two kinds separately). sampler: "all" (every real and generated image each
  # epoch, the paper) or "keep_priors" (a class keeps its real image count per epoch, generated
  # images taking part of it: mdjax.data.pipeline.PriorSampler). separate_bn: generated images get
  # BatchNorm statistics of their own (Diversify, Don't Fine-Tune's auxiliary BatchNorm).
  # refit_last_layer: afterwards the output layer is re-fit on real images only, class-balanced
  # (SYNAuG; mdjax.train.refit); after the real-only control's fine-tune too, to compare like
  # with like.
  f.generated_weight = 1.0
  f.sampler = "all"
  f.separate_bn = False
  f.refit_last_layer = False

  # Not type-safe: nwpc is "auto", a count or a fraction, so configs may assign any of these.
  c.mistake = mk = ml_collections.ConfigDict(type_safe=False)
  mk.enabled = True
  # Number of worst-performing classes: "auto" (ceil(0.2 n) above 20 classes, else ceil(0.5 n)),
  # a count (int >= 0), or a fraction of n in (0, 1] rounded up.
  mk.nwpc = "auto"
  mk.nsamples_ratio = 0.5
  # Beyond the paper (He et al., ICLR 2023): keep a generated image only if the trained classifier
  # gives its class a probability above a threshold. "none" keeps every image (the paper); "1/n"
  # is one over the number of classes (He et al.'s rule); or a number in (0, 1). A filtering GAN
  # draws until nSamples images pass or filter_max_draws x nSamples were drawn.
  mk.filter = "none"
  mk.filter_max_draws = 10
  # Which passing images a filtering GAN keeps: "first" (the first nSamples to pass) or "hardest"
  # (classifier feedback: of filter_max_draws x nSamples draws, the passing ones the classifier is
  # least sure of, nearest the class's boundary where it errs).
  mk.select = "first"
  # When the fine-tune lowers validation accuracy (overall or on the weak classes) the run warns;
  # true also keeps the trained classifier as the final one then (results.json "final_model").
  mk.keep_best = False

  c.gan = g = ml_collections.ConfigDict()
  g.resolution = 32
  # The fixed schedule: steps of every class GAN without the stopping rule (stop_judge = 0), of
  # the conditional GAN and of GAN distillation's pre-training. With the stopping rule each class
  # GAN trains until its images pass, at most max_steps (0: steps).
  g.steps = 50_000
  g.max_steps = 0
  g.batch_size = 8
  g.learning_rate = 2e-4
  g.beta1 = 0.5
  g.beta2 = 0.999
  g.ema_decay = 0.999
  g.ngf = 64
  g.ndf = 64
  g.nz = 256
  g.recon_loss = "mse"
  g.diffaug = "color,translation"
  g.ensemble = "auto"
  g.chunk_size = 8  # classes per compiled program; several chunks for many weak classes
  # When a class's GAN stops (mdjax.gan.monitor): every `sample_every` steps its EMA generator is
  # judged, and it stops once the independent judge (gan.judge) assigns at least stop_judge x its
  # own held-out recall of the class to the class's images, their diversity ratio is at least
  # stop_diversity, and their Frechet distance (judge features) is within stop_fd_floor x that
  # between two halves of the class's real images (0 = not used), or has not improved by
  # stop_fd_gain on the best earlier check for stop_patience checks; else at `max_steps`.
  # stop_judge = 0: every class trains `steps` (the paper's fixed schedule).
  g.stop_judge = 0.9
  g.stop_diversity = 0.6
  g.stop_fd_floor = 2.0
  g.stop_fd_gain = 0.05
  g.stop_patience = 3
  # "auto": a class whose real images are all grey (R = G = B) gets a generator whose output is
  # grey (its channels averaged, so D never sees colour it could tell fakes by); "rgb" or "grey"
  # force either.
  g.colour = "auto"
  # The class GANs' computation: "float32", or "bfloat16" (mixed precision: parameters, optimizer
  # state, EMA and BatchNorm statistics stay float32, losses are reduced in float32). A speed
  # and memory setting for accelerators; on a CPU bfloat16 is emulated and slower.
  g.dtype = "float32"
  g.sample_every = 1000
  g.checkpoint_every = 1000
  g.log_every = 50
  # The independent judge of generated images (mdjax.gan.judge): `lite0` (logistic regression on
  # ImageNet EfficientNet-Lite0 features; natural images) or `pixels` (an SVC on raw pixels; small
  # images such as digits), and its input size. Lite0 was trained at 224; 128 keeps its accuracy on
  # small images at a third of the cost.
  g.judge = "lite0"
  g.judge_resolution = 128  # 0: the images' own size (at most gan.resolution); pixels want it
  # Beyond the paper (a conditional-GAN augmentation): True trains ONE class-conditional FastGAN
  # on the images of all weak classes together (label embedding into G, projection D; mdjax.gan.conditional)
  # instead of one FastGAN per weak class, to compare cost and benefit with the per-class
  # ensemble. It generates the same images per class, to the same place. gan.steps are then the
  # conditional GAN's steps, each on a class-balanced batch of all weak classes.
  g.conditional = False
  # The conditional GAN only: one-sided label smoothing of real images, as a factor on the real
  # side of the hinge loss's margin (mdjax.gan.losses); 0.9 is the conditional-GAN augmentation
  # paper's value, 1.0 none. The per-class GANs keep the reference loss and do not read it.
  g.real_label_smoothing = 0.9

  # GAN distillation (Pennisi et al., ICCV 2021 workshop; mdjax.gan.distill): the weak classes'
  # GANs also learn a triplet loss on the classifier's features that pulls their samples towards
  # the training images the classifier finds hard, and classifier and GANs then alternate for
  # `rounds` rounds. When enabled, its `distill` stage replaces the gan, generate and finetune
  # stages. The paper gives none of these values; each is mdjax's choice (see the notes).
  c.distill = ds = ml_collections.ConfigDict()
  ds.enabled = False
  ds.margin = 0.2  # m; FaceNet's margin for L2-normalised features (the paper gives none)
  ds.weight = 1.0  # the triplet term's weight in G's loss, beside the adversarial loss's 1
  ds.normalize = True  # L2-normalise features first (false: the paper's formula on raw features)
  # Rounds of relabel -> GAN steps -> generate -> fine-tune. Round 0's GAN training is gan.steps
  # (the paper's triplet pre-training), every later round adds round_gan_steps; every round
  # fine-tunes for `epochs`: 4 x 5 matches the paper's 20 fine-tuning epochs.
  ds.rounds = 4
  ds.round_gan_steps = 1000
  ds.epochs = 5
  # Hard samples: "misclassified" (arg-max is not the label) or "confidence" (the label's
  # probability is below hard_threshold). A class with fewer than ceil(min_fraction x n) hard
  # images takes its lowest-probability ones, and one with no easy image its highest-probability
  # ones as easy (a classifier gets most of its own training images right).
  ds.hard_rule = "misclassified"
  ds.hard_threshold = 0.5
  ds.min_fraction = 0.25
  c.lock()  # a key base_config does not define is a typo wherever it is set (see mdjax.main)
  return c


# `finetune.sampler`: every image each epoch (the paper), or the real class priors kept.
FINETUNE_SAMPLERS = ("all", "keep_priors")


def config_keys(config: ml_collections.ConfigDict | None = None, prefix: str = "") -> list[str]:
  """Every dotted key of `config` (default: base_config()), sections included."""
  config = base_config() if config is None else config
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if isinstance(value, ml_collections.ConfigDict):
      keys += config_keys(value, f"{prefix}{name}.")
  return keys


def closest_key(key: str, config: ml_collections.ConfigDict | None = None) -> str | None:
  """The defined key most like the misspelt `key` ("train.epoch" -> "train.epochs"), if any."""
  keys = config_keys(config)
  match = difflib.get_close_matches(key, keys, n=1)
  if not match:  # a right leaf in the wrong section, or a leaf without its section
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
    match = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1)]
  return match[0] if match else None


def _parse_value(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def set_key(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  """Sets the defined key `dotted` ("train.epochs") of `config`, keeping its declared type."""
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  old = node[leaf]
  # Keep the declared type where the value converts cleanly (e.g. "nwpc" may be str or int).
  if isinstance(old, bool) and not isinstance(value, bool):
    raise ConfigError(dotted, value, "true or false")
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  with node.ignore_type():
    node[leaf] = value


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a run of a minute or two on a 2-core CPU, keeping its structure."""
  config.data.image_size = min(config.data.image_size, 32)
  config.model.backbone = "wrn10_1"
  config.model.head_width = 32
  config.train.epochs = 2
  config.train.batch_size = 32
  config.train.log_every = 5
  config.train.checkpoint_every = 20
  config.finetune.epochs = 1
  config.gan.resolution = 32
  config.gan.steps = 20
  config.gan.max_steps = 0  # the class GANs' budget: gan.steps
  config.gan.batch_size = 8
  config.gan.ngf = 8
  config.gan.ndf = 8
  config.gan.nz = 32
  config.gan.sample_every = 10
  config.gan.checkpoint_every = 10
  config.gan.log_every = 5
  if config.gan.judge == "lite0":
    config.gan.judge_resolution = 64
  # auto: per_class on one CPU device (lax.map on several), vmap on GPU; all compile the FastGAN
  # step once where unrolling compiles it once per class (minutes on a CPU), and 20 tiny steps
  # cannot repay that.
  config.gan.ensemble = "auto"
  config.distill.rounds = 2
  config.distill.round_gan_steps = 10
  config.distill.epochs = 1


def finalize(config: ml_collections.ConfigDict, arg: str | None,
             variants: dict[str, Callable[[ml_collections.ConfigDict], None]] | None = None
             ) -> ml_collections.ConfigDict:
  """Applies a config argument string such as "smoke,optimizer=adam,nwpc=3".

  Bare words are variants: `smoke` for every config, plus the config file's own `variants`
  (e.g. configs/default.py's `limited`), applied in the order given. `key=value` sets a shortcut
  from ARG_SHORTCUTS or any dotted key (`train.epochs=3`). Values are parsed as bool / int /
  float, else kept as strings.
  """
  if not arg:
    return config
  variants = {"smoke": apply_smoke, **(variants or {})}
  for token in filter(None, (t.strip() for t in arg.split(","))):
    if "=" not in token:
      if token in variants:
        variants[token](config)
        continue
      raise ConfigError("<config argument>", token,
                        f"a variant ({', '.join(variants)}) or key=value with key one of "
                        + ", ".join(ARG_SHORTCUTS))
    key, value = (s.strip() for s in token.split("=", 1))
    dotted = ARG_SHORTCUTS.get(key, key)
    if dotted not in config_keys(config):
      raise UnknownConfigKeyError(
          dotted, f"in the config argument {token!r} (keys there: a dotted key or one of "
          f"{', '.join(ARG_SHORTCUTS)})", closest_key(dotted, config))
    set_key(config, dotted, _parse_value(value))
  return config


def _require(ok: bool, key: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(key, value, allowed)


def _one_of(config, key: str, allowed) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  _require(value in allowed, key, value, "one of " + ", ".join(map(str, allowed)))


def validate(config: ml_collections.ConfigDict, num_classes: int | None = None) -> None:
  """Checks every value mdjax reads; raises ConfigError naming the first bad key.

  The allowed names come from the registries of the modules that own them. `num_classes`, once
  the dataset is known, also checks nWPC against it.
  """
  # Imported here, not at the top: config files import this module while the command line is
  # parsed, and these modules import JAX, which mdjax.main starts only once the flags are read.
  # pylint: disable=g-import-not-at-top
  from mdjax.data import pipeline as data_pipeline
  from mdjax.data import randaugment, registry
  from mdjax.gan import diffaug, distill, fastgan, generate, judge, losses, program
  from mdjax.gan import step as gan_step
  from mdjax.models import backbones, classifier, heads
  from mdjax.optim import factory
  from mdjax.pipeline import workdir
  from mdjax.train import mixing, steps
  # pylint: enable=g-import-not-at-top

  _require(isinstance(config.seed, int), "seed", config.seed, "an integer")
  plan.parse_seeds(config)
  plan.parse_stages(config)
  _one_of(config, "resume", workdir.RESUME)
  _one_of(config, "data.name", registry.DATASETS)
  _require(isinstance(config.data.image_size, int) and 8 <= config.data.image_size <= 1024,
           "data.image_size", config.data.image_size, "an integer from 8 to 1024")
  for key in ("val_fraction", "test_fraction"):
    v = config.data[key]
    _require(isinstance(v, (int, float)) and 0 <= v < 1, f"data.{key}", v, "a fraction in [0, 1)")
  _one_of(config, "data.augment", data_pipeline.AUGMENTATIONS)
  _require(0 < config.data.crop_min_scale <= 1, "data.crop_min_scale", config.data.crop_min_scale,
           "a fraction of the image area in (0, 1]")
  _require(isinstance(config.data.max_train_per_class, int) and config.data.max_train_per_class >= 0,
           "data.max_train_per_class", config.data.max_train_per_class,
           "an integer >= 0 (0 keeps every training image)")
  _require(isinstance(config.data.num_threads, int) and config.data.num_threads >= 0,
           "data.num_threads", config.data.num_threads, "an integer >= 0")
  _require(isinstance(config.data.randaugment_layers, int) and config.data.randaugment_layers >= 0,
           "data.randaugment_layers", config.data.randaugment_layers,
           "an integer >= 0 (RandAugment's N, ops per image; 0 = off)")
  _require(0 <= config.data.randaugment_magnitude <= randaugment.MAX_MAGNITUDE,
           "data.randaugment_magnitude", config.data.randaugment_magnitude,
           f"a number from 0 to {randaugment.MAX_MAGNITUDE} (RandAugment's M)")

  _one_of(config, "model.backbone", backbones.BACKBONES)
  _one_of(config, "model.head", heads.HEADS)
  _one_of(config, "model.activation", heads.ACTIVATIONS)
  _one_of(config, "model.dtype", classifier.DTYPES)
  _require(isinstance(config.model.head_width, int) and config.model.head_width > 0,
           "model.head_width", config.model.head_width, "a positive integer")
  _require(0 <= config.model.dropout < 1, "model.dropout", config.model.dropout, "a fraction in [0, 1)")
  _require(0 <= config.model.backbone_lr_mult, "model.backbone_lr_mult",
           config.model.backbone_lr_mult, "a number >= 0")

  t = config.train
  for key in ("epochs", "batch_size", "log_every", "checkpoint_every", "max_checkpoints"):
    _require(isinstance(t[key], int) and t[key] > 0, f"train.{key}", t[key], "a positive integer")
  _one_of(config, "train.optimizer", factory.OPTIMIZERS)
  _one_of(config, "train.base_optimizer", factory.BASE_OPTIMIZERS)
  _one_of(config, "train.schedule", factory.SCHEDULES)
  _one_of(config, "train.sam_perturbation", steps.SAM_PERTURBATIONS)
  _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "a number > 0")
  _require(t.sam_rho >= 0, "train.sam_rho", t.sam_rho, "a number >= 0")
  _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
  _require(0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "a fraction in [0, 1)")
  _one_of(config, "train.mix", mixing.MIXES)
  _require(t.mix_alpha > 0, "train.mix_alpha", t.mix_alpha,
           "a number > 0 (the mixing ratio is drawn from Beta(alpha, alpha); 1 is uniform)")
  _require(0 < t.hardmix_fraction <= 1, "train.hardmix_fraction", t.hardmix_fraction,
           "a fraction of the training set in (0, 1]")
  _require(0 <= t.pgd_eps <= 1, "train.pgd_eps", t.pgd_eps,
           "a radius in [0, 1] in the input space [0, 1] (0 = off; 8/255 = 0.031 is usual)")
  _require(isinstance(t.pgd_steps, int) and t.pgd_steps > 0, "train.pgd_steps", t.pgd_steps,
           "a positive integer")
  _require(t.pgd_step_size >= 0, "train.pgd_step_size", t.pgd_step_size,
           "a number >= 0 (0 = 2.5 pgd_eps / pgd_steps)")
  _require(isinstance(config.finetune.epochs, int) and config.finetune.epochs >= 0,
           "finetune.epochs", config.finetune.epochs, "an integer >= 0")
  _require(config.finetune.learning_rate > 0, "finetune.learning_rate",
           config.finetune.learning_rate, "a number > 0")
  f = config.finetune
  _require(_number(f.generated_weight) and f.generated_weight >= 0, "finetune.generated_weight",
           f.generated_weight, "a loss weight >= 0 for generated images (1 = as real ones)")
  _one_of(config, "finetune.sampler", FINETUNE_SAMPLERS)
  _require(isinstance(f.separate_bn, bool), "finetune.separate_bn", f.separate_bn, "true or false")
  _require(isinstance(f.refit_last_layer, bool), "finetune.refit_last_layer", f.refit_last_layer,
           "true or false")
  _require(t.mix == "none" or (f.generated_weight == 1 and not f.separate_bn), "train.mix", t.mix,
           "none with finetune.generated_weight != 1 or finetune.separate_bn (a mixed image is "
           "part real, part generated)")

  mk = config.mistake
  if isinstance(mk.nwpc, str) and mk.nwpc != "auto":
    # A command-line override of a str-typed key arrives as text ("--config.mistake.nwpc=3").
    parsed = _parse_value(mk.nwpc)
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
      with mk.ignore_type():
        mk.nwpc = parsed
  _require(isinstance(mk.enabled, bool), "mistake.enabled", mk.enabled, "true or false")
  _require(isinstance(mk.keep_best, bool), "mistake.keep_best", mk.keep_best, "true or false")
  nwpc = mk.nwpc
  ok = nwpc == "auto" or (isinstance(nwpc, int) and not isinstance(nwpc, bool) and nwpc >= 0) or (
      isinstance(nwpc, float) and 0 < nwpc <= 1)
  _require(ok, "mistake.nwpc", nwpc, "'auto', a class count >= 0, or a fraction of the classes in (0, 1]")
  if num_classes is not None:
    plan.check_nwpc(nwpc, num_classes)
  if isinstance(mk.filter, str) and mk.filter not in ("none", "1/n"):
    parsed = _parse_value(mk.filter)
    if isinstance(parsed, float):
      with mk.ignore_type():
        mk.filter = parsed
  _require(mk.filter in ("none", "1/n") or (isinstance(mk.filter, float) and 0 < mk.filter < 1),
           "mistake.filter", mk.filter,
           "'none' (keep every generated image), '1/n', or a class-probability threshold in (0, 1)")
  _one_of(config, "mistake.select", generate.SELECTIONS)
  _require(mk.select == "first" or mk.filter != "none", "mistake.select", mk.select,
           "'first' unless mistake.filter sets the plausibility floor ('1/n' or a threshold) "
           "that 'hardest' selects above")
  _require(isinstance(mk.filter_max_draws, int) and mk.filter_max_draws >= 1,
           "mistake.filter_max_draws", mk.filter_max_draws, "an integer >= 1 (a multiple of nSamples)")
  r = mk.nsamples_ratio
  _require(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0,
           "mistake.nsamples_ratio", r, "a number >= 0 (0.5 adds half the class size)")

  g = config.gan
  _one_of(config, "gan.resolution", fastgan.RESOLUTIONS)
  _one_of(config, "gan.colour", gan_step.COLOURS)
  _one_of(config, "gan.dtype", gan_step.DTYPES)
  _require(_number(g.stop_judge) and 0 <= g.stop_judge <= 1, "gan.stop_judge", g.stop_judge,
           "a fraction in [0, 1] of the judge's held-out recall of a class (0 = no stopping rule)")
  _require(_number(g.stop_diversity) and g.stop_diversity >= 0, "gan.stop_diversity",
           g.stop_diversity, "a diversity ratio >= 0 (1 = as varied as the real images)")
  _require(_number(g.stop_fd_floor) and g.stop_fd_floor >= 0, "gan.stop_fd_floor",
           g.stop_fd_floor, "a number >= 0: a multiple of the class's own Frechet distance "
           "(two halves of its real images) that counts as close enough; 0 = not used")
  _require(isinstance(g.stop_patience, int) and g.stop_patience >= 1, "gan.stop_patience",
           g.stop_patience, "an integer >= 1: checks in a row without improvement before a stop")
  _require(_number(g.stop_fd_gain) and 0 <= g.stop_fd_gain < 1, "gan.stop_fd_gain",
           g.stop_fd_gain, "a fraction in [0, 1): the Frechet distance's relative improvement "
           "that still counts as improving")
  _one_of(config, "gan.ensemble", program.ENSEMBLES)
  _one_of(config, "gan.recon_loss", losses.RECON_LOSSES)
  _one_of(config, "gan.judge", judge.JUDGES)
  _require(isinstance(g.max_steps, int) and g.max_steps >= 0, "gan.max_steps", g.max_steps,
           "an integer >= 0: the most steps a class GAN trains under the stopping rule "
           "(0 = gan.steps)")
  for key in ("steps", "batch_size", "ngf", "ndf", "nz", "chunk_size", "sample_every",
              "checkpoint_every", "log_every"):
    _require(isinstance(g[key], int) and g[key] > 0, f"gan.{key}", g[key], "a positive integer")
  _require(isinstance(g.judge_resolution, int) and g.judge_resolution >= 0,
           "gan.judge_resolution", g.judge_resolution,
           "an integer >= 0 (0: the training images' own size, at most gan.resolution)")
  _require(0 <= g.ema_decay < 1, "gan.ema_decay", g.ema_decay, "a number in [0, 1)")
  _require(isinstance(g.conditional, bool), "gan.conditional", g.conditional,
           "true (one class-conditional GAN for all weak classes) or false (one GAN per weak class)")
  smoothing = g.real_label_smoothing
  _require(isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool)
           and 0 < smoothing <= 1, "gan.real_label_smoothing", smoothing,
           "a number in (0, 1]: the real images' smoothed target (0.9, the paper's; 1.0 = none)")
  policies = [p for p in str(g.diffaug).split(",") if p]
  _require(all(p in diffaug.POLICIES for p in policies), "gan.diffaug", g.diffaug,
           "a comma-separated subset of " + ",".join(diffaug.POLICIES) + " (or empty)")

  ds = config.distill
  _require(isinstance(ds.enabled, bool), "distill.enabled", ds.enabled, "true or false")
  _require(isinstance(ds.normalize, bool), "distill.normalize", ds.normalize, "true or false")
  _require(_number(ds.margin) and ds.margin >= 0, "distill.margin", ds.margin,
           "a number >= 0 (0.2 with normalised features)")
  _require(_number(ds.weight) and ds.weight >= 0, "distill.weight", ds.weight,
           "a number >= 0 (the triplet term's weight in G's loss; 0 turns it off)")
  _require(isinstance(ds.rounds, int) and ds.rounds >= 1, "distill.rounds", ds.rounds,
           "an integer >= 1")
  for key in ("round_gan_steps", "epochs"):
    _require(isinstance(ds[key], int) and ds[key] >= 0, f"distill.{key}", ds[key],
             "an integer >= 0")
  _one_of(config, "distill.hard_rule", distill.HARD_RULES)
  _require(_number(ds.hard_threshold) and 0 < ds.hard_threshold <= 1, "distill.hard_threshold",
           ds.hard_threshold, "a class probability in (0, 1]")
  _require(_number(ds.min_fraction) and 0 < ds.min_fraction <= 0.5, "distill.min_fraction",
           ds.min_fraction, "a fraction of a class's images in (0, 0.5]")
  # Distillation trains the per-class ensemble (its triplet term is per class, its hard and easy
  # images too); the conditional GAN has no distilling step.
  _require(not (ds.enabled and g.conditional), "gan.conditional", g.conditional,
           "false when distill.enabled is true (GAN distillation trains one GAN per weak class)")


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)
