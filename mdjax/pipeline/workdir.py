"""A run's folder: its config, and a completion record per stage.

A stage records completion (`stages/<name>.json`) only after every output it names is complete,
and the record itself is written atomically (mdjax.core.files), so an interrupted stage
never looks finished: the next run redoes it from its own checkpoints.

In a multi-process run every process runs every stage, process 0 alone writes records and
reports, and all processes meet at a barrier after each write before reading it.

The config the folder was made with is kept in `config.json`; a later run with a different config
is refused (naming the differences) unless `--config.resume=force`.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from mdjax.core import files, process
from mdjax.errors import UserError

# `config.resume`: continue a workdir made by the same config (auto), by any config (force), or
# refuse a workdir that already holds a run (never).
RESUME = ("auto", "force", "never")
# Keys that change how a run is executed or logged, not what it computes.
IGNORED_KEYS = ("stages", "resume", "seeds", "controls", "data.num_threads", "data.prefetch",
                "train.log_every", "gan.log_every", "gan.sample_every")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  a, b = _flatten(old), _flatten(new)
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
    with os_errors(workdir):
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
    return os.path.exists(self.path(name))

  def load(self, name: str) -> dict:
    return files.read_json(self.path(name))

  def complete(self, name: str, record: dict) -> None:
    if process.is_writer():
      files.write_json_atomic(self.path(name), record)
    process.barrier(f"stage {name} complete")


class os_errors:  # pylint: disable=invalid-name
  """Turns a full disk or a permission problem into a UserError naming the path; nothing is lost."""

  FRIENDLY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EROFS: "the file system is read-only"}

  def __init__(self, where: str):
    self.where = where

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if kind is not None and issubclass(kind, OSError) and error.errno in self.FRIENDLY:
      raise UserError(
          f"cannot write under {self.where}: {self.FRIENDLY[error.errno]} ({error.filename or error}). "
          "Finished stages and checkpoints are kept; free space or fix permissions, then run the "
          "same command again to resume.") from None
    return False
