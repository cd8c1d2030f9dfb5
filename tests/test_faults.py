"""Fault injection: the faults a user meets, each followed by a rerun that must reach the same
results.json as an uninterrupted run, with nothing lost on the way.

Faults, injected by tests/pipeline_worker.py into real `mdjax.main` runs:
  * two runs on one workdir (the second stops at once, naming the first); the first then killed,
    whose stale lock must not block the resume;
  * damaged checkpoints, classifier and GAN: the newest one truncated (the GAN's), every one with
    missing files (the classifier's): set aside, resumed from the next intact one or restarted;
  * a full disk, as one "mdjax: error:" line (exit 74, no traceback, nothing else on stderr) in
    the GAN's first checkpoint, a classifier checkpoint written in orbax's background thread, the
    generated images, a stage record and the report;
  * `kill -9` while an asynchronous GAN checkpoint is being written;
  * NaN in one class's GAN on every attempt: restored from the last good checkpoint until the
    restarts run out; the checkpoints stay good;
  * `kill -9` in the middle of writing the generated set.

How the full disk is simulated (both are used):
  * a real one: where the tests run as root and may mount, the GAN chain's workdir is a small tmpfs
    that cannot hold the GAN's first checkpoint; tensorstore fails in orbax's background thread, as
    in the measured fault; "freeing space" is a remount with a larger size. Elsewhere that step
    uses the patched write below instead (the test says which in its output: `pytest -rP`).
  * patched writes that raise OSError(ENOSPC): orbax's checkpoint metadata write in its background
    thread, the PNG writes of the generated set, `stages/finetune.json`, `report.md`.

Cost: one uninterrupted reference run (tests/pipeline_runs.py, shared with
tests/test_run_pipeline.py) and two chains of short runs that resume one workdir each; the unit
tests at the bottom need no run.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from mdjax.core import storage
from mdjax.core.checkpoint import Checkpoints
from mdjax.errors import RecoveryWarning, StorageError, UserError, WorkdirBusyError
from mdjax.pipeline import workdir as workdir_lib

from local_processes import run_processes
from pipeline_runs import REPO, SMOKE_RUN, WORKER, log, run_worker as run, worker_env

# The folders each stage writes (a copy "up to a stage" keeps these and the stages' records).
STAGE_DIRS = {"train": ["train"], "validate": [], "gan": ["gan"], "generate": ["generated"],
              "finetune": ["finetune"], "test": []}
PROGRESS = ("step/s", "s/step", "it/s", "%|")


def stderr_lines(result) -> list[str]:
  """stderr without tqdm's progress bars (an mdjax line is split off a bar it was printed after)."""
  text = result.stderr.replace("\r", "\n").replace("mdjax: ", "\nmdjax: ")
  return [line for line in text.splitlines()
          if line.strip() and not any(p in line for p in PROGRESS)]


def one_line_error(result, code: int = StorageError.exit_code) -> str:
  """The run ended with exactly one "mdjax: error:" line and nothing else on stderr but progress
  bars and "mdjax: warning:" lines (no traceback, no orbax/asyncio echoes)."""
  assert result.returncode == code, log(result)
  lines = stderr_lines(result)
  errors = [line for line in lines if line.startswith("mdjax: error:")]
  assert len(errors) == 1, log(result)
  assert all(line.startswith(("mdjax: error:", "mdjax: warning:")) for line in lines), log(result)
  return errors[0]


def warnings_of(result) -> list[str]:
  return [line for line in stderr_lines(result) if line.startswith("mdjax: warning:")]


def load_results(workdir) -> dict:
  with open(os.path.join(workdir, "results.json")) as fh:
    results = json.load(fh)
  # When and how long: the only things allowed to differ.
  for key in ("finished", "stage_seconds"):
    results.pop(key)
  results["gan_cost"].pop("train_seconds")
  return results


def assert_same_results(workdir, reference):
  assert load_results(workdir) == load_results(reference)


def copy_until(reference, dst, stages) -> str:
  """A workdir holding the reference run's outputs of `stages` only (as if it stopped there)."""
  os.makedirs(os.path.join(dst, "stages"))
  shutil.copy(os.path.join(reference, "config.json"), dst)
  for stage in stages:
    shutil.copy(os.path.join(reference, "stages", f"{stage}.json"), os.path.join(dst, "stages"))
    for folder in STAGE_DIRS[stage]:
      shutil.copytree(os.path.join(reference, folder), os.path.join(dst, folder))
  return str(dst)


