"""One checkpoint wrapper for every stage: an orbax CheckpointManager holding a sharded pytree.

Each stage (the classifier's `train/`, `finetune/`; each GAN chunk) keeps its own manager. Saves
are asynchronous: orbax copies the arrays to host memory before `save` returns, so the caller may
donate them to the next step at once; `close` (also reached through `with`) waits for the pending
save, so a run stopped by an error or Ctrl-C still leaves its last checkpoint complete. Restores
recreate every array with the sharding of the template they are given. A stage may keep a JSON
record beside its arrays (the classifier's history) in the same step folder.

Callers decide when to save (mdjax.core.loop.itstime); every save is forced past orbax's own
interval policy.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from mdjax.errors import UserError

_STATE = "state"


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(_STATE, record) if record else None,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: Any = None) -> None:
    if self._record:
      args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                   self._record: ocp.args.JsonSave(record)})
    else:
      args = ocp.args.StandardSave(state)
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, Any]:
    """(state, record) of checkpoint `step`; `like` gives shapes, dtypes and shardings.

    `like` may hold arrays or `jax.ShapeDtypeStruct`s. The record is None without one. A
    checkpoint that does not fit `like` (written by another config) is a UserError.
    """
    self._manager.wait_until_finished()  # the step may still be being written
    abstract = _abstract(like)
    try:
      if not self._record:
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract)), None
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore(abstract), self._record: ocp.args.JsonRestore()}))
      return restored[_STATE], restored[self._record]
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(
          f"The checkpoint at step {step} in {self.directory} does not fit this run's state "
          f"({type(e).__name__}: {str(e)[:200]}). It was written by a different config: use "
          "another workdir, or delete that folder to start this stage over.") from None

  def close(self) -> None:
    """Waits for the pending save, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
