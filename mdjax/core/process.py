"""Several processes running one program: who writes, where they meet, how the host reads arrays.

In a multi-process run (launch/local.sh, SLURM) every process runs every stage over the global
mesh. Process 0 alone writes files, TensorBoard logs and progress output; everyone meets at a
barrier after a write before anyone reads it. Arrays that span other processes' devices cannot be
read with `jax.device_get`: replicated ones are read from the local replica (`fetch_replicated`),
sharded ones are gathered from every process (`fetch_sharded`, a collective).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here until every one has arrived (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true in any process (every process gets the same answer; a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def from_writer(value: int) -> int:
  """Process 0's `value` in every process (a collective; `value` itself in a single process)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def fetch_replicated(tree: Any) -> Any:
  """Numpy copies of replicated arrays; every replica is the same, so the local one is read."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array)
                      else np.asarray(a), tree)


def fetch_sharded(tree: Any) -> Any:
  """Numpy copies of arrays sharded over the mesh, the whole of them on every process.

  A collective: every process must call it at the same point.
  """
  return multihost_utils.process_allgather(tree, tiled=True)


class _NoMetricWriter:
  """Stands in for the TensorBoard writer where nothing is written (processes other than 0)."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


class _LazyMetricWriter:
  """A tensorboardX writer made at the first value written, so a loop that writes nothing (a
  finished GAN stage reopened to generate from it) leaves no empty event file beside the real one."""

  def __init__(self, logdir: str):
    self._logdir, self._writer = logdir, None

  def __getattr__(self, name):  # add_scalar, add_image, ...: the real writer's, made on first use
    if self._writer is None:
      # Imported here: tensorboardX pulls in protobuf, and only the writing process needs it.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # max_queue=0: an unbounded queue. With the default (10) a writer thread that died (a full
      # disk) leaves the queue full and the next add_scalar blocks forever; unbounded, logging goes
      # on into memory until the run's next write in the main thread fails and ends it with one
      # line.
      self._writer = tensorboardX.SummaryWriter(self._logdir, max_queue=0)
    return getattr(self._writer, name)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def metric_writer(logdir: str, *, active: bool = True):
  """A tensorboardX writer for `logdir` on process 0 (when `active`), whose event file appears
  with the first value written; elsewhere one that does nothing, so loops call it
  unconditionally."""
  if not (active and is_writer()):
    return _NoMetricWriter()
  return _LazyMetricWriter(logdir)