def steps_in(checkpoint_dir) -> list[str]:
  return sorted(os.listdir(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else []


def snapshot(folder) -> dict[str, bytes]:
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as fh:
        out[os.path.relpath(path, folder)] = fh.read()
  return out


@pytest.fixture
def reference(smoke_reference):
  """One uninterrupted run: what every faulted run must reach (tests/pipeline_runs.py)."""
  return smoke_reference[0]


@contextlib.contextmanager
def small_disk(path, size_mb: int):
  """A tmpfs of `size_mb` at `path` where this process may mount one (root); else None."""
  os.makedirs(path)
  mounted = False
  if os.geteuid() == 0 and shutil.which("mount"):
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", path],
                             capture_output=True).returncode == 0
  try:
    yield (lambda mb: subprocess.run(["mount", "-o", f"remount,size={mb}m", path], check=True)) \
        if mounted else None
  finally:
    if mounted:
      subprocess.run(["umount", "-l", path], check=False)


# --------------------------------------------------------------------------------------------------
# The GAN stage's faults, one workdir resumed after each.
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gan_stage_faults_then_resume(reference, tmp_path):
  trained_mb = sum(len(b) for b in snapshot(reference + "/train").values()) / 2**20
  with small_disk(str(tmp_path / "disk"), int(trained_mb) + 3) as grow:
    workdir = copy_until(reference, str(tmp_path / "disk" / "run"), ["train", "validate"])
    ckpts = os.path.join(workdir, "gan", "chunk_000", "checkpoints")
    trained = snapshot(os.path.join(workdir, "train"))

    # 1. A full disk at the GAN's first checkpoint (written in orbax's background thread).
    if grow is not None:
      print("full disk: a real tmpfs that cannot hold the GAN's first checkpoint")
      result = run("none", workdir)
    else:
      print("full disk: patched: orbax's background write of GAN checkpoint 0 raises ENOSPC")
      result = run("enospc:ckpt:gan:0", workdir)
    line = one_line_error(result)
    assert "the disk is full" in line and f"{ckpts}{os.sep}0" in line and "resume" in line, line
    assert snapshot(os.path.join(workdir, "train")) == trained  # the trained classifier, untouched
    assert os.path.exists(os.path.join(workdir, "stages", "validate.json"))
    assert not os.path.exists(os.path.join(workdir, "stages", "gan.json"))
    assert steps_in(ckpts) == []  # nothing committed, and the failed write's space freed
    if grow is not None:
      grow(512)  # the user frees space

    # 2. kill -9 while the asynchronous save of checkpoint 10 is writing.
    result = run("ckptkill:gan:10", workdir)
    assert result.returncode == -signal.SIGKILL, log(result)
    assert "0" in steps_in(ckpts) and "10" not in steps_in(ckpts), steps_in(ckpts)
    assert any(s.startswith("10.orbax-checkpoint-tmp") for s in steps_in(ckpts)), steps_in(ckpts)

    # 3. NaN in one class's GAN on every attempt from step 12: the chunk is restored from
    # checkpoint 10 (the kill's unfinished write was discarded and step 10 written again) until
    # the restarts run out. No NaN state is ever saved.
    result = run("nan:1:12", workdir)
    assert result.returncode == 1 and "NonFiniteLossError" in result.stderr, log(result)
    restored = [w for w in warnings_of(result) if "restored the checkpoint of step 10" in w]
    assert len(restored) == 3, log(result)
    assert steps_in(ckpts) == ["0", "10"]

    # 4. The newest GAN checkpoint truncated (as measured: its metadata file), and a full disk
    # while writing the generated images (a patched PNG write).
    with open(os.path.join(ckpts, "10", "state", "_METADATA"), "r+b") as fh:
      fh.truncate(40)
    result = run("enospc:png:30", workdir)
    line = one_line_error(result)
    assert "the disk is full" in line and os.path.join(workdir, ".generated.tmp-") in line, line
    damaged = [w for w in warnings_of(result) if "is damaged" in w]
    assert len(damaged) == 1 and "step 10" in damaged[0], log(result)
    assert "Resuming this stage from the checkpoint at step 0" in damaged[0]
    assert os.listdir(ckpts + ".damaged") == ["10"]  # set aside, not deleted
    assert os.path.exists(os.path.join(workdir, "stages", "gan.json"))
    assert not glob.glob(os.path.join(workdir, ".generated.tmp-*"))  # the failed write cleaned up

    # 5. kill -9 in the middle of writing the generated set.
    result = run("generate:40", workdir)
    assert result.returncode == -signal.SIGKILL, log(result)
    assert not os.path.exists(os.path.join(workdir, "stages", "generate.json"))

    # 6. The same command, no fault: the uninterrupted run's results.
    result = run("none", workdir)
    assert result.returncode == 0, log(result)
    # No recovery warning; the smoke GANs' images are near-copies, so the diversity warning stays.
    assert all("diversity ratio" in w for w in warnings_of(result)), log(result)
    assert_same_results(workdir, reference)
    assert not glob.glob(os.path.join(workdir, ".generated.tmp-*"))


# --------------------------------------------------------------------------------------------------
# The classifier's faults (its fine-tuning stage), one workdir resumed after each.
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_classifier_stage_faults_then_resume(reference, tmp_path):
  workdir = copy_until(reference, str(tmp_path / "run"), ["train", "validate", "gan", "generate"])
  ckpts = os.path.join(workdir, "finetune", "checkpoints")
  # The fine-tune's epoch-end checkpoint: its last step, read from the reference (the fine-tune's
  # length follows the generated set's size, which the smoke config does not pin).
  last = str(max(int(s) for s in steps_in(os.path.join(reference, "finetune", "checkpoints"))))

  # 1. Two runs on one workdir: the second stops at once, naming the first.
  marker = tmp_path / "holding"
  first = subprocess.Popen([sys.executable, WORKER, "hold:finetune:25", "--", *SMOKE_RUN,
                            f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL,
                           env=worker_env(MDJAX_TEST_HOLD_MARKER=str(marker)))
  try:
    deadline = time.time() + 600
    while not marker.exists():
      assert first.poll() is None and time.time() < deadline, "the first run ended early"
      time.sleep(0.5)
    start = time.perf_counter()
    second = run("none", workdir)
    seconds = time.perf_counter() - start
    line = one_line_error(second, WorkdirBusyError.exit_code)
    assert f"process {first.pid} " in line and "in use" in line, line
    print(f"second run on a busy workdir: exit {second.returncode} after {seconds:.1f} s: {line}")
    assert first.poll() is None  # the first run was not disturbed
  finally:
    first.kill()  # SIGKILL: its lock file stays behind, naming a dead process
    first.wait()
  assert str(first.pid) in open(os.path.join(workdir, workdir_lib.LOCK_FILE)).read()
  assert steps_in(ckpts) == ["20"]

  # 2. Every classifier checkpoint damaged (its array files deleted), and a full disk in the
  # background write of the epoch-end checkpoint. The stale lock does not block this run.
  for data in glob.glob(os.path.join(ckpts, "20", "state", "**", "d", "*"), recursive=True):
    os.remove(data)
  result = run(f"enospc:ckpt:finetune:{last}", workdir)
  line = one_line_error(result)
  assert "the disk is full" in line and f"{ckpts}{os.sep}{last}" in line, line
  damaged = [w for w in warnings_of(result) if "is damaged" in w]
  assert len(damaged) == 1 and "No intact checkpoint is left: this stage starts over" in damaged[0]
  assert os.listdir(ckpts + ".damaged") == ["20"]
  assert steps_in(ckpts) == ["20"]  # written again by the restarted stage; the failed last is gone

  # 3. A full disk writing the stage's record: the stage's checkpoints are kept.
  result = run("enospc:record:finetune", workdir)
  line = one_line_error(result)
  assert os.path.join(workdir, "stages", "finetune.json") in line, line
  assert steps_in(ckpts) == ["20", last]
  assert not os.path.exists(os.path.join(workdir, "stages", "finetune.json"))

  # 4. A full disk writing the report: every stage is finished and recorded.
  result = run("enospc:report", workdir)
  line = one_line_error(result)
  assert os.path.join(workdir, "report.md") in line, line
  assert os.path.exists(os.path.join(workdir, "stages", "test.json"))

  # 5. The same command, no fault: the uninterrupted run's results, and the report.
  result = run("none", workdir)
  assert result.returncode == 0, log(result)
  assert_same_results(workdir, reference)
  assert os.path.exists(os.path.join(workdir, "report.md"))


# --------------------------------------------------------------------------------------------------
# The pieces, without a run.
# --------------------------------------------------------------------------------------------------
def test_os_fault_finds_the_os_error_in_any_form():
  direct = OSError(errno.ENOSPC, "No space left on device", "/w/x")
  assert storage.os_fault(direct) is direct
  try:
    try:
      raise direct
    except OSError as e:
      raise RuntimeError("wrapped") from e
  except RuntimeError as wrapped:
    assert storage.os_fault(wrapped) is direct
  # tensorstore's report of a failed write, as orbax re-raises it from its background thread.
  text = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file '
                    '"/w/ck/0.orbax-checkpoint-tmp/": Failed writing: "/w/ck/0.orbax-checkpoint-tmp/d/'
                    'ab": Failed to write 7356416 bytes to file 8: No space left on device '
                    "[os_error_code='28']")
  fault = storage.os_fault(text)
  assert fault.errno == errno.ENOSPC and fault.filename == "/w/ck/0.orbax-checkpoint-tmp/d/ab"
  assert storage.os_fault(ValueError("DATA_LOSS: Error decoding")) is None
  assert storage.os_fault(OSError(errno.ENOENT, "missing")) is None
  message = str(storage.storage_error(fault, needed_bytes=3 * 2**20))
  assert "cannot write /w/ck/0.orbax-checkpoint-tmp/d/ab: the disk is full" in message
  assert "free of" in message and "about 3.0 MiB" in message and "run the same command" in message
  denied = str(storage.storage_error(OSError(errno.EACCES, "Permission denied", "/w/r.json")))
  assert "cannot write /w/r.json: permission denied. Make it writable" in denied


def _state(n=6):
  return {"w": jnp.arange(float(n)), "step": jnp.int32(n)}


def test_damaged_checkpoints_are_set_aside_and_a_different_config_is_refused(tmp_path):
  directory = tmp_path / "ck"
  with Checkpoints(directory, record="history") as ck:
    for step in (1, 2):
      ck.save(step, _state(), {"step": step})
  with open(directory / "2" / "state" / "_METADATA", "r+b") as fh:
    fh.truncate(10)
  ck = Checkpoints(directory, record="history")
  with pytest.warns(RecoveryWarning, match="step 2 .* is damaged .*Resuming this stage from .*step 1"):
    step, state, record = ck.restore_latest(_state())
  assert (step, record) == (1, {"step": 1})
  np.testing.assert_array_equal(state["w"], np.arange(6.0))
  assert os.listdir(str(directory) + ".damaged") == ["2"] and ck.latest_step() == 1
  # A checkpoint that reads but does not fit is another config's: refused, left in place.
  with pytest.raises(UserError, match=r"does not fit this run's state \(w: stored float32\[6\], "
                                      r"this run float32\[7\]\)\. It was written by a different config"):
    ck.restore_latest(_state(7))
  assert ck.latest_step() == 1
  # With no intact checkpoint left the stage starts over.
  shutil.rmtree(directory / "1" / "history")
  with pytest.warns(RecoveryWarning, match="No intact checkpoint is left: this stage starts over"):
    assert ck.restore_latest(_state()) is None
  assert sorted(os.listdir(str(directory) + ".damaged")) == ["1", "2"]
  ck.close()


def test_the_read_errors_a_damaged_checkpoint_leaves_behind_are_not_echoed(tmp_path):
  """orbax reads a checkpoint as many asyncio tasks; when one fails, the others' errors are logged
  by asyncio later ("Task exception was never retrieved", with a traceback), a fresh-clone CI run's
  fault chain failed on one such echo. Once a read has failed, mdjax.main's log filter drops the
  records quoting that checkpoint, and keeps every other error."""
  directory = tmp_path / "ck"
  with Checkpoints(directory) as ck:
    for step in (1, 2):
      ck.save(step, _state())
  for data in glob.glob(str(directory / "2" / "**" / "d" / "*"), recursive=True):
    os.remove(data)

  def echo(folder: str) -> logging.LogRecord:
    error = ValueError(f'NOT_FOUND: Error reading "w/.zarray" in OCDBT database at local file '
                       f'"{folder}/": Error reading byte range of local file "{folder}/d/3f6c"')
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                             "Task exception was never retrieved", None, (ValueError, error, None))

  drop = storage._DropFaultRecords()  # pylint: disable=protected-access
  assert drop.filter(echo(str(directory / "2"))), "kept: no read of step 2 has failed yet"
  # An echo can come while the read is still under way, before its failure reaches the caller
  # (a fresh-clone CI run printed one): dropped from the read's start; kept after a good read.
  with storage.reported_read(directory / "1"):
    assert not drop.filter(echo(str(directory / "1"))), "an echo during the read"
  assert drop.filter(echo(str(directory / "1"))), "the read succeeded: later errors are news"
  ck = Checkpoints(directory)
  with pytest.warns(RecoveryWarning, match="step 2 .* is damaged"):
    assert ck.restore_latest(_state())[0] == 1
  ck.close()
  assert not drop.filter(echo(str(directory / "2"))), "an echo of the reported damage"
  assert drop.filter(echo(str(directory / "1"))), "step 1 read fine: its errors are news"
  assert drop.filter(echo(str(tmp_path / "elsewhere"))), "another folder's errors are news"


