"""FastGAN losses: hinge with a random margin, generator loss, reconstruction loss.

The reference uses LPIPS (VGG-16 features) to compare D's reconstructions with the real image.
VGG weights cannot be downloaded on the machines mdjax runs on, so the reconstruction loss is a
pixel loss that needs no weights: mean squared error (default, as lightweight-gan does) or mean
absolute error (`config.gan.recon_loss`). Each of the three reconstructions contributes its
per-pixel mean (the reference sums LPIPS over the batch; a mean keeps the scale independent of
the batch size).

One-sided label smoothing (Salimans et al. 2016; the conditional-GAN augmentation paper uses 0.9)
is defined for a cross-entropy D: the real images' target becomes s = 0.9 instead of 1, so D's
optimal real logit is finite (log(s / (1 - s))) and D stops being pushed to ever more confident
verdicts on real images. FastGAN's D has a hinge loss, which has no target but a margin: D is
pushed to logit >= u on real images (u ~ U(0.8, 1.0)) and gets nothing beyond it. The margin plays
the target's part, so smoothing scales the real side's margin: relu(s * u - D(real)), satisfied
with real logits from 0.72 to 0.9 at s = 0.9, which is "less confident on real images" in the hinge
loss's terms. One-sided: the fake side keeps its margin, because smoothing the fake target moves
D's optimum towards G's samples wherever the data has no mass, rewarding G's mistakes (Salimans et
al.'s argument). `smoothing = 1.0` is the reference loss, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

def random_margin(key: jax.Array, shape) -> jax.Array:
  """u ~ U(0.8, 1.0) per logit: the reference's `rand_like(pred) * 0.2 + 0.8`."""
  return jax.random.uniform(key, shape, minval=0.8, maxval=1.0)


def d_hinge_real(logits: jax.Array, key: jax.Array, smoothing: float = 1.0) -> jax.Array:
  """mean(relu(smoothing * u - logits)): the real side, its margin scaled by one-sided smoothing."""
  margin = random_margin(key, logits.shape)
  if smoothing != 1.0:  # the reference loss stays literally the same program
    margin = smoothing * margin
  return jnp.mean(jax.nn.relu(margin - logits))


def d_hinge_fake(logits: jax.Array, key: jax.Array) -> jax.Array:
  return jnp.mean(jax.nn.relu(random_margin(key, logits.shape) + logits))


def g_loss(logits: jax.Array) -> jax.Array:
  return -jnp.mean(logits)


# `config.gan.recon_loss` -> the per-pixel mean error between a reconstruction and its target.
RECON_LOSSES = {
    "mse": lambda pred, target: jnp.mean(jnp.square(pred - target)),
    "l1": lambda pred, target: jnp.mean(jnp.abs(pred - target)),
}


def reconstruction(pred: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  if kind not in RECON_LOSSES:
    raise ValueError(f"recon_loss {kind!r} not in {tuple(RECON_LOSSES)}")
  return RECON_LOSSES[kind](pred, target)
