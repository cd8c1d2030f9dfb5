"""GAN distillation: class GANs pulled towards the samples the classifier finds hard.

What the paper does (Pennisi, Palazzo, Spampinato, "Self-improving classification performance
through GAN distillation", ICCV 2021 workshop ILDAV): the trained classifier labels the training
samples easy or hard; the GAN is trained with a triplet loss on the classifier's features on top of
its adversarial loss,

    L_dist = E[max(||F(G(z)) - F(x_hard)||_2 - ||F(G(z)) - F(x_easy)||_2 + m, 0)],

so that generated samples lie near the hard samples' features and away from the easy ones'; then
classifier and GAN are trained together on real + synthetic data, the GAN following the hard
samples' feature distribution as the classifier changes. Reported: +4.9 (AlexNet), +5.6
(ResNet-50), +2.1 (DenseNet-121) points, and 74.56 against 72.17 for plain GAN augmentation. The
paper (a poster) gives no margin, loss weight, hard/easy rule or schedule.

What mdjax does, per weak class (the mistake-driven method's one FastGAN per class):
  1. Labels the class's training images hard or easy with the current classifier (eval mode):
     `hard_samples` by `distill.hard_rule` ("misclassified": argmax is not the label;
     "confidence": the true class's probability is below `distill.hard_threshold`), then
     `split_hard_easy` makes sure the class has both: a classifier usually gets nearly all of its
     own training images right, so a class with fewer than ceil(`distill.min_fraction` x n) hard
     images takes its lowest-probability images as hard, and a class with no easy image gives its
     highest-probability ones to "easy". A class of one image has that image in both roles: its
     triplet term is the constant m and trains nothing.
  2. Computes the frozen classifier's pooled features F (`Classifier.features`, eval mode) of those
     images once per round: F is frozen within a round, so F(x_hard) and F(x_easy) are constants,
     and recomputing them at every step would only spend a classifier forward pass on real images.
  3. Trains the class GANs in the ensemble's ONE compiled program (mdjax.gan.program): each class
     draws its batch of hard and easy features from its own padded row (stacked over the class
     axis like the images), and G's loss gains `weight` x the triplet term on F(G(z)), with the
     classifier's variables an input of the program (shared by all classes, gradient stopped): a
     new classifier each round reuses the compiled program.
  4. Alternates (mdjax.pipeline.stages.Run.distill): per round, relabel -> advance the GANs ->
     generate -> fine-tune the classifier on real + synthetic images from the previous round's
     classifier. Round 0's GAN training (`gan.steps`) is the paper's triplet pre-training; each
     later round adds `distill.round_gan_steps`.

Why these choices: features are L2-normalised by default (`distill.normalize`) so that one margin
means the same for every backbone (raw pooled features of a WRN-101 and of a WRN-10 differ in scale
by orders of magnitude); with normalised features the margin is FaceNet's triplet margin, 0.2
(Schroff et al., 2015), and `distill.normalize=false` gives the paper's formula on raw features.
The fakes are compared un-augmented (F(G(z)), as in the formula); DiffAugment stays D's business.
Fake and real images reach F the same way: the GAN-resolution image, mapped to [0, 1] and resized
to the classifier's input size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdjax.core import mesh as mesh_lib, process
from mdjax.gan import class_data

# `distill.hard_rule`: what makes a training image hard for the current classifier.
HARD_RULES = ("misclassified", "confidence")
# fold_in constant separating the hard / easy feature draws from a class's image draws.
DISTILL_STREAM = 2_000_001


def triplet_loss(f_fake: jax.Array, f_hard: jax.Array, f_easy: jax.Array, margin: float, *,
                 normalize: bool = False) -> jax.Array:
  """mean_i max(||f_fake_i - f_hard_i|| - ||f_fake_i - f_easy_i|| + margin, 0) over [B, F] rows.

  With `normalize` every feature vector is first scaled to unit L2 norm. The norms are
  `optax.safe_norm`s: a fake that equals a real feature vector has a zero (not NaN) gradient.
  """
  if normalize:
    f_fake, f_hard, f_easy = (f / optax.safe_norm(f, 1e-12, axis=-1, keepdims=True)
                              for f in (f_fake, f_hard, f_easy))
  d_hard = optax.safe_norm(f_fake - f_hard, 0.0, axis=-1)
  d_easy = optax.safe_norm(f_fake - f_easy, 0.0, axis=-1)
  return jnp.mean(jax.nn.relu(d_hard - d_easy + margin))


def true_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return jnp.take_along_axis(probs, jnp.asarray(labels)[:, None], axis=-1)[:, 0]


def hard_samples(logits: jax.Array, labels: jax.Array, rule: str, threshold: float) -> jax.Array:
  """bool [N]: which samples are hard for a classifier with these logits [N, C].

  "misclassified": the arg-max class is not the label; "confidence": the label's softmax
  probability is below `threshold`.
  """
  if rule == "misclassified":
    return jnp.argmax(logits, axis=-1) != jnp.asarray(labels)
  if rule == "confidence":
    return true_class_probability(logits, labels) < threshold
  raise ValueError(f"hard_rule {rule!r} not in {HARD_RULES}")


def split_hard_easy(hard: np.ndarray, p_true: np.ndarray, min_fraction: float
                    ) -> tuple[np.ndarray, np.ndarray]:
  """One class's (hard mask, easy mask), each with at least one sample (module docstring, 1.).

  `hard` is the rule's verdict, `p_true` the true class's probability of each of the class's n
  samples. Fewer than m = ceil(min_fraction x n) hard samples: the m lowest-probability ones are
  hard. No easy sample left: the m highest-probability ones become easy instead of hard (for
  n >= 2; with min_fraction <= 0.5 at least one hard sample remains). n = 1: the sample is both.
  """
  hard = np.asarray(hard, bool).copy()
  p_true = np.asarray(p_true, np.float64)
  n = len(hard)
  if n == 0:
    return hard, hard.copy()
  m = max(1, math.ceil(min_fraction * n - 1e-9))
  order = np.argsort(p_true, kind="stable")  # hardest first; ties by index
  if hard.sum() < m:
    hard[order[:m]] = True
  easy = ~hard
  if not easy.any():
    if n == 1:
      return hard, hard.copy()
    easiest = order[::-1][:m]
    hard[easiest], easy[easiest] = False, True
  return hard, easy


@dataclasses.dataclass(frozen=True, eq=False)
class Triplet:
  """The triplet term of G's loss, with the classifier module it reads features from.

  Hashed by identity (eq=False): one object per run, the key of the ensemble's cached program.
  `model.features` is closed over (static); its variables arrive as an input of the program.
  """
  model: Any  # mdjax.models.Classifier
  image_size: int  # the classifier's input size; fakes and reals are resized to it
  margin: float
  weight: float
  normalize: bool = True

  def features(self, variables, images01: jax.Array) -> jax.Array:
    """The classifier's pooled features [B, F] of images in [0, 1] at any size (eval mode)."""
    x = jax.image.resize(images01, (images01.shape[0], self.image_size, self.image_size, 3),
                         "bilinear")
    return self.model.apply(variables, x, train=False, method=self.model.features)

  def g_term_for(self, teacher: Mapping[str, jax.Array], data_key: jax.Array,
                 batch_size: int) -> Callable[[jax.Array], tuple[jax.Array, dict]]:
    """G's extra loss for one class's step: fake [B, R, R, 3] in [-1, 1] -> (weighted term,
    {"triplet_loss": unweighted}). Draws `batch_size` hard and easy features from `teacher`
    (padded rows, as mdjax.gan.class_data draws images) with keys of their own stream."""
    hard_key, easy_key = jax.random.split(jax.random.fold_in(data_key, DISTILL_STREAM))
    capacity = teacher["hard"].shape[0]
    f_hard = teacher["hard"][class_data.batch_indices(hard_key, teacher["hard_count"], capacity,
                                                      batch_size)]
    f_easy = teacher["easy"][class_data.batch_indices(easy_key, teacher["easy_count"], capacity,
                                                      batch_size)]
    variables = jax.lax.stop_gradient(teacher["variables"])  # the classifier is never trained here

    def g_term(fake):
      f_fake = self.features(variables, (fake + 1.0) / 2.0)
      loss = triplet_loss(f_fake, f_hard, f_easy, self.margin, normalize=self.normalize)
      return self.weight * loss, {"triplet_loss": loss}

    return g_term