# The failed save leaves tensorstore callbacks into orbax's closed event loop ("Event loop is
# closed" at collection); mdjax.main silences exactly those (storage.quiet_fault_echoes), this test
# does not install that process-wide hook.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_in_the_background_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import async_path  # pylint: disable=import-outside-toplevel
  original = async_path.write_text

  async def full_for_step_2(path, text):
    if "/2.orbax-checkpoint-tmp" in str(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await original(path, text)

  monkeypatch.setattr(async_path, "write_text", full_for_step_2)
  ck = Checkpoints(tmp_path / "ck", max_to_keep=1)
  ck.save(1, _state())
  ck.save(2, _state())  # returns: the failing write is in orbax's background thread
  with pytest.raises(StorageError, match=f"cannot write {tmp_path}/ck/2: the disk is full"):
    ck.close()
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path / "ck")) == ["1"]  # max_to_keep=1, yet 1 is kept; 2 cleaned
  with Checkpoints(tmp_path / "ck") as ck:
    step, state, _ = ck.restore_latest(_state())
  assert step == 1 and int(state["step"]) == 6


def test_the_workdir_lock_names_its_holder_and_dies_with_it(tmp_path):
  workdir = str(tmp_path / "w")
  with workdir_lib.locked(workdir):
    # flock locks belong to an open file: a second open, even in this process, is refused.
    with pytest.raises(WorkdirBusyError, match=f"in use by process {os.getpid()} on "):
      with workdir_lib.locked(workdir):
        pass
  with workdir_lib.locked(workdir):  # released, and the file left behind does not block
    pass
  # A process that dies holding it (as kill -9 does) releases it.
  holder = subprocess.Popen([sys.executable, "-c", (
      "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
      "print('held', flush=True); time.sleep(60)"), os.path.join(workdir, workdir_lib.LOCK_FILE)],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirBusyError):
    with workdir_lib.locked(workdir):
      pass
  holder.kill()
  holder.wait()
  with workdir_lib.locked(workdir):
    pass


