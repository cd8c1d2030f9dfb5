"""Sharpness-aware minimisation (Foret et al. 2020) and adaptive SAM (Kwon et al. 2021) as an optax
transform.

One SAM step, given the gradient g = grad L(w) of the current batch:

  SAM:  e = rho * g / ||g||                    (global L2 norm over every parameter)
  ASAM: e = rho * w^2 * g / ||w * g||          (T_w = |w|, so the perturbation scales with |w|)
  g' = grad L(w + e);  the base optimizer applies g' at w.

`sam(base, ...)` returns an `optax.GradientTransformationExtraArgs`; its `update` takes the second
gradient as a callable: `tx.update(g, state, params, grad_fn=f)` with `f(params) -> grads`. The
train step closes `f` over the batch, the dropout key and the *old* BatchNorm statistics, and the
BatchNorm statistics it keeps are those of the first, unperturbed pass (as in the paper's code).

Why mdjax has its own transform instead of `optax.contrib.sam` (optax 0.2.8):
- `optax.contrib.normalize` divides by ||g|| with no epsilon: a zero gradient (a frozen model, a
  batch the model already fits perfectly with label smoothing 0, a dead ReLU head) makes the whole
  update NaN. Here the norm is guarded, so e = 0 and SAM degrades to the base optimizer.
- Its transparent mode needs `sync_period` = 2 calls of `update` per SAM step, which does not fit a
  pure `train_step(state, batch)`; its opaque mode does take `grad_fn`, but with the signature
  `grad_fn(params, i)` and an inner adversarial optimizer whose state is re-initialised each step.
- It has no adaptive (ASAM) form and no way to leave frozen parameters unperturbed.
The transform here is the formula above and nothing else (~30 lines), with no extra state.

Data parallelism (config.train.sam_perturbation; implemented by mdjax.train.steps):
- "per_device" (default, m-sharpness): as in the official SAM JAX code (google-research/sam, under
  pmap), each device perturbs the weights with the gradient of its own slice of the batch and only
  g' is averaged across devices. Foret et al. report that this smaller m generalises better. The
  train step runs under `jax.shard_map` over the "data" mesh axis, differentiates a per-device copy
  of the replicated params (else shard_map's autodiff sums the gradient over devices, making e
  global and g' n times too large), and `grad_fn` ends in a `pmean`.
  BatchNorm then normalises with per-device batch statistics (as under pmap); the running averages
  are averaged across devices so the state stays replicated.
- "global": e comes from the gradient of the whole global batch; a plain `jax.jit` over the sharded
  batch, the result is independent of the number of devices.
With one device both modes compute the same thing.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SAMState(NamedTuple):
  """SAM keeps no state of its own: only the base optimizer's."""
  base_state: optax.OptState


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def sam(base: optax.GradientTransformation,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eps: float = 1e-12,
        perturb_mask: Any | Callable[[Any], Any] | None = None) -> optax.GradientTransformationExtraArgs:
  """Wraps `base` with a sharpness-aware (or adaptive sharpness-aware) perturbation.

  Args:
    base: the optimizer that applies the perturbed gradient g' (any optax transform).
    rho: the radius of the perturbation (0.05 in the paper; 0 makes SAM the base optimizer at twice
      the cost).
    adaptive: ASAM, e = rho * w^2 * g / ||w * g||.
    eps: added to the norm; with a zero gradient e = 0 instead of NaN.
    perturb_mask: a pytree of bools like the params (or a function params -> such a tree); False
      leaves are neither perturbed nor counted in the norm (frozen parameters).

  Returns:
    A transform whose `update(grads, state, params, *, grad_fn, **extra_args)` needs `params` and
    `grad_fn(params) -> grads`, evaluated once at w + e.
  """
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    return SAMState(base_state=base.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    if params is None or grad_fn is None:
      raise ValueError("sam: update() needs params and grad_fn=f with f(params) -> grads.")
    g = updates
    if perturb_mask is not None:
      mask = perturb_mask(params) if callable(perturb_mask) else perturb_mask
      g = jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), g, mask)
    if adaptive:
      wg = jax.tree.map(lambda w, x: w * x, params, g)
      scale = rho / (_global_norm(wg) + eps)
      e = jax.tree.map(lambda w, x: scale * w * x, params, wg)
    else:
      scale = rho / (_global_norm(g) + eps)
      e = jax.tree.map(lambda x: scale * x, g)
    perturbed = jax.tree.map(lambda w, d: (w + d).astype(w.dtype), params, e)
    sam_grads = grad_fn(perturbed)
    new_updates, base_state = base.update(sam_grads, state.base_state, params, **extra_args)
    return new_updates, SAMState(base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