@functools.lru_cache(maxsize=8)
def _features_and_logits(triplet: Triplet) -> Callable:
  def fn(variables, images_uint8):
    x = images_uint8.astype(jnp.float32) / 255.0
    features = triplet.features(variables, x)
    logits = triplet.model.apply(variables, features, train=False,
                                 method=lambda m, f, train: m.head(f, train=train).astype(jnp.float32))
    return features, logits
  return jax.jit(fn)


@dataclasses.dataclass
class ClassLabels:
  """One class's hard / easy split under one classifier."""
  hard: np.ndarray  # bool [n]
  easy: np.ndarray  # bool [n]
  p_true: np.ndarray  # float [n]
  features: np.ndarray  # float32 [n, F]

  def record(self) -> dict:
    return {"images": len(self.hard), "hard": int(self.hard.sum()), "easy": int(self.easy.sum()),
            "mean_true_class_probability": float(np.mean(self.p_true)) if len(self.p_true) else None}


def label_classes(triplet: Triplet, variables, images_by_class: Mapping[int, np.ndarray], *,
                  rule: str, threshold: float, min_fraction: float,
                  batch_size: int = 256) -> dict[int, ClassLabels]:
  """Features and hard / easy split of every class's uint8 [n, R, R, 3] images (the class index is
  the label) under the classifier `variables` (eval mode, so padding cannot affect the real rows).
  Batches of one size (the last one padded), so one program serves every class and round."""
  fn = _features_and_logits(triplet)
  # One batch size for every class (the last batch zero-padded): one compile for all of them.
  batch_size = min(batch_size, max(len(x) for x in images_by_class.values()))
  out = {}
  for k, images in images_by_class.items():
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      padded = np.zeros((batch_size,) + chunk.shape[1:], chunk.dtype)
      padded[:len(chunk)] = chunk
      f, lg = jax.device_get(fn(variables, padded))
      feats.append(f[:len(chunk)])
      logits.append(lg[:len(chunk)])
    feats, logits = np.concatenate(feats), np.concatenate(logits)
    labels = np.full((len(images),), k, np.int32)
    p_true = np.asarray(true_class_probability(logits, labels))
    hard, easy = split_hard_easy(np.asarray(hard_samples(logits, labels, rule, threshold)), p_true,
                                 min_fraction)
    out[k] = ClassLabels(hard, easy, p_true, feats.astype(np.float32))
  return out


