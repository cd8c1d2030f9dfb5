"""mdjax.core: loop cadence, finite checks, atomic writes, the checkpoint wrapper, meshes."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdjax.core import files, loop, mesh as mesh_lib, process
from mdjax.core.checkpoint import Checkpoints
from mdjax.errors import UserError

from local_processes import run_processes


def test_itstime_every_and_last_step():
  assert [s for s in range(1, 11) if loop.itstime(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if loop.itstime(s, 4)] == [4, 8]
  assert [s for s in range(1, 11) if loop.itstime(s, 0, 10)] == [10]


def test_finite_checks():
  assert bool(loop.all_finite({"a": jnp.ones(3), "b": jnp.arange(3), "c": 2.0}))
  assert not bool(loop.all_finite({"a": jnp.array([1.0, jnp.nan])}))
  assert not bool(jax.jit(loop.all_finite)({"a": jnp.array([jnp.inf])}))
  rows = [{"loss": 1.0, "g": 2.0}, {"loss": 1.0, "g": float("inf")}, {"loss": float("nan"), "g": 0}]
  assert loop.first_non_finite(rows, ("loss", "g")) == 1
  assert loop.first_non_finite(rows, ("loss",)) == 2
  assert loop.first_non_finite(rows[:1], ("loss", "g")) is None


def test_write_atomic_replaces_whole_file_and_cleans_up_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "sub" / "record.json"
  files.write_json_atomic(path, {"x": np.float32(1.5), "y": np.arange(2)})
  assert files.read_json(path) == {"x": 1.5, "y": [0, 1]}

  def fail(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError):
    files.write_atomic(path, b"new content")
  assert json.loads(path.read_text()) == {"x": 1.5, "y": [0, 1]}  # the old file, whole
  assert os.listdir(path.parent) == ["record.json"]  # no temporary file left behind


def test_checkpoints_round_trip_with_record_and_refuse_another_shape(tmp_path):
  mesh = mesh_lib.data_mesh()
  state = {"w": jax.device_put(jnp.arange(8.0), mesh_lib.batch_sharding(mesh)),
           "step": jax.device_put(jnp.int32(3), mesh_lib.replicated(mesh))}
  with Checkpoints(tmp_path / "ck", max_to_keep=2, record="history") as ck:
    assert ck.latest_step() is None
    for step in (1, 2, 3):
      ck.save(step, state, {"loss": [float(step)]})
  with Checkpoints(tmp_path / "ck", record="history") as ck:
    assert ck.latest_step() == 3
    restored, history = ck.restore(3, state)
    assert history == {"loss": [3.0]}
    np.testing.assert_array_equal(restored["w"], np.arange(8.0))
    assert restored["w"].sharding == state["w"].sharding
    assert sorted(int(p) for p in os.listdir(tmp_path / "ck") if p.isdigit()) == [2, 3]
    with pytest.raises(UserError, match="does not fit this run's state"):
      ck.restore(3, {"w": state["w"], "other": state["step"]})


def test_resume_or_start_saves_the_start_then_resumes_the_newest(tmp_path):
  start = {"w": jnp.zeros(4), "step": jnp.int32(0)}
  with Checkpoints(tmp_path / "ck") as ck:
    step, state, _, fresh = ck.resume_or_start(start)
    assert (step, fresh) == (0, True) and state is start
    ck.save(5, {"w": jnp.full(4, 5.0), "step": jnp.int32(5)})
  with Checkpoints(tmp_path / "ck") as ck:
    assert ck.latest_step() == 5
    step, state, _, fresh = ck.resume_or_start(start)
  assert (step, fresh) == (5, False)
  np.testing.assert_array_equal(state["w"], np.full(4, 5.0))
  with Checkpoints(tmp_path / "ck") as ck:  # checkpoint 0 was written by the fresh start
    state0, _ = ck.restore(0, start)
  np.testing.assert_array_equal(state0["w"], np.zeros(4))


def test_failed_save_leaves_no_unfinished_folder(tmp_path, monkeypatch):
  """A full disk in one write of a save while its other writes still run (the CI failure of stop
  19: orbax reports the first failed write at once, a later write then put the step's tmp folder
  back). The record's write fails at once; the state's metadata writes land 0.3 s later, creating
  their folders as tensorstore does."""
  import asyncio
  import errno
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  from orbax.checkpoint._src.path import async_path
  from mdjax.errors import StorageError

  write_text, save_json = async_path.write_text, json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def late_write(path, text):
    if f"{os.sep}2.orbax-checkpoint-tmp" in str(path):
      await asyncio.sleep(0.3)
      os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    return await write_text(path, text)

  async def full_disk(self, x, directory):
    if f"{os.sep}2.orbax-checkpoint-tmp" in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory / "history"))
    return await save_json(self, x, directory)

  monkeypatch.setattr(async_path, "write_text", late_write)
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
  state = {"w": jnp.arange(8.0)}
  with Checkpoints(tmp_path / "ck", record="history") as ck:
    ck.save(1, state, {"loss": [1.0]})
    ck.wait()
    ck.save(2, state, {"loss": [2.0]})
    with pytest.raises(StorageError, match="the disk is full"):
      ck.wait()
    time.sleep(0.8)  # the late writes have landed (or were waited for)
    assert os.listdir(tmp_path / "ck") == ["1"]  # step 2's unfinished folder is gone, for good
    monkeypatch.undo()
    ck.save(3, state, {"loss": [3.0]})  # the same manager saves again once there is space
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "3"]


def test_meshes_are_auto_and_one_dimensional():
  explicit = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  auto = mesh_lib.auto_mesh(explicit)
  assert auto.axis_types == (jax.sharding.AxisType.Auto,)
  assert list(auto.devices.flat) == list(explicit.devices.flat)
  assert mesh_lib.class_mesh().axis_names == (mesh_lib.CLASS_AXIS,)
  assert mesh_lib.data_mesh().size == jax.device_count()
  x = jax.device_put(jnp.arange(8.0), mesh_lib.class_sharding(mesh_lib.class_mesh()))
  np.testing.assert_array_equal(process.fetch_sharded(x), np.arange(8.0))
  assert process.is_writer()  # a single-process run: process 0 writes


def test_ordered_mean_adds_in_device_order():
  """The mean over "data" is device 0 + device 1 + ... in that order, on every device: the bits
  a pmean over the same values gives only up to rounding (its order is the collective's)."""
  from jax.sharding import PartitionSpec as P
  from mdjax.core.collectives import ordered_mean
  mesh = mesh_lib.data_mesh()
  n = mesh.size
  rng = np.random.default_rng(0)
  # Sizes that do not divide by n, a scalar, a second float dtype, a nested tree.
  tree = {"w": rng.normal(size=(n, 3, 7)).astype(np.float32) * 1e3,
          "s": rng.normal(size=(n,)).astype(np.float32),
          "h": {"b": rng.normal(size=(n, 5)).astype(np.float16)}}

  def per_device(t):
    return ordered_mean(jax.tree.map(lambda v: v[0], t), "data")

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P()))
  got = fn(jax.device_put(tree, mesh_lib.batch_sharding(mesh)))

  def in_order(x):
    total = x[0]
    for j in range(1, n):
      total = total + x[j]
    return total / x.dtype.type(n)

  for key, value in (("w", tree["w"]), ("s", tree["s"]), ("b", tree["h"]["b"])):
    out = got["h"]["b"] if key == "b" else got[key]
    assert out.dtype == value.dtype and out.shape == value.shape[1:]
    np.testing.assert_array_equal(np.asarray(out), in_order(value))
  # The same on every device (out_specs=P() holds it as one replicated value).
  shards = [np.asarray(s.data) for s in got["w"].addressable_shards]
  assert all(np.array_equal(s, shards[0]) for s in shards)


