"""Pure, jitted classifier steps: the train state, one optimizer step, one evaluation step.

Sharding: the whole `TrainState` is replicated (`NamedSharding(mesh, P())`) and every batch is
sharded over the "data" mesh axis; the step is compiled once by `jax.jit` with those shardings and
donates the old state. Classifiers fit on one device, so data parallelism is all mdjax needs; the
same code runs unchanged on one CPU, several CPU devices in tests, and GPUs.

Randomness: the state carries one key; the step's dropout key is `fold_in(state.rng, state.step)`,
so a run resumed from a checkpoint draws exactly the keys the uninterrupted run would have.

SAM (see mdjax.optim.sam): `config.train.sam_perturbation == "global"` is the plain jitted step,
where the gradient is that of the global batch. "per_device" wraps the step body in `jax.shard_map`
over "data": each device computes its own gradient and perturbation, and only g' (plus the loss,
metrics and BatchNorm running averages) is averaged across devices, by
`mdjax.core.collectives.ordered_mean`: added in device order, so the step gives the same bits
whether the devices sit in one process or several (1 x 4 = 2 x 2, tests/test_multiprocess_pipeline.py).
Plain optimizers always use the global form, for which the result does not depend on the number of
devices up to rounding: its reductions are XLA's (the partitioner's all-reduces, whose order follows
the process layout).

Augmentation on device (`config.train.mix`, `config.train.pgd_eps`; mdjax.train.mixing and
mdjax.train.adversarial): Mixup / CutMix / HardMix and then PGD transform the global batch at the
start of the jitted step, before the (possibly per-device) body, with keys folded from the step's
key; the body then trains on soft targets. HardMix's per-example counts live in the state
(`TrainState.hard_examples`) and are updated from the batch's "index" entry. With both off the
step is the plain one: nothing is added to its computation.

CPU: when the mesh is made of CPU devices the step compiles with mdjax.core.cpu_conv's compiler
options (Eigen's convolutions, not YNNPACK's) and its gradient rules (strided convolutions' input
gradients and most weight gradients as matmuls): 2.2 -> 1.5 s a WRN-16-4 b128 Adam step there.
GPUs keep XLA's (cuDNN's) convolutions and gradients.
Random bits (init, dropout) use the non-partitionable threefry, see INIT_THREEFRY_PARTITIONABLE.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from mdjax.core import cpu_conv, process
from mdjax.core.collectives import ordered_mean, varying_axes
from mdjax.core.mesh import DATA_AXIS, auto_mesh, batch_sharding, replicated
from mdjax.errors import ConfigError
from mdjax.train import adversarial, mixing

# Where SAM's perturbation is computed (`config.train.sam_perturbation`, module docstring).
SAM_PERTURBATIONS = ("per_device", "global")


@flax.struct.dataclass
class TrainState:
  """Everything a classifier run needs to continue: a pytree orbax can save as is."""
  step: jax.Array  # int32 scalar: optimizer steps taken; also the input pipeline's position
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key (saves as a plain array)
  # HardMix only (train.mix == "hardmix"): {"mistakes", "visits"}: int32 [N], one per training
  # example (mdjax.train.mixing); None otherwise, which adds nothing to the pytree.
  hard_examples: Any = None

  @property
  def variables(self) -> dict:
    v = {"params": self.params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Inside a jitted step: lays the batch out over "data" whatever the caller passed."""
  return jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ConfigError("train.batch_size", batch_size,
                      f"a multiple of the number of devices ({n}); the batch is split evenly "
                      "over the 'data' mesh axis")


# Initialisation draws every parameter with the non-partitionable threefry. Measured on the 2-core
# CPU (jax 0.10.2): with the default partitionable threefry, XLA takes 5-8 s to compile ONE random
# draw of a 4-D shape such as a (3, 3, 3, 8) kernel (0.5 s for a 1-D one, 0.9 s non-partitionable),
# so a model's init compiled for minutes. The state is replicated, so nothing is lost by drawing it
# unpartitioned; the values differ from `model.init` under the default setting, which is fine.
INIT_THREEFRY_PARTITIONABLE = False


