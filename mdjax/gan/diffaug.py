"""DiffAugment (Zhao et al., NeurIPS 2020) for NHWC batches, with explicit keys.

The formulas of the reference DiffAugment code, per image: brightness + U(-0.5, 0.5); saturation
(x - mean_c) * U(0, 2) + mean_c; contrast (x - mean_chw) * U(0.5, 1.5) + mean_chw; translation by an
integer in [-R/8, R/8] on each axis with zero fill; cutout of a zeroed (R/2) x (R/2) square whose
centre is uniform over the image (clipped at the borders). Everything is differentiable in x and
vectorised over the batch: translation is a gather with out-of-range reads masked to 0, cutout a
broadcast comparison mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

def parse_policy(policy: str) -> tuple[str, ...]:
  names = tuple(p.strip() for p in str(policy).split(",") if p.strip())
  bad = [p for p in names if p not in POLICIES]
  if bad:
    raise ValueError(f"unknown DiffAugment policy {bad}; expected a subset of {tuple(POLICIES)}")
  return names


def _uniform(key, b, lo, hi):
  return jax.random.uniform(key, (b, 1, 1, 1), minval=lo, maxval=hi)


def color(x: jax.Array, key: jax.Array) -> jax.Array:
  kb, ks, kc = jax.random.split(key, 3)
  b = x.shape[0]
  x = x + _uniform(kb, b, -0.5, 0.5)
  mean_c = x.mean(axis=3, keepdims=True)
  x = (x - mean_c) * _uniform(ks, b, 0.0, 2.0) + mean_c
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) * _uniform(kc, b, 0.5, 1.5) + mean


def translation(x: jax.Array, key: jax.Array, ratio: float = 0.125) -> jax.Array:
  b, h, w, _ = x.shape
  sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  kx, ky = jax.random.split(key)
  tx = jax.random.randint(kx, (b, 1), -sh, sh + 1)
  ty = jax.random.randint(ky, (b, 1), -sw, sw + 1)
  rows = jnp.arange(h)[None, :] + tx  # [B, H]: output row i reads input row i + tx
  cols = jnp.arange(w)[None, :] + ty
  row_ok = (rows >= 0) & (rows < h)
  col_ok = (cols >= 0) & (cols < w)
  # Two 1-D gathers (rows, then columns) instead of one 2-D gather: their backward passes are
  # cheap scatter-adds along one axis.
  x = jnp.take_along_axis(x, jnp.clip(rows, 0, h - 1)[:, :, None, None], axis=1)
  x = jnp.take_along_axis(x, jnp.clip(cols, 0, w - 1)[:, None, :, None], axis=2)
  mask = (row_ok[:, :, None] & col_ok[:, None, :])[..., None]
  return jnp.where(mask, x, 0.0)


def cutout(x: jax.Array, key: jax.Array, ratio: float = 0.5) -> jax.Array:
  b, h, w, _ = x.shape
  ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  kx, ky = jax.random.split(key)
  ox = jax.random.randint(kx, (b, 1), 0, h + (1 - ch % 2))
  oy = jax.random.randint(ky, (b, 1), 0, w + (1 - cw % 2))
  r = jnp.arange(h)[None, :] - (ox - ch // 2)
  c = jnp.arange(w)[None, :] - (oy - cw // 2)
  in_r = (r >= 0) & (r < ch)
  in_c = (c >= 0) & (c < cw)
  keep = ~(in_r[:, :, None] & in_c[:, None, :])
  return x * keep[..., None].astype(x.dtype)


# `config.gan.diffaug` names a comma-separated subset; each transform draws from its own key.
POLICIES = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: jax.Array, key: jax.Array, policy: str | tuple[str, ...]) -> jax.Array:
  """Applies the policy's transforms in order ("color,translation" is FastGAN's)."""
  names = parse_policy(policy) if isinstance(policy, str) else tuple(policy)
  keys = jax.random.split(key, len(POLICIES))
  for name in names:
    x = POLICIES[name](x, keys[list(POLICIES).index(name)])
  return x