def test_abandoned_write_warnings_are_dropped_only_after_a_reported_fault(monkeypatch):
  # CI of stop 20: after the one "mdjax: error:" line of a full disk, the exit printed
  # "RuntimeWarning: coroutine 'async_serialize_from_host.<locals>.write_fragment' was never
  # awaited" (a write abandoned by the failed save).
  import threading
  import warnings
  from mdjax.core import storage
  monkeypatch.setattr(storage, "_reported", threading.Event())
  text = "coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited"
  with warnings.catch_warnings(record=True) as shown:  # restores the filters afterwards
    warnings.simplefilter("always")
    warnings.warn(text, RuntimeWarning)  # no fault reported: shown
    storage.mark_reported()
    warnings.warn(text, RuntimeWarning)
    warnings.warn("something else", RuntimeWarning)
  assert [str(w.message) for w in shown] == [text, "something else"]


def test_metric_writer_makes_its_event_file_with_the_first_value(tmp_path):
  """A writer that is opened and closed with nothing written (a finished GAN stage reopened to
  generate) leaves no event file; one that writes leaves one file holding the value."""
  idle = process.metric_writer(str(tmp_path / "idle"))
  idle.flush()
  idle.close()
  assert not (tmp_path / "idle").exists()
  used = process.metric_writer(str(tmp_path / "used"))
  used.add_scalar("loss", 0.5, 1)
  used.close()
  files_written = list((tmp_path / "used").glob("events.out.tfevents.*"))
  assert len(files_written) == 1 and files_written[0].stat().st_size > 0
  assert _scalars(files_written[0]) == [("loss", 1, 0.5)]
  # Processes other than 0 (active=False here) get a writer that writes nothing at all.
  off = process.metric_writer(str(tmp_path / "off"), active=False)
  off.add_scalar("loss", 0.5, 1)
  off.close()
  assert not (tmp_path / "off").exists()


