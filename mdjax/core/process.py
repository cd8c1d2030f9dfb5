"""Several processes running one program: who writes, where they meet, how the host reads arrays.

In a multi-process run (launch/local.sh, SLURM) every process runs every stage over the global
mesh. Process 0 alone writes files, TensorBoard logs and progress output; everyone meets at a
barrier after a write before anyone reads it. Arrays that span other processes' devices cannot be
read with `jax.device_get`: replicated ones are read from the local replica (`fetch_replicated`),
small sharded ones are gathered from every process (`fetch_sharded`); host values that every
process holds alike become global arrays with `put_global`, which moves nothing between processes.

The processes meet (`barrier`), agree on a flag or a number (`any_process`, `from_writer`) and
gather small arrays (`fetch_sharded`) through JAX's coordination service (the `jax.distributed`
client), not through device collectives: every meeting has its own key with its name's checksum
in it, so processes that disagree on where they are fail after `sync_timeout_s()` with both names
in their logs, where collectives would hang or fail with gloo's "Received data size doesn't match
expected size. Is there a distributed collective mismatch" (how the 2-process pipeline failed one
loaded run in seven, until the named timeout showed the cause: mdjax.pipeline.workdir.Stages.done).
Nor do they add small collectives between the stages' own ones: the host-level data never goes
over the devices.
"""

from __future__ import annotations

import itertools
import os
import pickle
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mdjax.errors import UserError

# How long a process waits at a barrier (or for another process's value) before failing: the
# longest any process may work alone between two meetings (process 0 writing the generated images).
_SYNC_TIMEOUT_ENV = "MDJAX_SYNC_TIMEOUT_S"
_DEFAULT_SYNC_TIMEOUT_S = 3600

# Every meeting gets a fresh key: the service's barrier ids and keys are single-use, and every
# process meets the others in the same order, so the n-th meeting has the same number everywhere.
_meetings = itertools.count()


class PeerTimeoutError(UserError):
  """Another process of a multi-process run did not reach a meeting point in time."""


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def sync_timeout_s() -> int:
  """Seconds a process waits for the others at a barrier (env MDJAX_SYNC_TIMEOUT_S, default 1 h)."""
  raw = os.environ.get(_SYNC_TIMEOUT_ENV, str(_DEFAULT_SYNC_TIMEOUT_S))
  try:
    value = int(raw)
  except ValueError:
    value = 0
  if value <= 0:
    raise UserError(f"{_SYNC_TIMEOUT_ENV}={raw!r}: expected a whole number of seconds above 0 "
                    f"(default {_DEFAULT_SYNC_TIMEOUT_S}).")
  return value


def _service():
  """The coordination service's client of this process (None if jax.distributed is not joined)."""
  # JAX has no public accessor for its client; orbax reads the same attribute.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def _meeting_key(kind: str, name: str) -> str:
  # The name's checksum in the key: processes that disagree on where they are wait on different
  # keys and fail with the name, instead of passing each other.
  return f"mdjax/{kind}/{next(_meetings)}/{zlib.crc32(name.encode()):08x}"


def _timed_out(what: str, error: Exception) -> PeerTimeoutError:
  return PeerTimeoutError(
      f"process {jax.process_index()} of {jax.process_count()} waited {sync_timeout_s()} s {what} "
      f"and not every other process came ({type(error).__name__}: {str(error).splitlines()[0]}). "
      "One of them failed or is stuck: its own log says where. If it was only slow, set "
      f"{_SYNC_TIMEOUT_ENV} to a longer wait.")


def barrier(name: str) -> None:
  """All processes wait here until every one has arrived (a no-op in a single-process run)."""
  if jax.process_count() == 1:
    return
  client = _service()
  if client is None:  # joined some other way: a device collective is all there is
    multihost_utils.sync_global_devices(name)
    return
  try:
    client.wait_at_barrier(_meeting_key("barrier", name), sync_timeout_s() * 1000)
  except Exception as e:  # jaxlib raises its runtime error type; a timeout is DEADLINE_EXCEEDED
    raise _timed_out(f"at the barrier '{name}'", e) from e


def _exchange(name: str, value: str | None, sources: range) -> list[str]:
  """Publishes `value` (unless None) under this meeting's key and returns `sources`' values."""
  client, key = _service(), _meeting_key("value", name)
  if value is not None:
    client.key_value_set(f"{key}/{jax.process_index()}", value)
  try:
    return [client.blocking_key_value_get(f"{key}/{p}", sync_timeout_s() * 1000) for p in sources]
  except Exception as e:  # see barrier()
    raise _timed_out(f"for the other processes' '{name}'", e) from e


# This process's keys of its last all-process byte exchange: deleted after the next one, when
# every process has read them (none can publish exchange n + 1 before it has read exchange n).
_stale_keys: list[str] = []