def _init_fn(model, tx, image_shape, num_examples=0):
  def init(rng, init_variables):
    init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    if init_variables is None:
      dummy = jnp.zeros((1, *image_shape), jnp.float32)
      init_variables = model.init({"params": init_rng, "dropout": dropout_rng}, dummy, train=False)
    params = init_variables["params"]
    batch_stats = init_variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=state_rng,
                      hard_examples=mixing.init_counts(num_examples) if num_examples else None)
  return init


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, int, int], mesh: Mesh,
                       init_variables: dict | None = None, num_examples: int = 0) -> TrainState:
  """A replicated TrainState, created directly with its sharding (no host copy, no re-layout).

  Args:
    model: the classifier (flax.linen), called as `model.apply(v, images, train=...)`.
    tx: the optimizer (mdjax.optim.make_optimizer).
    rng: a raw uint32 key; split into init, dropout-at-init and the state's own key.
    image_shape: (H, W, 3) of one input image.
    mesh: the device mesh with a "data" axis.
    init_variables: {"params", "batch_stats"} to start from (fine-tuning); a fresh optimizer state.
    num_examples: the training set's size, for HardMix's per-example counts (0: no counts).
  """
  init = _init_fn(model, tx, image_shape, num_examples)
  with jax.threefry_partitionable(INIT_THREEFRY_PARTITIONABLE):
    return jax.jit(init, out_shardings=replicated(mesh))(rng, init_variables)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                         image_shape: tuple[int, int, int], mesh: Mesh,
                         init_variables: dict | None = None, num_examples: int = 0) -> TrainState:
  """The state's shapes, dtypes and shardings without computing it (the target of a restore)."""
  with jax.threefry_partitionable(INIT_THREEFRY_PARTITIONABLE):
    shapes = jax.eval_shape(_init_fn(model, tx, image_shape, num_examples), rng, init_variables)
  rep = replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


def _with_unpartitioned_threefry(jitted):
  """Calls `jitted` (traced and cached) with the non-partitionable threefry.

  The only random bits in a classifier step are dropout masks ([B, F] in the head, [B, 1, 1, 1]
  for drop-connect): tiny next to the convolutions, so drawing them unpartitioned costs nothing,
  while the partitionable threefry adds seconds of XLA compile time per mask shape on CPU (see
  INIT_THREEFRY_PARTITIONABLE). Either way jit's result does not depend on the sharding, so the
  same masks are drawn on 1 or N devices. `.jitted` is the jitted function (for `.lower`).
  """
  @functools.wraps(jitted)
  def call(*args):
    with jax.threefry_partitionable(INIT_THREEFRY_PARTITIONABLE):
      return jitted(*args)

  call.jitted = jitted
  return call


# Folded into the step's key for the batch transforms (mixing, PGD); the dropout key stays
# fold_in(rng, step) as before, so turning augmentation on leaves the dropout masks unchanged.
_AUGMENT_KEY = 0x6D6978


