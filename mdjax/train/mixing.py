"""Mixed-sample augmentation on device: Mixup, CutMix and HardMix as pure batch transforms.

Each transform takes an explicit key, the batch's images (float [B, H, W, 3] in [0, 1]) and its
targets as probabilities over the classes ([B, C], one-hot before mixing), and returns the mixed
images and soft targets; the train step (mdjax.train.steps) calls them inside its jitted function,
on the global batch, so the result does not depend on how the batch is split over devices.
`soft_cross_entropy` is the loss on such targets, with label smoothing applied to them as
`optax.smooth_labels` does.

Mixup (Zhang et al., ICLR 2018, "mixup: Beyond Empirical Risk Minimization"): each example is
blended with a partner from a random permutation of the batch, x = lam x_i + (1 - lam) x_j and
y = lam y_i + (1 - lam) y_j, with lam ~ Beta(alpha, alpha). One lam per batch, as the paper's
recipe draws it.

CutMix (Yun et al., ICCV 2019): a box whose sides are sqrt(1 - lam) of the image's (lam ~
Beta(alpha, alpha)), centred at a uniformly drawn pixel and clipped to the image, is cut from the
partner and pasted into the same place of x_i. The label weight is then recomputed from the box
actually pasted: lam = 1 - box area / image area, so a box clipped at a border mixes the labels
by the area it really covers. One box per batch, as in the paper's recipe.

HardMix (Uddin et al., "HardMix: Considering Difficult Examples in Mixed Sample Data Augmentation",
J. of Artificial Intelligence 2024): CutMix whose source patch is cut from "hard samples (which are
frequently being miss-classified by a model)". Only the paper's abstract is available here, so the
exact rule is mdjax's own:
  - Counts: for every example i of the training set the train state keeps `visits[i]` (batches i
    was in) and `mistakes[i]` (how many of those times the model got it wrong). A visit's verdict
    is the model's inference-mode prediction on the clean image at the start of the step (no
    dropout, running BatchNorm statistics), so it depends on the example and the weights, not on
    which other examples share the batch or the device.
  - Hard set: rate r_i = mistakes[i] / visits[i] (0 before the first visit). An example is hard when
    it was misclassified at least once and r_i is at least the k-th largest rate, k =
    ceil(fraction N). Ties at that threshold all count: early in training, when most examples were
    wrong on their only visit, the hard set is larger than the fraction until the rates separate.
  - Sources: the device holds only the batch, so the patch of example j comes from a hard member of
    the same batch other than j, drawn uniformly; an example whose batch has no such member stays
    unmixed (label weight 1). Drawing hard images from the whole training set instead would make the
    host's input pipeline depend on the counts, and the data position would no longer be a pure
    function of the step (the basis of exact resumption). With fraction f and batch B, a batch holds
    f B hard examples on average and none with probability (1 - f)^B (5% at f = 0.1, B = 28).
The counts are cumulative over the stage (the initial training, then afresh for the fine-tune,
whose indices run over real + generated images), so "frequently" means over the whole run so far.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# `config.train.mix`.
MIXES = ("none", "mixup", "cutmix", "hardmix")


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
                       ) -> jax.Array:
  """Mean cross-entropy against probability targets [B, C], smoothed as optax.smooth_labels:
  (1 - s) y + s / C (computed in float32)."""
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def _mix_targets(targets: jax.Array, partner: jax.Array, weight: jax.Array) -> jax.Array:
  """weight[b] * targets[b] + (1 - weight[b]) * targets[partner[b]]."""
  weight = weight.astype(targets.dtype)[:, None]
  return weight * targets + (1 - weight) * targets[partner]


def _beta(key: jax.Array, alpha: float) -> jax.Array:
  """lam ~ Beta(alpha, alpha). Beta(1, 1) is the uniform distribution and is drawn as one: the
  same law, where XLA takes seconds to compile jax.random.beta's gamma sampler on a CPU."""
  if alpha == 1.0:
    return jax.random.uniform(key, (), jnp.float32)
  return jax.random.beta(key, alpha, alpha).astype(jnp.float32)


