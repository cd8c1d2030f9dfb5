"""One chunk of classes' GANs on the devices: keys, initial states, checkpoints, NaN recovery.

Randomness: class k's GAN is initialised from, and trained on, keys of its own
(`fold_in(PRNGKey(seed), k)`), so a class's result does not depend on which other classes share
its program or chunk. Step s of class k uses `fold_in(rng_k, s)`, split into a data key and the
GAN step's key, so resuming from a checkpoint at step s replays exactly what uninterrupted
training does. Sample grids and generated images draw from further streams of the same key.

Checkpoints: `chunk_<j>/checkpoints/` (orbax: stacked states, per-class RNG, restarts, "all
finite" flags; the step is the checkpoint's number) and `chunk_<j>/meta.json`, which says which
classes and data the checkpoints belong to: a mismatch on resume is a UserError, never a silent
mix. A damaged checkpoint is set aside and the chunk resumes from the newest intact one, or starts
over (mdjax.core.checkpoint.Checkpoints.restore_latest).

NaN/inf: when the host finds a class's "all finite" flag down (mdjax.gan.program folds its losses'
flag into the state every step; the host adds a check of the state itself), the whole chunk is
restored from its last checkpoint (always good: the flag is checked before every save), the failing
classes' RNG streams are refolded (`fold_in(rng_k, restarts_k)`) and training continues with a
warning. The healthy classes replay the same steps with the same keys, so their results are
unchanged. After `max_restarts` failures of one class, training stops with NonFiniteLossError.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mdjax.core import files, mesh as mesh_lib, process
from mdjax.core.checkpoint import Checkpoints
from mdjax.errors import NonFiniteLossError, RecoveryWarning, UserError
from mdjax.gan import class_data, program

# fold_in constants separating a class's key streams (training uses the class key itself).
GRID_STREAM, GENERATE_STREAM, CHECK_STREAM = 1_000_001, 1_000_002, 1_000_003
# The config keys a chunk's checkpoints depend on (with its classes, their data and the seed).
META_KEYS = ("resolution", "batch_size", "ngf", "ndf", "nz", "learning_rate", "beta1", "beta2",
              "ema_decay", "recon_loss", "diffaug", "colour", "dtype", "stop_judge",
              "stop_diversity", "stop_fd_floor", "stop_fd_gain", "stop_patience",
              "sample_every")


def class_keys(seed: int, class_index: int) -> tuple[jax.Array, jax.Array]:
  """(init key, training stream key) of one class: the class index folded into the seed."""
  init_key, stream_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), class_index))
  return init_key, stream_key


def stream_key(seed: int, class_index: int, stream: int) -> jax.Array:
  """A key of class `class_index` for `stream` (GRID_STREAM or GENERATE_STREAM)."""
  return jax.random.fold_in(class_keys(seed, class_index)[1], stream)


def init_ensemble(fns: program.GANFns, seed: int, class_indices: Sequence[int],
                  mesh: jax.sharding.Mesh) -> dict:
  """Stacked initial states of `class_indices` (already padded to a multiple of the mesh size).

  Each class is initialised by the same jitted single-class `init` a separate training would run,
  so the ensemble starts from exactly the separate trainings' parameters.
  """
  init = program.jit_once(fns.init)
  states, rngs = [], []
  for k in class_indices:
    init_key, stream = class_keys(seed, k)
    states.append(init(init_key))
    rngs.append(stream)
  ens = {"gan": program.stack_states(states), "rng": jnp.stack(rngs),
         "ok": jnp.ones((len(class_indices),), bool),
         "restarts": jnp.zeros((len(class_indices),), jnp.int32),
         "active": jnp.ones((len(class_indices),), bool)}
  return process.put_global(ens, mesh_lib.class_sharding(mesh))


def checkpoint_meta(classes, images, gan_config, seed) -> dict:
  # "ema": checkpoints from before the bias-corrected EMA (mdjax.gan.step.ema_update) hold a
  # different average under the same config; they must not be resumed as if they were the same.
  # "layout": checkpoints from before the stopping rule hold no "active" flags and no record.
  return {"ema": "bias_corrected", "layout": "active+quality", "classes": [int(k) for k in classes],
          "counts": [len(x) for x in images], "data": [class_data.fingerprint(x) for x in images],
          "seed": int(seed), "gan": {k: gan_config.get(k) for k in META_KEYS}}


def _quality_record(curves: Mapping[int, list], stopped: Mapping[int, int]) -> dict:
  """The JSON record saved with a chunk's checkpoints: the stopping rule's checks and stops."""
  return {"curves": {str(k): v for k, v in curves.items()},
          "stopped": {str(k): int(v) for k, v in stopped.items()}}


def check_meta(chunk_dir: Path, meta: dict) -> None:
  path = chunk_dir / "meta.json"
  if path.exists():
    old = files.read_json(path)
    if old != meta:
      diff = sorted(k for k in meta if old.get(k) != meta[k])
      raise UserError(
          f"{chunk_dir} holds GAN checkpoints of a different run (differs in: {', '.join(diff)}). "
          "Use a new workdir, or delete that directory to retrain these GANs.")
  elif process.is_writer():
    files.write_json_atomic(path, meta, indent=1)
  process.barrier(f"gan meta {chunk_dir}")  # no process reads on before process 0 has written it


class Chunk:
  """The GANs of a few classes, stacked on the class mesh: fresh, or resumed from checkpoints.

  Attributes:
    classes: the chunk's classes; `padded` adds copies of the last one up to a multiple of the
      mesh size (their results are dropped).
    ens: the state {"gan", "rng", "ok", "restarts", "active"}, sharded over "class"; with
      `per_class` (the "per_class" strategy, mdjax.gan.program) `ens["gan"]` is a list of the
      classes' own states, stacked only into checkpoints, so checkpoints are the same for every
      strategy.
    step: the GAN steps taken; `fresh`: no checkpoint existed (the chunk starts at step 0).
    curves: {class: its quality checks so far} (mdjax.gan.monitor), saved with each checkpoint.
    stopped: {class: the step it stopped at} for the classes the stopping rule stopped.
  """

  def __init__(self, chunk_dir: Path, classes: Sequence[int], images: Mapping[int, np.ndarray],
               capacity: int, fns: program.GANFns, gan_config: ml_collections.ConfigDict,
               seed: int, mesh: jax.sharding.Mesh, per_class: bool = False):
    self.classes = list(classes)
    self.padded = self.classes + [self.classes[-1]] * (-len(self.classes) % mesh.size)
    self.mesh, self._sharding = mesh, mesh_lib.class_sharding(mesh)
    check_meta(chunk_dir, checkpoint_meta(self.classes, [images[k] for k in self.classes],
                                          gan_config, seed))
    data, counts = class_data.stack_class_images([images[k] for k in self.padded], capacity)
    self.data, self.counts = process.put_global((data, counts), self._sharding)
    self.checkpoints = Checkpoints(chunk_dir / "checkpoints", record="quality")
    self.per_class = per_class
    initial = init_ensemble(fns, seed, self.padded, mesh)
    # What a checkpoint restores into: shapes, dtypes and shardings of the stacked state.
    self._stored_like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), initial)
    # The newest intact checkpoint; damaged ones are set aside with a warning (core.checkpoint).
    self.step, stored, record, self.fresh = self.checkpoints.resume_or_start(
        initial, _quality_record({}, {}))
    del initial
    self.ens = self._live(stored)
    self._restore_quality(record)

  def _restore_quality(self, record: dict) -> None:
    self.curves = {int(k): list(v) for k, v in record["curves"].items()}
    self.stopped = {int(k): int(v) for k, v in record["stopped"].items()}
    self.active = process.fetch_sharded(self.ens["active"]).copy()

  @property
  def any_active(self) -> bool:
    return bool(self.active.any())

  def is_active(self, k: int) -> bool:
    return bool(self.active[self.padded.index(k)])

  def stop(self, k: int) -> None:
    """Freezes class k's GAN (and its padded copies) from the next step on."""
    for p, c in enumerate(self.padded):
      if c == k:
        self.active[p] = False
    self.stopped[k] = self.step
    self.ens = dict(self.ens, active=process.put_global(self.active.copy(), self._sharding))

  def class_steps(self, k: int) -> int:
    """The steps class k's GAN trained: the step it stopped at, else the chunk's."""
    return self.stopped.get(k, self.step)

  def _live(self, stored: dict) -> dict:
    return program.per_class_layout(stored) if self.per_class else stored

  def advance(self, step_fn) -> dict:
    """One step of every class; returns the step's metrics (device arrays, [K] each)."""
    self.ens, metrics = step_fn(self.ens, self.data, self.counts, jnp.int32(self.step))
    self.step += 1
    return metrics

  def all_finite(self) -> np.ndarray:
    """Per padded class: no NaN/inf since the last restore (reads the device: a collective)."""
    return process.fetch_sharded(program.states_finite(self.ens))

  def restarts(self) -> dict[int, int]:
    counts = process.fetch_sharded(self.ens["restarts"])
    return {k: int(counts[p]) for p, k in enumerate(self.classes)}

  def save(self) -> None:
    self.checkpoints.save(self.step, program.stacked_layout(self.ens),
                          _quality_record(self.curves, self.stopped))

  def class_state(self, position: int):
    """The GAN state of the class at `position`, on this process (a collective)."""
    return program.local_class_state(self.ens, position, self.mesh)

  def recover(self, ok: np.ndarray, max_restarts: int) -> None:
    """Restores the last checkpoint and refolds the RNG of the classes that went non-finite."""
    bad = [p for p in range(len(ok)) if not ok[p]]
    bad_classes = sorted({self.padded[p] for p in bad})
    # Counted from the live state: the checkpoint's counts predate the failures since it was saved.
    restarts = process.fetch_sharded(self.ens["restarts"]).copy()
    last = self.checkpoints.latest_step()
    restored, record = self.checkpoints.restore(last, self._stored_like)
    restored = self._live(restored)
    for p in bad:
      restarts[p] += 1
    # Padded copies of a class fail with it; count a class once.
    worst = max(restarts[p] for p in bad)
    if worst > max_restarts:
      raise NonFiniteLossError(
          f"The GAN of class(es) {bad_classes} produced NaN/inf values again after {max_restarts} "
          f"restorations of the last good checkpoint (step {last}); stopped at step {self.step}. "
          "Lower gan.learning_rate, check those classes' images (constant or corrupt images?), or "
          "train them with more images.")
    warnings.warn(
        f"GAN of class(es) {bad_classes}: NaN/inf detected by step {self.step}; restored the "
        f"checkpoint of step {last} and continuing with a fresh random stream for them (restart "
        f"{worst} of at most {max_restarts}).", RecoveryWarning, stacklevel=3)
    rng = process.fetch_sharded(restored["rng"]).copy()
    for p in bad:
      rng[p] = np.asarray(jax.random.fold_in(rng[p], int(restarts[p])))
    restored["rng"] = process.put_global(rng, self._sharding)
    restored["restarts"] = process.put_global(restarts, self._sharding)
    restored["ok"] = process.put_global(np.ones_like(ok), self._sharding)
    self.ens, self.step = restored, last
    self._restore_quality(record)

  def close(self) -> None:
    """Waits for the pending checkpoint."""
    self.checkpoints.close()