@dataclasses.dataclass
class Teacher:
  """What the distilling GAN program reads besides the images: the triplet term, the classifier's
  variables and each class's hard / easy features (host arrays; `stacked` puts a chunk's on the
  devices)."""
  triplet: Triplet
  variables: Any
  labels: Mapping[int, ClassLabels]

  def stacked(self, classes: Sequence[int], capacity: int, mesh: jax.sharding.Mesh) -> dict:
    """The program's `teacher` input for the (padded) `classes` of one chunk: hard and easy
    features zero-padded to `capacity` rows, counts, variables replicated over the mesh."""
    def rows(mask_name):
      per_class = [self.labels[k].features[getattr(self.labels[k], mask_name)] for k in classes]
      dim = per_class[0].shape[-1]
      stacked = np.zeros((len(classes), capacity, dim), np.float32)
      for p, f in enumerate(per_class):
        stacked[p, :len(f)] = f
      return stacked, np.asarray([len(f) for f in per_class], np.int32)

    hard, hard_count = rows("hard")
    easy, easy_count = rows("easy")
    per_class = process.put_global(
        {"hard": hard, "hard_count": hard_count, "easy": easy, "easy_count": easy_count},
        mesh_lib.class_sharding(mesh))
    variables = process.put_global(self.variables, mesh_lib.replicated(mesh))
    return {"variables": variables, **per_class}
