"""Optimizers and learning-rate schedules from `config.train` / `config.model`.

`make_optimizer` builds, from the inside out:
  [L2 weight decay] -> base optimizer (sgd / adam / adamw) -> [backbone lr multiplier]
  -> [frozen backbone: set_to_zero via multi_transform] -> [SAM]
SAM is the outermost transform so that it sees raw gradients and the base optimizer (with its
decay, multipliers and freezing) applies the perturbed gradient g'.

Choices:
- Weight decay for sgd / adam is the coupled L2 term PyTorch's `weight_decay=` adds (the paper's
  reference code is PyTorch); adamw uses optax's decoupled decay. Either way only kernels (ndim > 1)
  decay: BatchNorm scales and biases are not regularised (the usual practice in big_vision and the
  Flax examples; decaying BN scales towards 0 only fights the normalisation).
- A frozen backbone goes through `optax.multi_transform` with `set_to_zero`, so its parameters get
  no optimizer state at all (no Adam moments for a 100M-parameter backbone), and SAM neither perturbs
  it nor counts it in the gradient norm.
- `backbone_lr_mult` scales the backbone's *updates*, which for every base optimizer here is the
  same as scaling its learning rate (PyTorch param groups), decoupled decay included.
- Schedules are functions of the absolute step: "step" multiplies by `step_gamma` every
  `step_epochs` epochs counted from step 0 (SpinalNet's recipe, x0.1 every 7 epochs), "cosine" decays
  to 0 at the last step after the warmup, warmup is linear from 0 over `warmup_epochs`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mdjax.errors import ConfigError
from mdjax.optim.sam import sam

BACKBONE = "backbone"


def _constant(lr, t, total, warmup, steps_per_epoch):
  return lambda step: jnp.full((), lr, jnp.float32)


def _cosine(lr, t, total, warmup, steps_per_epoch):
  decay = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  return lambda step: decay(jnp.maximum(step - warmup, 0))


def _step(lr, t, total, warmup, steps_per_epoch):
  period = max(int(round(float(t.step_epochs) * steps_per_epoch)), 1)
  gamma = float(t.step_gamma)
  return lambda step: lr * gamma ** (jnp.asarray(step) // period).astype(jnp.float32)


# `config.train.schedule` -> f(lr, config.train, total steps, warmup steps, steps per epoch), the
# learning rate after warm-up as a function of the step.
SCHEDULES = {"constant": _constant, "cosine": _cosine, "step": _step}


def make_schedule(config, steps_per_epoch: int, learning_rate: float | None = None,
                  epochs: int | None = None) -> optax.Schedule:
  """The learning rate as a function of the step for `config.train.schedule`."""
  t = config.train
  lr = float(t.learning_rate if learning_rate is None else learning_rate)
  epochs = int(t.epochs if epochs is None else epochs)
  steps_per_epoch = max(int(steps_per_epoch), 1)
  total = max(epochs * steps_per_epoch, 1)
  warmup = int(round(float(t.warmup_epochs) * steps_per_epoch))
  if t.schedule not in SCHEDULES:
    raise ConfigError("train.schedule", t.schedule, "one of " + ", ".join(SCHEDULES))
  main = SCHEDULES[t.schedule](lr, t, total, warmup, steps_per_epoch)
  if warmup <= 0:
    return main

  def schedule(step):
    step = jnp.asarray(step)
    ramp = lr * step.astype(jnp.float32) / warmup
    return jnp.where(step < warmup, ramp, main(step))

  return schedule


def _is_kernel_tree(params):
  return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def _backbone_labels(params):
  if not (hasattr(params, "keys") and BACKBONE in params):
    raise ConfigError("model.freeze_backbone / model.backbone_lr_mult", "set",
                      "a model whose params have a top-level 'backbone' subtree "
                      f"(found {list(params.keys()) if hasattr(params, 'keys') else type(params)})")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: BACKBONE if getattr(path[0], "key", None) == BACKBONE else "rest", params)


# The optimizers SAM can wrap: name -> f(config.train, schedule). adamw decays weights itself; the
# others get L2 weight decay (train.weight_decay) added to the gradient, kernels only.
BASE_OPTIMIZERS = {
    "sgd": lambda t, schedule: optax.sgd(schedule, momentum=float(t.momentum) or None),
    "adam": lambda t, schedule: optax.adam(schedule),
    "adamw": lambda t, schedule: optax.adamw(schedule, weight_decay=float(t.weight_decay),
                                             mask=_is_kernel_tree),
}
# `config.train.optimizer`: a base optimizer, or "sam" wrapping `config.train.base_optimizer`.
OPTIMIZERS = (*BASE_OPTIMIZERS, "sam")


def _base_optimizer(name: str, t, schedule) -> optax.GradientTransformation:
  if name not in BASE_OPTIMIZERS:
    raise ConfigError("train.base_optimizer" if t.optimizer == "sam" else "train.optimizer", name,
                      "one of " + ", ".join(BASE_OPTIMIZERS))
  parts = []
  if t.weight_decay and name != "adamw":
    parts.append(optax.add_decayed_weights(t.weight_decay, mask=_is_kernel_tree))
  parts.append(BASE_OPTIMIZERS[name](t, schedule))
  return optax.chain(*parts)


def make_optimizer(config, steps_per_epoch: int, learning_rate: float | None = None,
                   epochs: int | None = None) -> optax.GradientTransformationExtraArgs:
  """The optimizer for `config.train.optimizer` ("sam" wraps `config.train.base_optimizer`).

  Args:
    config: the full config (reads `train` and `model.freeze_backbone` / `backbone_lr_mult`).
    steps_per_epoch: optimizer steps per epoch (schedules are written in epochs).
    learning_rate: overrides `config.train.learning_rate` (fine-tuning uses its own).
    epochs: overrides `config.train.epochs` (the length of the cosine schedule).

  Returns:
    A transform whose `update` accepts `grad_fn=` (required for SAM, ignored otherwise), so one train
    step serves every optimizer.
  """
  t, m = config.train, config.model
  schedule = make_schedule(config, steps_per_epoch, learning_rate, epochs)
  use_sam = t.optimizer == "sam"
  tx = _base_optimizer(t.base_optimizer if use_sam else t.optimizer, t, schedule)
  freeze = bool(m.freeze_backbone)
  mult = float(m.backbone_lr_mult)
  if not freeze and mult != 1.0:
    tx = optax.chain(tx, optax.multi_transform(
        {BACKBONE: optax.scale(mult), "rest": optax.identity()}, _backbone_labels))
  perturb_mask = None
  if freeze:
    tx = optax.multi_transform({BACKBONE: optax.set_to_zero(), "rest": tx}, _backbone_labels)
    perturb_mask = lambda params: jax.tree.map(lambda label: label != BACKBONE,
                                               _backbone_labels(params))
  if use_sam:
    return sam(tx, rho=float(t.sam_rho), adaptive=bool(t.sam_adaptive), perturb_mask=perturb_mask)
  return optax.with_extra_args_support(tx)