def _to_varying(tree, axis_name):
  return jax.tree.map(
      lambda a: a if axis_name in varying_axes(a) else
      jax.lax.pcast(a, axis_name, to="varying"),
      tree)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy with label smoothing (computed in float32).

  `labels` are class indices [B], or probability targets [B, C] (after Mixup / CutMix / HardMix),
  which `mixing.soft_cross_entropy` smooths the same way. `weights` [B] (class indices only)
  makes it the weighted mean sum_i w_i CE_i / sum_i w_i.
  """
  if labels.ndim == logits.ndim:
    return mixing.soft_cross_entropy(logits, labels, label_smoothing)
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(labels, num_classes)
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  if weights is None:
    return losses.mean()
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1e-12)


def generated_weights(generated: jax.Array, weight: float) -> jax.Array:
  """Per-example loss weights [B]: `weight` for generated images (generated = 1), 1 for real."""
  return jnp.where(generated > 0, jnp.float32(weight), jnp.float32(1.0))


def apply_with_separate_norms(model: nn.Module, variables: dict, images: jax.Array,
                              generated: jax.Array, rng: jax.Array):
  """A train-mode forward pass in which real and generated images keep separate BatchNorm
  statistics (the auxiliary BatchNorm of Diversify, Don't Fine-Tune): real images are normalised
  with the real images' batch statistics, generated ones with the generated images', and only the
  real images' statistics enter the running averages that evaluation uses. Returns (logits,
  batch_stats).

  Two passes of the whole batch, each with a BatchNorm mask (flax's `mask`), and each image's
  logits taken from its own pass: twice a plain step's compute, no shapes that depend on how many
  generated images a batch holds. A batch without one of the two kinds normalises that pass with
  the whole batch (its logits are not used), and keeps the old running averages if it has no
  real image.
  """
  is_generated = generated > 0
  shape = (-1, 1, 1, 1)

  def mask(rows):
    return jnp.where(jnp.any(rows), rows, True).astype(jnp.float32).reshape(shape)

  real_logits, updates = model.apply(variables, images, train=True, rngs={"dropout": rng},
                                     mutable=["batch_stats"], norm_mask=mask(~is_generated))
  generated_logits, _ = model.apply(variables, images, train=True, rngs={"dropout": rng},
                                    mutable=["batch_stats"], norm_mask=mask(is_generated))
  logits = jnp.where(is_generated[:, None], generated_logits, real_logits)
  old = variables.get("batch_stats", {})
  new = updates.get("batch_stats", old)
  stats = jax.tree.map(lambda n, o: jnp.where(jnp.any(~is_generated), n, o), new, old)
  return logits, stats


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config, mesh: Mesh,
                    *, fast_conv_grads: bool | None = None, generated_weight: float = 1.0,
                    separate_norms: bool = False
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns `train_step(state, batch) -> (state, metrics)`, jitted once, donating `state`.

  `batch` = {"image": float32 [B, H, W, 3] in [0, 1], "label": int32 [B]} sharded over "data"
  (extra keys are ignored), plus "index": int32 [B] (each example's position in the training set)
  for HardMix, whose counts the state then holds (`create_train_state(num_examples=...)`).
  `metrics` = {"loss", "accuracy", "grad_norm", "learning_rate"?} as replicated device scalars
  (on the batch as trained: mixed and attacked; a mixed example counts as correct when the model
  picks the class of larger weight): reading them is the only host sync, and the loop does it only
  at logging points. `grad_norm` is that of the first (unperturbed) gradient; a non-finite gradient
  shows up there before it reaches the loss.

  Fine-tuning on real and generated images (the batch then carries "generated": float32 [B], 1
  for a generated image): `generated_weight` weighs generated images' loss against real ones'
  (`cross_entropy`'s weighted mean; 1 = the paper), and `separate_norms` gives them BatchNorm
  statistics of their own (`apply_with_separate_norms`). Neither combines with train.mix (a
  mixed image is part real, part generated).

  `fast_conv_grads` (default: when the mesh's devices are CPUs) compiles the step with
  mdjax.core.cpu_conv's CPU compiler options and gradient rules, and (on one device, or inside
  the per-device SAM body) oneDNN's convolutions (mdjax.core.onednn): the same gradients, faster
  steps on XLA's CPU backend (figures in benchmarks/RESULTS.md); other backends keep XLA's own
  convolutions.
  """
  if fast_conv_grads is None:
    fast_conv_grads = mesh.devices.flat[0].platform == "cpu"
  # On the CPU every backbone compiles with Eigen's convolutions (cpu_conv's compiler options) and
  # the gradient rules for them. EfficientNet's depthwise convolutions are not convolutions there
  # (cpu_conv's depthwise rule), and its dense ones gain as the WRNs' do (B0 224x224 b8: Adam
  # 1.05-1.10x, SAM 1.12x against XLA's defaults; benchmarks/RESULTS.md).
  t = config.train
  label_smoothing = float(t.label_smoothing)
  per_device = t.optimizer == "sam" and t.sam_perturbation == "per_device"
  # oneDNN's convolutions (mdjax.core.onednn) where nothing is GSPMD-partitioned: XLA would
  # gather a custom call's operands onto every device. So on one device, or inside the per-device
  # body's shard_map; the mixes and attacks, which see the global batch, only on one device.
  onednn_body = fast_conv_grads and (mesh.size == 1 or per_device)
  onednn_global = fast_conv_grads and mesh.size == 1
  mix = str(t.mix)
  if mix not in mixing.MIXES:
    raise ConfigError("train.mix", mix, "one of " + ", ".join(mixing.MIXES))
  uses_generated = separate_norms or generated_weight != 1.0
  if uses_generated and mix != "none":
    raise ConfigError("train.mix", mix, "none when fine-tuning with finetune.generated_weight != 1 "
                      "or finetune.separate_bn (a mixed image is part real, part generated)")
  mix_alpha = float(t.mix_alpha)
  pgd_eps, pgd_steps = float(t.pgd_eps), int(t.pgd_steps)
  pgd_step_size = (adversarial.pgd_step_size(pgd_eps, pgd_steps, float(t.pgd_step_size))
                   if pgd_eps else 0.0)

  # The step's models: the same parameters, with the convolutions this step runs (explicit, per
  # program: mdjax.core.cpu_conv.Rules on CPUs; XLA's own elsewhere and for the FLOP twin).
  body_model = _with_conv(model, cpu_conv.Rules.with_eigen(True, onednn_body)
                          if fast_conv_grads else None)
  global_model = _with_conv(model, cpu_conv.Rules.with_eigen(True, onednn_global)
                            if fast_conv_grads else None)

  def loss_fn(params, batch_stats, images, labels, rng, generated=None):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    if separate_norms:
      logits, new_stats = apply_with_separate_norms(body_model, variables, images, generated, rng)
    else:
      logits, updates = body_model.apply(variables, images, train=True, rngs={"dropout": rng},
                                         mutable=["batch_stats"])
      new_stats = updates.get("batch_stats", batch_stats)
    weights = generated_weights(generated, generated_weight) if generated_weight != 1.0 else None
    loss = cross_entropy(logits, labels, label_smoothing, weights)
    return loss, (logits, new_stats)

  def body(state: TrainState, images, labels, generated=None, axis_name=None):
    rng = jax.random.fold_in(state.rng, state.step)
    params = state.params
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))  # own dropout mask per device
      # Differentiate with respect to a per-device copy of the replicated params: the gradient of
      # a replicated input is otherwise summed over devices by shard_map's autodiff, and SAM's
      # per-device perturbation needs each device's own gradient.
      params = _to_varying(params, axis_name)
    (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state.batch_stats, images, labels, rng, generated)

    def sam_grad_fn(params):
      # Old batch statistics, same batch and dropout mask: only the weights move. The BatchNorm
      # updates of this second pass are dropped (statistics come from the unperturbed pass).
      def loss_at(p):
        return loss_fn(p, state.batch_stats, images, labels, rng, generated)[0]
      if axis_name is None:
        return jax.grad(loss_at)(params)
      return ordered_mean(jax.grad(loss_at)(_to_varying(params, axis_name)), axis_name)

    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=sam_grad_fn)
    params = optax.apply_updates(state.params, updates)
    if labels.ndim == 2:  # soft targets: accuracy against the class with the larger weight
      labels = jnp.argmax(labels, -1)
    metrics = {"loss": loss,
               "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
               "grad_norm": _global_norm(grads)}
    if axis_name is not None:
      metrics, new_batch_stats = ordered_mean((metrics, new_batch_stats), axis_name)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  if per_device:
    batch_specs = (P(DATA_AXIS),) * (3 if uses_generated else 2)
    sharded_body = jax.shard_map(
        functools.partial(body, axis_name=DATA_AXIS), mesh=auto_mesh(mesh),
        in_specs=(P(), *batch_specs), out_specs=(P(), P()))
  else:
    sharded_body = body

  def augment(state, batch):
    """Mix, then attack, the global batch: (images, soft or hard targets, HardMix counts)."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _AUGMENT_KEY)
    mix_key, pgd_key = jax.random.split(key)
    images, targets, counts = batch["image"], batch["label"], state.hard_examples
    if mix != "none":
      num_classes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                                   state.variables, images).shape[-1]
      targets = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
    if mix == "mixup":
      images, targets = mixing.mixup(mix_key, images, targets, mix_alpha)
    elif mix == "cutmix":
      images, targets = mixing.cutmix(mix_key, images, targets, mix_alpha)
    elif mix == "hardmix":
      # This visit's verdict on the clean images (inference mode: see mdjax.train.mixing).
      logits = model.apply(state.variables, images, train=False)
      wrong = jnp.argmax(logits, -1) != batch["label"]
      counts = mixing.update_counts(counts, batch["index"], wrong)
      hard = mixing.hard_set(counts, float(t.hardmix_fraction))[batch["index"]]
      images, targets = mixing.hardmix(mix_key, images, targets, hard, mix_alpha)
    if pgd_eps:
      def attack_loss(x):
        logits = global_model.apply(state.variables, x, train=False)
        return cross_entropy(logits, targets, label_smoothing)
      images = adversarial.pgd_attack(attack_loss, pgd_key, images, pgd_eps, pgd_steps,
                                      pgd_step_size)
    return images, targets, counts

  def step_fn(state, batch):
    if uses_generated:
      if "generated" not in batch:
        raise ValueError("finetune.generated_weight / separate_bn need each example's "
                         "'generated' flag in the batch (a fine-tune source from "
                         "mdjax.data.sources.tagged).")
      keys = ("image", "label", "generated")
      batch = shard_batch({k: batch[k] for k in keys}, mesh)
      images = batch["image"]
      if pgd_eps:
        images = augment(state, batch)[0]
      return sharded_body(state, images, batch["label"], batch["generated"])
    if mix == "none" and not pgd_eps:
      batch = shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
      return sharded_body(state, batch["image"], batch["label"])
    keys = ("image", "label", "index") if mix == "hardmix" else ("image", "label")
    if mix == "hardmix" and ("index" not in batch or state.hard_examples is None):
      raise ValueError("train.mix=hardmix needs each example's training-set position in the batch "
                       "(pipeline.train_batches(with_index=True)) and per-example counts in the "
                       "state (create_train_state(num_examples=...)).")
    images, targets, counts = augment(state, shard_batch({k: batch[k] for k in keys}, mesh))
    new_state, metrics = sharded_body(state, images, targets)
    return new_state.replace(hard_examples=counts), metrics

  rep, data = replicated(mesh), batch_sharding(mesh)
  return _with_unpartitioned_threefry(
      cpu_conv.jit(step_fn, enable=fast_conv_grads, in_shardings=(rep, data),
                   out_shardings=(rep, rep), donate_argnums=(0,)))


def _with_conv(model: nn.Module, conv) -> nn.Module:
  """`model` with its convolutions running `conv` (Classifier.with_conv); a model without
  convolution choices (a test's stand-in) as it is."""
  return model.with_conv(conv) if hasattr(model, "with_conv") else model


def make_eval_step(model: nn.Module, num_classes: int, mesh: Mesh
                   ) -> Callable[[dict, dict, dict], dict]:
  """Returns `eval_step(variables, batch, counts) -> counts + this batch's counts`.

  `counts` = {"confusion": int32 [devices, C, C], "loss": float32 [devices, C]}, one slice per
  device of the "data" axis (sharded over it; start from `eval_counts_init`):
  `confusion[d, i, j]` counts the examples of true class i that device d's share of the batches
  predicted as j, and `loss[d, i]` sums their cross-entropy (the tie-breaker between classes of
  equal accuracy, mdjax.pipeline.stages.worst_classes). Examples with `batch["mask"] == 0` (the
  padding of the last batch) count nowhere, so one pass of `eval_batches` counts every example
  exactly once; `eval_counts` adds up the devices at the end.

  Why per-device counts carried from step to step, and no cross-device sum in the step: an
  evaluation then runs no collective at all until `eval_counts` reads the counts once per pass
  (through the coordination service in a multi-process run, mdjax.core.process.fetch_sharded),
  where a sum in every step was one all-reduce per batch. The old totals are donated.
  """
  n = mesh.shape[DATA_AXIS]

  def step(variables, batch, counts):
    batch = shard_batch(batch, mesh)
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels = batch["label"]
    mask = batch["mask"] if "mask" in batch else jnp.ones(labels.shape, jnp.float32)
    true = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes, dtype=jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # Each device's share of the batch on its own row ([devices, B / devices, C], the batch's
    # own split over "data"), so the contractions below stay on each device. A matmul instead
    # of a scatter: exact in float32 for shares below 2**24 examples.
    true, pred = (a.reshape(n, -1, num_classes) for a in (true, pred))
    confusion = jnp.round(jnp.einsum("dbi,dbj->dij", true, pred)).astype(jnp.int32)
    losses = jnp.einsum("dbi,db->di", true, loss.reshape(n, -1))
    return {"confusion": counts["confusion"] + confusion, "loss": counts["loss"] + losses}

  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data, data), out_shardings=data, donate_argnums=2)


