"""A run's folder: its config, and a completion record per stage.

A stage records completion (`stages/<name>.json`) only after every output it names is complete,
and the record itself is written atomically (mdjax.core.files), so an interrupted stage
never looks finished: the next run redoes it from its own checkpoints.

In a multi-process run every process runs every stage, process 0 alone writes records and
reports, and all processes meet at a barrier after each write before reading it.

The config the folder was made with is kept in `config.json`; a later run with a different config
is refused (naming the differences) unless `--config.resume=force`.

One run at a time: `locked` holds an exclusive `fcntl.flock` on `mdjax.lock` for the whole run
(process 0 holds it for a multi-process run), and writes who holds it into the file. A second run
on the same workdir stops at once with one line naming that process. The OS releases the lock
when its process ends however it ends (also `kill -9`), so the file a dead run leaves behind never
blocks a resume: only a live holder counts, never the file's existence.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from mdjax.core import files, process, storage
from mdjax.errors import UserError, WorkdirBusyError

LOCK_FILE = "mdjax.lock"

# `config.resume`: continue a workdir made by the same config (auto), by any config (force), or
# refuse a workdir that already holds a run (never).
RESUME = ("auto", "force", "never")
# Keys that change how a run is executed or logged, not what it computes.
IGNORED_KEYS = ("stages", "resume", "seeds", "controls", "data.num_threads", "data.prefetch",
                "train.log_every", "gan.log_every")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config dict as {"train.epochs": 15, ...}."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  a, b = flatten(old), flatten(new)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key in IGNORED_KEYS or a.get(key) == b.get(key):
      continue
    diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return diffs


def prepare(workdir: str, config) -> None:
  """Creates `workdir` or checks that it belongs to this config (see module docstring)."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(json.dumps(config.to_dict(), default=str))
  if os.path.exists(path):
    if config.resume == "never":
      raise UserError(f"workdir {workdir} already holds a run and config.resume='never'; "
                      "choose another --workdir.")
    diffs = config_differences(files.read_json(path), new)
    if diffs and config.resume != "force":
      shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
      raise UserError(f"workdir {workdir} was made by a different config ({shown}). Use another "
                      "--workdir, or --config.resume=force to continue it with this config.")
    if diffs and process.is_writer():
      files.write_json_atomic(os.path.join(workdir, "config.forced.json"), new)
    process.barrier(f"prepare {workdir}")
    return
  process.barrier(f"checked {workdir}")  # everyone has read the folder before process 0 writes to it
  if process.is_writer():
    with storage.converted(workdir):
      os.makedirs(workdir, exist_ok=True)
      files.write_json_atomic(path, new)
  process.barrier(f"prepare {workdir}")


class Stages:
  """Completion records of a run's stages."""

  def __init__(self, workdir: str):
    self.dir = os.path.join(workdir, "stages")

  def path(self, name: str) -> str:
    return os.path.join(self.dir, f"{name}.json")

  def done(self, name: str) -> bool:
    """Whether stage `name` has its record: process 0's answer, the same in every process.

    Every process must call it at the same point. Each process looking for itself raced with
    process 0's write: a stage that takes no time (one skipped, like distill when it is off) had
    its record written by process 0 before a slower process 1 looked, so process 1 skipped the
    stage and its barrier while process 0 waited there, and the two processes' meetings and
    collectives fell out of step (the faults of tests/test_multiprocess_pipeline.py).
    """
    return bool(process.from_writer(os.path.exists(self.path(name))))

  def load(self, name: str) -> dict:
    return files.read_json(self.path(name))

  def complete(self, name: str, record: dict) -> None:
    if process.is_writer():
      files.write_json_atomic(self.path(name), record)
    process.barrier(f"stage {name} complete")


def _holder(fh) -> str:
  """Who holds the lock, as its holder wrote it into the lock file."""
  try:
    fh.seek(0)
    info = json.loads(fh.read() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "another process (it has not written its name yet)"
  return (f"process {info.get('pid')} on {info.get('host')} (started {info.get('started')}: "
          f"{info.get('command')})")


def acquire_lock(path: str):
  """The open lock file, locked by this process; WorkdirBusyError if another process holds it."""
  fh = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fh)
    fh.close()
    raise WorkdirBusyError(
        f"workdir {os.path.dirname(path)} is in use by {holder}. Two runs on one workdir would "
        "overwrite each other's checkpoints and records: wait for that run to finish (or stop it; "
        "the same command then resumes it), or choose another --workdir.") from None
  except BaseException:
    fh.close()
    raise
  fh.seek(0)
  fh.truncate()
  fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": " ".join(sys.argv)}) + "\n")
  fh.flush()
  return fh


@contextlib.contextmanager
def locked(workdir: str):
  """Holds the workdir's lock for the block (see the module docstring); creates the folder."""
  fh, busy = None, None
  if process.is_writer():
    try:
      with storage.converted(workdir):
        os.makedirs(workdir, exist_ok=True)
        fh = acquire_lock(os.path.join(workdir, LOCK_FILE))
    except UserError as e:  # held by another run, or a workdir that cannot be written
      busy = e
  # Every process stops if process 0 could not take the lock (the others would otherwise run on).
  if process.from_writer(busy is not None):
    raise busy or WorkdirBusyError(f"process 0 of this run could not take the lock of workdir "
                                   f"{workdir}; see its message.")
  try:
    yield
  finally:
    if fh is not None:
      fh.close()  # releases the lock; the file stays (deleting it would race with a new run)