def _scalars(path) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in a TensorBoard event file.

  Read by hand (TFRecord framing: uint64 length, uint32 CRC, the serialized Event, uint32 CRC)
  because the tensorboard package, which has a reader, is not a dependency; tensorboardX ships
  the Event proto.
  """
  import struct  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  data, out, at = path.read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
    at += 12 + length + 4
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_two_processes_meet_without_device_collectives(tmp_path, free_port):
  """Barriers, shared flags and placements of host values go through the coordination service and
  each process's own copy, never a device collective (mdjax.core.process's docstring says why)."""
  runs = run_processes("process_multiprocess_worker.py", free_port, tmp_path, timeout=180)
  outs = [r.stdout for r in runs]
  assert all(r.returncode == 0 for r in runs), outs
  assert all(o.strip().endswith("ok") for o in outs), outs
  timeout = [line for line in outs[0].splitlines() if line.startswith("timeout: ")]
  assert len(timeout) == 1 and "at the barrier 'only process 0 comes here'" in timeout[0], outs[0]
  assert "MDJAX_SYNC_TIMEOUT_S" in timeout[0]


def test_sync_timeout_must_be_positive_seconds(monkeypatch):
  monkeypatch.setenv("MDJAX_SYNC_TIMEOUT_S", "ten")
  with pytest.raises(UserError, match="MDJAX_SYNC_TIMEOUT_S='ten': expected a whole number"):
    process.sync_timeout_s()
  monkeypatch.setenv("MDJAX_SYNC_TIMEOUT_S", "5")
  assert process.sync_timeout_s() == 5


def test_a_failed_restore_leaves_no_coroutine_warning_behind():
  # A damaged checkpoint's restore leaves orbax's read coroutines behind, some never started;
  # freeing them must not print Python's "coroutine ... was never awaited" on the user's stderr
  # (tests/test_faults.py checks that a damaged checkpoint gives warning lines only).
  import warnings  # pylint: disable=import-outside-toplevel
  from mdjax.core import checkpoint  # pylint: disable=import-outside-toplevel

  async def read():
    return None

  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with checkpoint._collected_unraisable():  # pylint: disable=protected-access
      pending = read()  # created, never awaited
      del pending
    leftover = read()
    del leftover  # outside the context: Python warns again
  messages = [str(w.message) for w in seen]
  assert len(messages) == 1 and "never awaited" in messages[0], messages