def eval_counts_init(num_classes: int, mesh: Mesh) -> dict:
  """Zero per-device counts for `make_eval_step`'s first step."""
  n = mesh.shape[DATA_AXIS]
  return process.put_global({"confusion": np.zeros((n, num_classes, num_classes), np.int32),
                             "loss": np.zeros((n, num_classes), np.float32)},
                            batch_sharding(mesh))


def eval_counts(counts: dict) -> dict:
  """{"confusion", "correct", "total"} (int64 numpy) and "class_loss" (float64 [C], the mean
  cross-entropy of each class's examples; NaN for a class with none) from `make_eval_step`'s
  per-device counts.

  A collective in a multi-process run (every process reads every device's counts): every process
  must call it at the same point.
  """
  host = process.fetch_sharded(counts)
  total = np.asarray(host["confusion"], np.int64).sum(axis=0)
  per_class = total.sum(axis=1)
  loss = np.asarray(host["loss"], np.float64).sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    class_loss = np.where(per_class > 0, loss / np.maximum(per_class, 1), np.nan)
  return {"confusion": total, "correct": np.diagonal(total).copy(), "total": per_class,
          "class_loss": class_loss}


def class_wise_accuracy(counts: dict) -> np.ndarray:
  """Per-class accuracy (CWA) from `{"correct": [C], "total": [C]}`; NaN for a class with no examples."""
  correct = np.asarray(counts["correct"], np.float64)
  total = np.asarray(counts["total"], np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, correct / np.maximum(total, 1), np.nan)
