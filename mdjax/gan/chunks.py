"""A chunk of classes' GAN state: per-class keys, initial states, checkpoints, NaN recovery.

Moved out of mdjax.gan.ensemble; see that module's docstring.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mdjax.errors import NonFiniteLossError, UserError
from mdjax.gan import program
from mdjax.gan.program import CLASS_AXIS, GanFns

# fold_in constants separating a class's key streams (training uses the class key itself).
_GRID_STREAM, _GENERATE_STREAM = 1_000_001, 1_000_002


def class_keys(seed: int, class_index: int) -> tuple[jax.Array, jax.Array]:
  """(init key, training stream key) of one class: the class index folded into the seed."""
  init_key, stream_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), class_index))
  return init_key, stream_key


def init_ensemble(fns: GanFns, seed: int, class_indices: Sequence[int],
                  mesh: jax.sharding.Mesh) -> dict:
  """Stacked initial states of `class_indices` (already padded to a multiple of the mesh size).

  Each class is initialised by the same jitted single-class `init` a separate training would run,
  so the ensemble starts from exactly the separate trainings' parameters.
  """
  init = program._jit(fns.init)
  states, rngs = [], []
  for k in class_indices:
    init_key, stream_key = class_keys(seed, k)
    states.append(init(init_key))
    rngs.append(stream_key)
  ens = {"gan": program._stack(states), "rng": jnp.stack(rngs),
         "ok": jnp.ones((len(class_indices),), bool),
         "restarts": jnp.zeros((len(class_indices),), jnp.int32)}
  return jax.device_put(ens, NamedSharding(mesh, P(CLASS_AXIS)))


# ------------------------------------------------------------------------------------------------
# Checkpoints (orbax): the whole chunk (stacked states, per-class rng, restarts) + the step.
# ------------------------------------------------------------------------------------------------
class _Checkpoints:

  def __init__(self, directory: Path, max_to_keep: int = 2):
    self.manager = ocp.CheckpointManager(
        directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                   create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, ens: dict) -> None:
    # Saves are asynchronous; orbax copies the arrays to host before returning, so donating
    # `ens` to the next step is safe.
    self.manager.save(step, args=ocp.args.StandardSave(ens), force=True)

  def restore(self, step: int, like: dict) -> dict:
    self.manager.wait_until_finished()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _fingerprint(images: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def _meta(classes, images, gan_config, seed) -> dict:
  keys = ("resolution", "batch_size", "ngf", "ndf", "nz", "learning_rate", "beta1", "beta2",
          "ema_decay", "recon_loss", "diffaug")
  return {"classes": [int(k) for k in classes], "counts": [len(x) for x in images],
          "data": [_fingerprint(x) for x in images], "seed": int(seed),
          "gan": {k: gan_config.get(k) for k in keys}}


def _check_meta(chunk_dir: Path, meta: dict) -> None:
  path = chunk_dir / "meta.json"
  if path.exists():
    old = json.loads(path.read_text())
    if old != meta:
      diff = sorted(k for k in meta if old.get(k) != meta[k])
      raise UserError(
          f"{chunk_dir} holds GAN checkpoints of a different run (differs in: {', '.join(diff)}). "
          "Use a new workdir, or delete that directory to retrain these GANs.")
  elif program._is_writer():
    chunk_dir.mkdir(parents=True, exist_ok=True)
    tmp = chunk_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)
  if jax.process_count() > 1:  # no process reads on before process 0 has written it
    multihost_utils.sync_global_devices(f"gan meta {chunk_dir}")


def _recover(ens: dict, ok: np.ndarray, classes: Sequence[int], ckpt: _Checkpoints,
             max_restarts: int, step: int, sharding) -> tuple[dict, int]:
  """Restores the chunk's last checkpoint and refolds the RNG of the classes that went non-finite."""
  bad = [p for p in range(len(ok)) if not ok[p]]
  bad_classes = sorted({classes[p] for p in bad})
  # Counted from the live state: the checkpoint's counts predate the failures since it was saved.
  restarts = program._to_host(ens["restarts"]).copy()
  last = ckpt.latest_step()
  restored = ckpt.restore(last, ens)
  for p in bad:
    restarts[p] += 1
  # Padded copies of a class fail with it; count a class once.
  worst = max(restarts[p] for p in bad)
  if worst > max_restarts:
    raise NonFiniteLossError(
        f"The GAN of class(es) {bad_classes} produced NaN/inf values again after {max_restarts} "
        f"restorations of the last good checkpoint (step {last}); stopped at step {step}. Lower "
        "gan.learning_rate, check those classes' images (constant or corrupt images?), or train "
        "them with more images.")
  warnings.warn(
      f"GAN of class(es) {bad_classes}: NaN/inf detected by step {step}; restored the checkpoint of "
      f"step {last} and continuing with a fresh random stream for them (restart {worst} of at most "
      f"{max_restarts}).", RuntimeWarning, stacklevel=3)
  rng = program._to_host(restored["rng"]).copy()
  for p in bad:
    rng[p] = np.asarray(jax.random.fold_in(rng[p], int(restarts[p])))
  restored["rng"] = jax.device_put(rng, sharding)
  restored["restarts"] = jax.device_put(restarts, sharding)
  restored["ok"] = jax.device_put(np.ones_like(ok), sharding)
  return restored, last
