"""PGD adversarial training (Madry et al., ICLR 2018): the train step trains on the batch's
worst case within an L-infinity ball, found by projected gradient ascent on the loss.

  x_0 = clip(x + u, 0, 1),  u ~ Uniform[-eps, eps]^d        (the random start of Madry et al.)
  x_{t+1} = clip(Proj_{|x' - x| <= eps}(x_t + a sign(grad_x L(x_t))), 0, 1)

in the model's input space [0, 1] (eps = 8/255 is the usual CIFAR value). The step size a defaults
to 2.5 eps / steps, Madry et al.'s choice, so the iterates can cross the ball from any start.
Projection onto the eps-ball then onto [0, 1] keeps both constraints: the box [x - eps, x + eps]
intersected with [0, 1] is again a box, and clipping coordinate-wise onto it is that projection.

The loss the attack climbs is the one the step trains on (soft targets after Mixup / CutMix,
label smoothing included), with the model in inference mode (no dropout, running BatchNorm
statistics), as TRADES (Zhang et al., 2019) and many PGD training codes craft their attacks: the
attack then updates no statistics and treats every example on its own, so it is the same however
the batch is split over devices. The optimizer step (plain or SAM, whose two passes both see the
adversarial batch) follows on the returned images; no gradient flows through the attack.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def pgd_step_size(eps: float, steps: int, step_size: float = 0.0) -> float:
  """`step_size`, or Madry et al.'s 2.5 eps / steps when it is 0."""
  return float(step_size) if step_size else 2.5 * float(eps) / int(steps)


def pgd_attack(loss_fn: Callable[[jax.Array], jax.Array], key: jax.Array, images: jax.Array,
               eps: float, steps: int, step_size: float) -> jax.Array:
  """`steps` signed-gradient ascent steps on `loss_fn(images) -> scalar` from a random start in
  the eps-ball, each projected onto the ball and onto [0, 1]; returns the adversarial images."""
  images = jax.lax.stop_gradient(images)
  low, high = jnp.maximum(images - eps, 0.0), jnp.minimum(images + eps, 1.0)
  start = images + jax.random.uniform(key, images.shape, images.dtype, -eps, eps)
  grad = jax.grad(loss_fn)

  def ascend(_, x):
    return jnp.clip(x + step_size * jnp.sign(grad(x)), low, high)

  adversarial = jax.lax.fori_loop(0, steps, ascend, jnp.clip(start, low, high))
  return jax.lax.stop_gradient(adversarial)