def test_a_dead_tensorboard_writer_does_not_hang_the_loop(tmp_path, monkeypatch):
  import tensorboardX.record_writer  # pylint: disable=import-outside-toplevel
  from mdjax.core import process  # pylint: disable=import-outside-toplevel

  def full(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(tensorboardX.record_writer.RecordWriter, "flush", full)
  monkeypatch.setattr(threading, "excepthook", lambda args: None)  # its thread dies quietly here
  writer = process.metric_writer(str(tmp_path / "tb"))
  done = threading.Event()

  def log_many():
    for i in range(100):  # the default queue holds 10: past that, add_scalar would block forever
      writer.add_scalar("x", float(i), i)
      time.sleep(0.002)
    done.set()

  threading.Thread(target=log_many, daemon=True).start()
  assert done.wait(timeout=30), "add_scalar blocked after the TensorBoard writer thread died"
  with pytest.raises(OSError):
    writer.close()  # the failure reaches the caller (a stage turns it into a StorageError)
  monkeypatch.undo()
  writer.close()


def test_every_process_of_a_run_stops_when_the_workdir_is_busy(tmp_path, free_port):
  """Process 0 alone takes the lock and tells the others; none runs on a busy workdir."""
  def launch(port):
    runs = run_processes("lock_multiprocess_worker.py", port, tmp_path / "w", timeout=120,
                         merge_stderr=False)
    # The last line: gloo (the CPU collectives) prints its own connection lines to stdout first.
    return [r.stdout.strip().splitlines()[-1] for r in runs]

  with workdir_lib.locked(str(tmp_path / "w")):
    out = launch(free_port)
  assert out[0].startswith(f"busy: workdir {tmp_path / 'w'} is in use by process {os.getpid()} "), out
  assert out[1].startswith("busy: process 0 of this run could not take the lock"), out
  # Free: process 0 holds it, and process 1 does not try (it would find it held and stop).
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  assert launch(port) == ["entered", "entered"]
