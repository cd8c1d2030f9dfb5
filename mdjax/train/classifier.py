"""The resumable classifier training loop and whole-source evaluation.

Read top to bottom, `train_classifier` is: set up (mesh, model, optimizer, state created sharded or
restored from the newest checkpoint), the input stream from the restored step, the loop, the end.

Resumption is exact: the checkpoint holds the whole TrainState (step, params, batch stats, optimizer
state, rng) plus the history; the data stream's position is a pure function of the step
(`pipeline.train_batches(start_step=...)`) and the step's dropout key is `fold_in(rng, step)`. A
killed run therefore continues from its last checkpoint to the same parameters an uninterrupted run
reaches; a damaged newest checkpoint is set aside and the run continues from the one before it (or
starts over), to the same parameters again. Checkpoints are written every
`config.train.checkpoint_every` steps and at every epoch end, asynchronously (orbax); the loop waits
for the last save before it returns, also when it fails.

Host syncs: the step's metrics stay on device and are fetched to the host only at logging
points (every `log_every` steps, before each checkpoint, at epoch ends). That is also where a NaN or
infinite loss or gradient is caught, and since a checkpoint is only written after its window passed
the check, the newest checkpoint is always a good one when `NonFiniteLossError` is raised.

Outputs in `workdir/<tag>/`: `checkpoints/` (orbax) and `tensorboard/` (tensorboardX, written by
process 0 only); a tqdm bar shows steps/s, loss and accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mdjax import models, optim
from mdjax.core import loop, mesh as mesh_lib, process
from mdjax.core.checkpoint import Checkpoints
from mdjax.data import pipeline
from mdjax.errors import ConfigError, NonFiniteLossError, UserError
from mdjax.train import steps as steps_lib
from mdjax.train.steps import TrainState, class_wise_accuracy

__all__ = ["TrainResult", "class_wise_accuracy", "evaluate", "train_classifier"]


@dataclasses.dataclass
class TrainResult:
  """What `train_classifier` returns.

  variables: {"params", "batch_stats"} of the final step (replicated jax.Arrays).
  history: per epoch: "epoch", "step", "train_loss", "train_accuracy" (means over the epoch's steps),
    "learning_rate" (at the epoch's last step), "val_accuracy", "val_class_wise_accuracy" (lists;
    the val entries are NaN without a validation source).
  checkpoint_dir: where the checkpoints are.
  state: the final TrainState (its step says how many optimizer steps were taken).
  """
  variables: dict
  history: dict
  checkpoint_dir: str
  state: TrainState


def _empty_history() -> dict:
  return {"epoch": [], "step": [], "train_loss": [], "train_accuracy": [], "learning_rate": [],
          "val_accuracy": [], "val_class_wise_accuracy": [],
          # Sums over the current epoch's steps so far: a run resumed mid-epoch still reports
          # the whole epoch's mean loss.
          "partial": {"loss": 0.0, "accuracy": 0.0, "steps": 0}}


def _num_classes(model: nn.Module, variables: dict, image_size: int) -> int:
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return int(jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, dummy).shape[-1])


def evaluate(model: nn.Module, variables: dict, source, config, mesh: Mesh | None = None, *,
             batch_size: int | None = None, eval_step: Callable | None = None) -> dict:
  """Counts over one pass of `source`: every example exactly once (the padded tail counts nowhere).

  Args:
    model: the classifier.
    variables: {"params", "batch_stats"}.
    source: a random-access source (`len`, `src[i] -> {"image", "label"}`).
    config: the full config (reads data.image_size, data.num_threads / prefetch, train.batch_size).
    mesh: the device mesh (default: all devices).
    batch_size: the global eval batch (default train.batch_size, rounded up to fill the devices).
    eval_step: a step from `steps.make_eval_step` to reuse (the loop passes its compiled one).

  Returns:
    {"correct": int64 [C], "total": int64 [C], "confusion": int64 [C, C] (rows: true class,
    columns: predicted), "accuracy": float, "class_wise_accuracy": float64 [C] (NaN where a class
    has no example), "class_loss": float64 [C] (the mean cross-entropy of each class's examples)}.
  """
  mesh = mesh or mesh_lib.data_mesh()
  size = int(config.data.image_size)
  variables = process.put_global(dict(variables), mesh_lib.replicated(mesh))
  num_classes = _num_classes(model, variables, size)
  if eval_step is None:
    eval_step = steps_lib.make_eval_step(model, num_classes, mesh)
  batch_size = pipeline.eval_batch_size(batch_size or int(config.train.batch_size), mesh)
  counts = steps_lib.eval_counts_init(num_classes, mesh)
  for batch in pipeline.eval_batches(source, batch_size=batch_size, image_size=size, mesh=mesh,
                                     augment=str(config.data.augment),
                                     num_threads=int(config.data.num_threads),
                                     prefetch=int(config.data.prefetch)):
    # Summed on device, per device: one host transfer (and one collective) per pass.
    counts = eval_step(variables, batch, counts)
  counts = steps_lib.eval_counts(counts)
  n = counts["total"].sum()
  counts["accuracy"] = float(counts["correct"].sum() / n) if n else float("nan")
  counts["class_wise_accuracy"] = class_wise_accuracy(counts)
  return counts


def _check_finite(window: list[dict], first_step: int, checkpoint_dir: str, last_saved) -> None:
  bad = loop.first_non_finite(window, ("loss", "grad_norm"))
  if bad is not None:
    m = window[bad]
    where = (f"the last good checkpoint is step {last_saved} in {checkpoint_dir}"
             if last_saved is not None else "no checkpoint was written yet")
    raise NonFiniteLossError(
        f"Training diverged at step {first_step + bad + 1}: loss={float(m['loss'])}, "
        f"gradient norm={float(m['grad_norm'])}; {where}. Lower train.learning_rate, add "
        "train.warmup_epochs, or check the data for broken images.")


def train_classifier(config, train_source, val_source, workdir: str, num_classes: int, *,
                     init_variables: dict | None = None, epochs: int | None = None,
                     learning_rate: float | None = None, tag: str = "train",
                     model: nn.Module | None = None, mesh: Mesh | None = None,
                     step_callback: Callable[[int, TrainState], Any] | None = None,
                     sampler: pipeline.Sampler | None = None, generated_weight: float = 1.0,
                     separate_norms: bool = False) -> TrainResult:
  """Trains (or resumes training) a classifier; returns its final variables and history.

  Args:
    config: the full config (data, model, train sections; config.seed).
    train_source: training examples (random-access source).
    val_source: evaluated at every epoch end (None or empty: no evaluation).
    workdir: the run's folder; this stage writes `workdir/<tag>/`.
    num_classes: output classes of the classifier.
    init_variables: {"params", "batch_stats"} to start from (fine-tuning the trained model); the
      optimizer state starts fresh. Ignored when a checkpoint of this tag exists (it resumes).
    epochs: default config.train.epochs (fine-tuning passes config.finetune.epochs).
    learning_rate: default config.train.learning_rate.
    tag: names the stage's folder ("train", "finetune", ...), and seeds its dropout keys.
    model: default `mdjax.models.build_classifier(config.model, num_classes)`.
    mesh: default all devices on the "data" axis.
    step_callback: called on the host after every step as f(step, state) (tests use it to kill a
      run; anything it raises propagates after pending checkpoints are written).
    sampler: which examples each epoch holds (`pipeline.train_batches`); default all of them.
    generated_weight, separate_norms: the fine-tune's treatment of generated images
      (`steps.make_train_step`); `train_source` then tags them (`sources.real_and_generated`).

  Raises:
    NonFiniteLossError: the loss or gradient became NaN / inf (the newest checkpoint is good).
    ConfigError: the batch does not split over the devices or exceeds the training set.
  """
  # --- Set-up: mesh, model, optimizer ------------------------------------------------------------
  t = config.train
  mesh = mesh or mesh_lib.data_mesh()
  batch_size, image_size = int(t.batch_size), int(config.data.image_size)
  steps_lib.check_batch_size(batch_size, mesh)
  epochs = int(t.epochs if epochs is None else epochs)
  epoch_size = len(train_source) if sampler is None else len(sampler)
  steps_per_epoch = pipeline.steps_per_epoch(epoch_size, batch_size)
  if steps_per_epoch == 0:
    raise ConfigError("train.batch_size", batch_size,
                      f"at most the number of training examples ({epoch_size})")
  total_steps = epochs * steps_per_epoch
  if model is None:
    model = models.build_classifier(config.model, num_classes)
  tx = optim.make_optimizer(config, steps_per_epoch, learning_rate=learning_rate, epochs=epochs)
  schedule = optim.make_schedule(config, steps_per_epoch, learning_rate=learning_rate, epochs=epochs)
  rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), zlib.crc32(tag.encode()))
  image_shape = (image_size, image_size, 3)
  # HardMix counts mistakes per training example: the state holds one count per example of
  # `train_source` (real + generated images in a fine-tune) and the batches carry their indices.
  hardmix = str(t.mix) == "hardmix"
  num_examples = len(train_source) if hardmix else 0

  # --- State: restored from the newest checkpoint, or created directly sharded -------------------
  stage_dir = os.path.join(os.path.abspath(workdir), tag)
  checkpoint_dir = os.path.join(stage_dir, "checkpoints")
  checkpoints = Checkpoints(checkpoint_dir, max_to_keep=int(t.max_checkpoints), record="history")
  restored = None
  if checkpoints.latest_step() is not None:
    abstract = steps_lib.abstract_train_state(model, tx, rng, image_shape, mesh, init_variables,
                                              num_examples)
    try:
      # The newest intact checkpoint; damaged ones are set aside with a warning (core.checkpoint).
      restored = checkpoints.restore_latest(abstract)
    except UserError:  # written by another config
      checkpoints.close()
      raise
  if restored is not None:
    _, state, history = restored
  else:
    state = steps_lib.create_train_state(model, tx, rng, image_shape, mesh, init_variables,
                                         num_examples)
    history = _empty_history()

  train_step = steps_lib.make_train_step(model, tx, config, mesh,
                                         generated_weight=generated_weight,
                                         separate_norms=separate_norms)
  eval_step = steps_lib.make_eval_step(model, num_classes, mesh)
  start = int(process.fetch_replicated(state.step))
  is_main = process.is_writer()
  writer = process.metric_writer(os.path.join(stage_dir, "tensorboard"), active=start < total_steps)
  # disable=None: no bar where stderr is not a terminal (a log file gets the one line per epoch
  # below instead of a bar redrawn thousands of times on one line).
  bar = tqdm(total=total_steps, initial=start, desc=tag, unit="step", dynamic_ncols=True,
             disable=True if not is_main or start >= total_steps else None)

  batches = None
  if start < total_steps:
    batches = pipeline.train_batches(
        train_source, batch_size=batch_size, image_size=image_size, seed=int(config.seed), mesh=mesh,
        augment=str(config.data.augment), crop_min_scale=float(config.data.crop_min_scale),
        randaugment_layers=int(config.data.randaugment_layers),
        randaugment_magnitude=float(config.data.randaugment_magnitude),
        with_index=hardmix, start_step=start, sampler=sampler,
        num_threads=int(config.data.num_threads), prefetch=int(config.data.prefetch))

  # --- The loop ----------------------------------------------------------------------------------
  window: list[dict] = []
  partial = history["partial"]
  try:
    for step in range(start, total_steps):
      state, metrics = train_step(state, next(batches))
      window.append(metrics)
      done = step + 1
      epoch_end = loop.itstime(done, steps_per_epoch)
      save = epoch_end or loop.itstime(done, int(t.checkpoint_every), total_steps)
      if save or loop.itstime(done, int(t.log_every), total_steps):
        host = process.fetch_replicated(window)
        _check_finite(host, done - len(host), checkpoint_dir, checkpoints.latest_step())
        loss = float(np.mean([m["loss"] for m in host]))
        accuracy = float(np.mean([m["accuracy"] for m in host]))
        partial["loss"] += float(np.sum([m["loss"] for m in host]))
        partial["accuracy"] += float(np.sum([m["accuracy"] for m in host]))
        partial["steps"] += len(host)
        window = []
        lr = float(schedule(done - 1))
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", lr=f"{lr:.2e}", refresh=False)
        writer.add_scalar(f"{tag}/loss", loss, done)
        writer.add_scalar(f"{tag}/accuracy", accuracy, done)
        writer.add_scalar(f"{tag}/learning_rate", lr, done)
        writer.add_scalar(f"{tag}/grad_norm", float(host[-1]["grad_norm"]), done)
      if epoch_end:
        val_acc, cwa = float("nan"), []
        if val_source is not None and len(val_source):
          counts = evaluate(model, state.variables, val_source, config, mesh, eval_step=eval_step)
          val_acc, cwa = counts["accuracy"], counts["class_wise_accuracy"].tolist()
        n = max(partial["steps"], 1)
        history["epoch"].append(done // steps_per_epoch)
        history["step"].append(done)
        history["train_loss"].append(partial["loss"] / n)
        history["train_accuracy"].append(partial["accuracy"] / n)
        history["learning_rate"].append(lr)
        history["val_accuracy"].append(val_acc)
        history["val_class_wise_accuracy"].append(cwa)
        history["partial"] = partial = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        if is_main:
          bar.write(f"{tag} epoch {done // steps_per_epoch}/{epochs}: train loss "
                    f"{history['train_loss'][-1]:.4f}, val accuracy {val_acc:.4f}")
        writer.add_scalar(f"{tag}/val_accuracy", val_acc, done)
        writer.add_scalar(f"{tag}/epoch_train_loss", history["train_loss"][-1], done)
      if save:
        checkpoints.save(done, state, history)
      bar.update(1)
      if step_callback is not None:
        step_callback(done, state)
  finally:
    # Also on errors and interrupts: finish the pending (good) save so a rerun resumes from it.
    try:
      checkpoints.close()  # raises StorageError if that save failed (a full disk)
    finally:
      bar.close()
      writer.close()

  return TrainResult(variables=state.variables, history={k: v for k, v in history.items()
                                                          if k != "partial"},
                     checkpoint_dir=checkpoint_dir, state=state)
