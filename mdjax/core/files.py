"""Writing a file so that a reader sees the old one or the whole new one, never a prefix.

Everything a later run trusts (stage records, config.json, results.json, GAN chunk metadata,
sample grids, the generated set's COMPLETE marker) goes through `write_atomic`: the bytes go to a
temporary file in the same directory (same file system, so the rename is atomic), are fsync'ed,
the file is renamed onto the target and the directory is fsync'ed, so the rename itself survives
a crash. A failed write removes its temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np


def fsync_dir(path: str | os.PathLike) -> None:
  """Makes the directory's entries (new names, renames) durable."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` atomically (see the module docstring); creates the parent folder."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as fh:
      fh.write(data.encode() if isinstance(data, str) else data)
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  fsync_dir(directory)


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
  """`obj` as JSON (numpy scalars and arrays included), written atomically."""
  write_atomic(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  with open(path) as fh:
    return json.load(fh)