def _exchange_bytes(name: str, value: bytes, sources: range) -> list[bytes]:
  """`_exchange` for bytes that every process publishes; keeps the service's store small."""
  client, key = _service(), _meeting_key("bytes", name)
  mine = f"{key}/{jax.process_index()}"
  client.key_value_set_bytes(mine, value)
  try:
    got = [client.blocking_key_value_get_bytes(f"{key}/{p}", sync_timeout_s() * 1000)
           for p in sources]
  except Exception as e:  # see barrier()
    raise _timed_out(f"for the other processes' '{name}'", e) from e
  for old in _stale_keys:
    client.key_value_delete(old)
  _stale_keys[:] = [mine]
  return got


def any_process(flag: bool) -> bool:
  """Whether `flag` is true in any process (every process gets the same answer)."""
  if jax.process_count() == 1:
    return bool(flag)
  if _service() is None:
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))
  return "1" in _exchange("any_process", "1" if flag else "0", range(jax.process_count()))


def from_writer(value: int) -> int:
  """Process 0's `value` in every process (`value` itself in a single process)."""
  if jax.process_count() == 1:
    return int(value)
  if _service() is None:
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
  return int(_exchange("from_writer", str(int(value)) if is_writer() else None, range(1))[0])


# orbax's own absl flag (orbax.checkpoint._src.multihost): its barriers through the coordination
# service instead of a device collective.
_ORBAX_SERVICE_BARRIERS = "experimental_orbax_use_distributed_barrier"


def use_service_barriers() -> None:
  """Makes orbax's barriers wait on the coordination service, not on a device collective.

  Why: orbax creates a save's folders in a background thread (`AsyncOptions.
  create_directories_asynchronously`, on by default) with a barrier before and after, and by default
  its barriers are `multihost_utils.sync_global_devices`, an all-gather over every device. Run from
  that thread while the main thread runs its own collectives (train steps), the two threads'
  collectives could reach the devices in a different order in each process, and over gloo (CPU)
  mismatched collectives hang or fail. The coordination service's barrier is safe from any thread.

  Sets orbax's flag; it needs parsed absl flags (mdjax.main parses them before joining a
  multi-process run). A program that joins one without absl should pass
  `--experimental_orbax_use_distributed_barrier` to absl itself.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint  # noqa: F401  (defines the flag)  pylint: disable=g-import-not-at-top,unused-import
  if _ORBAX_SERVICE_BARRIERS in flags.FLAGS and flags.FLAGS.is_parsed():
    setattr(flags.FLAGS, _ORBAX_SERVICE_BARRIERS, True)


def fetch_replicated(tree: Any) -> Any:
  """Numpy copies of replicated arrays; every replica is the same, so the local one is read."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array)
                      else np.asarray(a), tree)


def fetch_sharded(tree: Any) -> Any:
  """Numpy copies of arrays sharded over the mesh, the whole of them on every process.

  Every process must call it at the same point. In a multi-process run each process publishes
  the shards it holds (one copy of each, `replica_id` 0) to the coordination service and reads
  everyone else's: meant for small arrays (metrics, flags, keys, evaluation counts), with no
  device collective (`multihost_utils.process_allgather` runs an all-gather program over every
  device) and a named timeout (module docstring). Leaves that are not global arrays (numpy, a
  process's own arrays) are concatenated over the processes along axis 0 (0-d ones stacked), as
  `process_allgather(tiled=True)` does.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  if _service() is None:  # joined some other way: a device collective is all there is
    return multihost_utils.process_allgather(tree, tiled=True)
  leaves, treedef = jax.tree.flatten(tree)
  mine = []
  for x in leaves:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      mine.append([(_slices_to_bounds(s.index, x.shape), np.asarray(s.data))
                   for s in x.addressable_shards if s.replica_id == 0])
    else:
      mine.append([(None, np.asarray(x))])
  # pickle: the values come from this run's own processes, and numpy arrays round-trip exactly.
  parts = [pickle.loads(b) for b in
           _exchange_bytes("fetch_sharded", pickle.dumps(mine), range(jax.process_count()))]
  out = []
  for i, x in enumerate(leaves):
    pieces = [piece for part in parts for piece in part[i]]
    if pieces[0][0] is None:  # a process-local leaf: one block per process
      out.append(np.concatenate([np.atleast_1d(block) for _, block in pieces]))
      continue
    whole = np.empty(x.shape, pieces[0][1].dtype)
    for bounds, block in pieces:
      whole[tuple(slice(lo, hi) for lo, hi in bounds)] = block
    out.append(whole)
  return jax.tree.unflatten(treedef, out)


def _slices_to_bounds(index: tuple, shape: tuple) -> tuple:
  """A shard's index (slices, possibly open-ended) as (start, stop) per dimension."""
  return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))


def put_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """`jax.device_put(tree, sharding)` for values every process holds alike, moving nothing
  between processes.

  In a multi-process run `jax.device_put` of a host value (numpy, or an array of this process's
  own) onto a sharding over every process's devices first checks that every process passed the
  same value, with an all-gather of the whole value (`multihost_utils.assert_equal`): a collective
  the size of the data, outside the run's own sequence of collectives (module docstring). Here
  each process fills its own devices' shards from its copy; the values must be equal (they come
  from the same seeds and files), which tests/test_multiprocess_pipeline.py checks end to end.
  Arrays already global are resharded by `jax.device_put`.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


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
