"""One checkpoint wrapper for every stage: an orbax CheckpointManager holding a sharded pytree.

Each stage (the classifier's `train/`, `finetune/`; each GAN chunk) keeps its own manager. Saves
are asynchronous: orbax copies the arrays to host memory before `save` returns, so the caller may
donate them to the next step at once; `close` (also reached through `with`) waits for the pending
save, so a run stopped by an error or Ctrl-C still leaves its last checkpoint complete. Restores
recreate every array with the sharding of the template they are given. A stage may keep a JSON
record beside its arrays (the classifier's history) in the same step folder.

Callers decide when to save (mdjax.core.loop.itstime); every save is forced past orbax's own
interval policy.

Faults:
  * A save that fails (a full disk, a permission), in the caller's thread or in orbax's background
    thread, raises a `StorageError` (mdjax.core.storage) at that save, the next one or `close`.
    orbax writes each step into a temporary folder and renames it only when complete, and removes
    old steps (`max_to_keep`) only after the new one is committed, so the intact checkpoints stay.
    Temporary folders of failed or killed saves are removed when the next manager opens the folder.
  * `restore_latest` restores the newest intact checkpoint. One that cannot be read (truncated or
    missing files, bad metadata) is damaged: it is set aside (renamed into `<directory>.damaged/`,
    never deleted), a `RecoveryWarning` says so, and the next older one is tried; with none left the
    stage starts over. One that reads but whose arrays do not fit the template (another model or
    optimizer) is a `UserError`: that is a different config, not damage.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mdjax.core import process, storage
from mdjax.errors import RecoveryWarning, StorageError, UserError

_STATE = "state"


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _nbytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{"params/conv/kernel": (shape, dtype)} of a template or of a checkpoint's metadata tree.

  Keys are the plain names along each path, so a dataclass field, a dict key and a NamedTuple
  field of the template match the nested dicts orbax records for them.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat}


class DamagedCheckpointError(Exception):
  """A checkpoint that cannot be read (raised by `restore`, handled by `restore_latest`)."""

  def __init__(self, step: int, reason: str):
    self.step, self.reason = step, reason
    super().__init__(f"checkpoint {step} is damaged ({reason})")


@contextlib.contextmanager
def _collected_unraisable():
  """Keeps the errors a failed restore leaves behind out of stderr.

  A restore that fails on one array leaves orbax's other read coroutines unawaited; their errors
  (the same damage) reach `sys.unraisablehook` when they are collected and would print a traceback
  each. They are gathered here instead (the failure itself is reported once, by the caller).
  A coroutine that never started is reported by Python as a "coroutine ... was never awaited"
  RuntimeWarning instead (when it is freed: here, or in the `gc.collect` below); those are
  silenced for the same reason.
  """
  previous, caught = sys.unraisablehook, []
  sys.unraisablehook = caught.append
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                            category=RuntimeWarning)
    try:
      yield caught
    finally:
      gc.collect()
      sys.unraisablehook = previous


class Checkpoints:
  """Numbered checkpoints of a pytree (and optionally a JSON record) in `directory`.

  Args:
    directory: the checkpoint folder (created if missing).
    max_to_keep: how many of the newest checkpoints to keep.
    record: the name of a JSON item saved beside the state (e.g. "history"); None for none. With
      a record the state is the item "state" of each step folder, without one orbax's default item.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2,
               record: str | None = None):
    self.directory = os.path.abspath(os.fspath(directory))
    self._record = record
    self._needed_bytes: int | None = None
    # Handlers named up front, so a checkpoint's metadata can be read before anything was saved
    # or restored through this manager (`_difference` reads it to tell damage from another config).
    handlers = ({_STATE: ocp.StandardCheckpointHandler(), record: ocp.JsonCheckpointHandler()}
                if record else ocp.StandardCheckpointHandler())
    with storage.converted(self.directory):
      self._manager = ocp.CheckpointManager(
          self.directory, item_handlers=handlers,
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _converted(self, step: int | None = None):
    where = self.directory if step is None else os.path.join(self.directory, str(step))
    return storage.converted(where, needed_bytes=self._needed_bytes, on_fault=self._failed_save)

  def _failed_save(self, fault: OSError) -> str | None:
    """After a save failed: frees what it wrote; returns the checkpoint's path to name.

    orbax keeps an unfinished save in a `<step>.orbax-checkpoint-tmp*` folder and removes it only
    when the next manager opens (cleanup_tmp_directories); on a full disk that space is wanted now.
    """
    if process.is_writer():
      self._remove_unfinished()
    failed = os.path.abspath(os.fspath(fault.filename)) if fault.filename else ""
    if failed.startswith(self.directory + os.sep):
      first = os.path.relpath(failed, self.directory).split(os.sep)[0]
      return os.path.join(self.directory, first.split(".orbax-checkpoint-tmp")[0])
    return None

  def _remove_unfinished(self, quiet: float = 2.0, timeout: float = 60.0) -> None:
    """Removes the `*.orbax-checkpoint-tmp*` folders of a failed save, until none reappears for
    `quiet` seconds (at most `timeout`).

    Why a quiet period: the failure is reported at the first failed write, while the save's other
    writes (tensorstore's, in its own threads; orbax offers no public handle to wait for them) may
    still be running, and one that ends after the removal recreates its folder (a fresh-clone CI
    run caught `2.orbax-checkpoint-tmp` back after the cleanup). A small checkpoint's writes end
    within milliseconds; anything left after `timeout` is removed when the next manager opens the
    folder.
    """
    start = time.monotonic()
    quiet_until = start + quiet
    while (now := time.monotonic()) < start + timeout:
      names = (sorted(n for n in os.listdir(self.directory) if ".orbax-checkpoint-tmp" in n)
               if os.path.isdir(self.directory) else [])
      for name in names:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      if names:
        quiet_until = now + quiet
      elif now >= quiet_until:
        return
      time.sleep(0.05)

  def save(self, step: int, state: Any, record: Any = None) -> None:
    """Starts writing checkpoint `step`; a failure of the previous (background) save raises here."""
    if self._record:
      args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                   self._record: ocp.args.JsonSave(record)})
    else:
      args = ocp.args.StandardSave(state)
    with self._converted(step):
      self._needed_bytes = _nbytes(state)
      self._manager.save(step, args=args, force=True)

  def wait(self) -> None:
    """Waits for the pending save; raises StorageError if it failed."""
    with self._converted():
      self._manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> tuple[Any, Any]:
    """(state, record) of checkpoint `step`; `like` gives shapes, dtypes and shardings.

    `like` may hold arrays or `jax.ShapeDtypeStruct`s. The record is None without one.

    Raises:
      DamagedCheckpointError: the checkpoint cannot be read.
      UserError: it reads, but its arrays do not fit `like` (written by a different config).
      StorageError: it may not be read (permissions).
    """
    self.wait()  # the step may still be being written
    abstract = _abstract(like)
    try:
      with _collected_unraisable(), storage.reported_read(os.path.join(self.directory, str(step))):
        if not self._record:
          return self._manager.restore(step, args=ocp.args.StandardRestore(abstract)), None
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(abstract), self._record: ocp.args.JsonRestore()}))
        if restored[self._record] is None:
          raise ValueError(f"its {self._record!r} record is missing")
        return restored[_STATE], restored[self._record]
    except Exception as e:  # pylint: disable=broad-exception-caught
      fault = storage.os_fault(e)
      if fault is not None:
        raise storage.storage_error(fault, os.path.join(self.directory, str(step))) from None
      # tensorstore appends its whole spec after "See full TensorStore details": not for a person.
      text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
      reason = f"{type(e).__name__}: {text[:200]}"
      difference = self._difference(step, abstract, reason)
      if difference:
        raise UserError(
            f"The checkpoint at step {step} in {self.directory} does not fit this run's state "
            f"({difference}). It was written by a different config: use another workdir, or "
            "delete that folder to start this stage over.") from None
      raise DamagedCheckpointError(step, reason) from None

  def _difference(self, step: int, abstract: Any, reason: str) -> str | None:
    """How checkpoint `step`'s recorded arrays differ from `abstract` ("" if they match).

    Raises DamagedCheckpointError when even the metadata cannot be read.
    """
    try:
      with _collected_unraisable():
        meta = self._manager.item_metadata(step)
        tree = meta[_STATE] if self._record else meta
        if tree is None:
          raise ValueError("no array metadata")
        stored = _leaves(tree)
    except Exception:  # pylint: disable=broad-exception-caught
      raise DamagedCheckpointError(step, reason) from None
    wanted = _leaves(abstract)
    diffs = [f"{k} missing" for k in sorted(set(wanted) - set(stored))]
    diffs += [f"{k} unexpected" for k in sorted(set(stored) - set(wanted))]
    diffs += [f"{k}: stored {stored[k][1]}{list(stored[k][0])}, this run {wanted[k][1]}"
              f"{list(wanted[k][0])}" for k in sorted(set(stored) & set(wanted))
              if stored[k] != wanted[k]]
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")

  def _set_aside(self, step: int) -> str:
    """Moves step `step`'s folder into `<directory>.damaged/` (process 0); returns where."""
    aside = self.directory + ".damaged"
    target, n = os.path.join(aside, str(step)), 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(aside, f"{step}-{n}")
    if process.is_writer():
      with storage.converted(aside):
        os.makedirs(aside, exist_ok=True)
        os.replace(os.path.join(self.directory, str(step)), target)
    process.barrier(f"set aside {self.directory}/{step}")
    self._manager.reload()
    return target

  def restore_latest(self, like: Any) -> tuple[int, Any, Any] | None:
    """(step, state, record) of the newest intact checkpoint, or None if there is none.

    Damaged ones on the way are set aside with a RecoveryWarning (see the module docstring). In a
    multi-process run every process agrees: one that cannot read its part makes it damaged for all.
    """
    while (step := self.latest_step()) is not None:
      outcome = None
      try:
        state, record = self.restore(step, like)
      except DamagedCheckpointError as e:
        outcome = e
      if process.any_process(outcome is not None):
        reason = outcome.reason if outcome else "another process could not read its part"
        moved = self._set_aside(step)
        after = self.latest_step()
        if process.is_writer():
          warnings.warn(
              f"the checkpoint at step {step} in {self.directory} is damaged ({reason}); it was "
              f"set aside as {moved}. " + (
                  f"Resuming this stage from the checkpoint at step {after}." if after is not None
                  else "No intact checkpoint is left: this stage starts over."),
              RecoveryWarning, stacklevel=2)
        continue
      return step, state, record
    return None

  def resume_or_start(self, initial: Any, record: Any = None) -> tuple[int, Any, Any, bool]:
    """(step, state, record, fresh): the newest intact checkpoint (`restore_latest`, `initial`
    giving the shapes and shardings), else `initial` at step 0 with `record` (for a manager that
    keeps one), saved as checkpoint 0 so that a resume and a NaN recovery always have a good state
    to go back to."""
    restored = self.restore_latest(initial)
    if restored is None:
      self.save(0, initial, record)
      return 0, initial, record, True
    step, state, stored_record = restored
    return step, state, stored_record, False

  def close(self) -> None:
    """Waits for the pending save, then releases the manager; raises StorageError if it failed."""
    try:
      self.wait()
    finally:
      with self._converted():
        self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


__all__ = ["Checkpoints", "DamagedCheckpointError", "StorageError"]