def mixup(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
  """Mixup: every example blended with its partner of a random permutation, ratio lam ~ Beta."""
  lam_key, perm_key = jax.random.split(key)
  lam = _beta(lam_key, alpha)
  partner = jax.random.permutation(perm_key, images.shape[0])
  mixed = lam * images + (1 - lam) * images[partner]
  return mixed.astype(images.dtype), _mix_targets(targets, partner, jnp.full(images.shape[:1], lam))


def cutmix_box(key: jax.Array, height: int, width: int, alpha: float) -> jax.Array:
  """A CutMix box [top, left, bottom, right) (int32 [4]): sides sqrt(1 - lam) of the image's,
  lam ~ Beta(alpha, alpha), centred at a uniform pixel, clipped to the image."""
  lam_key, y_key, x_key = jax.random.split(key, 3)
  side = jnp.sqrt(1.0 - _beta(lam_key, alpha))
  h = jnp.round(side * height).astype(jnp.int32)
  w = jnp.round(side * width).astype(jnp.int32)
  cy = jax.random.randint(y_key, (), 0, height)
  cx = jax.random.randint(x_key, (), 0, width)
  top, left = cy - h // 2, cx - w // 2
  return jnp.stack([jnp.clip(top, 0, height), jnp.clip(left, 0, width),
                    jnp.clip(top + h, 0, height), jnp.clip(left + w, 0, width)])


def box_mask(box: jax.Array, height: int, width: int) -> jax.Array:
  """bool [H, W]: the pixels inside `box` = [top, left, bottom, right)."""
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return (rows >= box[0]) & (rows < box[2]) & (cols >= box[1]) & (cols < box[3])


def _paste(key, images, targets, partner, mixed, alpha):
  """Pastes one CutMix box of images[partner[b]] into images[b] where mixed[b]."""
  _, height, width, _ = images.shape
  box = cutmix_box(key, height, width, alpha)
  inside = box_mask(box, height, width)[None, :, :, None] & mixed[:, None, None, None]
  area = ((box[2] - box[0]) * (box[3] - box[1])).astype(jnp.float32)
  lam = 1.0 - area / (height * width)
  weight = jnp.where(mixed, lam, 1.0)
  return jnp.where(inside, images[partner], images), _mix_targets(targets, partner, weight)


def cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float
           ) -> tuple[jax.Array, jax.Array]:
  """CutMix: a box of each example's partner (random permutation) pasted into it; the label
  weights follow the pasted box's area."""
  box_key, perm_key = jax.random.split(key)
  partner = jax.random.permutation(perm_key, images.shape[0])
  return _paste(box_key, images, targets, partner, jnp.ones(images.shape[:1], bool), alpha)


def hardmix(key: jax.Array, images: jax.Array, targets: jax.Array, hard: jax.Array, alpha: float
            ) -> tuple[jax.Array, jax.Array]:
  """HardMix: CutMix whose source for example j is drawn uniformly among the batch's hard members
  other than j (`hard`: bool [B]); an example with no such member stays unmixed."""
  box_key, source_key = jax.random.split(key)
  n = images.shape[0]
  allowed = hard[None, :] & ~jnp.eye(n, dtype=bool)  # [j, k]: k may be j's source
  mixed = allowed.any(axis=1)
  drawn = jax.random.categorical(source_key, jnp.where(allowed, 0.0, -jnp.inf), axis=1)
  partner = jnp.where(mixed, drawn, jnp.arange(n))
  return _paste(box_key, images, targets, partner, mixed, alpha)


def init_counts(num_examples: int) -> dict:
  """HardMix's per-example counts for a training set of `num_examples`."""
  return {"mistakes": jnp.zeros((num_examples,), jnp.int32),
          "visits": jnp.zeros((num_examples,), jnp.int32)}


def update_counts(counts: dict, index: jax.Array, wrong: jax.Array) -> dict:
  """Adds one visit for each example `index[b]` of a batch, and a mistake where `wrong[b]`."""
  return {"mistakes": counts["mistakes"].at[index].add(wrong.astype(jnp.int32)),
          "visits": counts["visits"].at[index].add(1)}


def hard_set(counts: dict, fraction: float) -> jax.Array:
  """bool [N]: misclassified at least once, with a rate at least the k-th largest, k = ceil(f N)."""
  mistakes, visits = counts["mistakes"], counts["visits"]
  n = mistakes.shape[0]
  k = min(n, max(1, math.ceil(fraction * n - 1e-9)))
  rate = mistakes.astype(jnp.float32) / jnp.maximum(visits, 1).astype(jnp.float32)
  threshold = jnp.sort(rate)[n - k]
  return (mistakes > 0) & (rate >= threshold)
