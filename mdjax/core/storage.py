"""A full disk or a permission problem, wherever it happens, as one `StorageError`.

A write in the workdir can fail in the caller's thread (records, reports, generated images: an
`OSError`) or in a background thread (orbax's asynchronous checkpoint writes, tensorboardX's event
writer). The background ones reach the caller later and wrapped: orbax re-raises tensorstore's
error at the next save or at close, as a `ValueError` whose text alone carries the OS error
("... No space left on device [os_error_code='28']"). `os_fault` finds the OS error in either form;
`storage_error` turns it into the one line `mdjax.main` prints (the path, what to free or fix, and
that the same command resumes), and `converted` does both around a block of work.

The failing threads also print their own tracebacks as they die: orbax logs each failed write
with its traceback (absl), asyncio logs the futures nobody retrieved, tensorstore's callbacks into
the closed event loop go to `sys.unraisablehook` (hundreds of lines for one full disk), and the
tensorboardX writer thread dies with "Exception in thread"; at exit, the coroutines of abandoned
writes are collected unawaited ("RuntimeWarning: coroutine ... was never awaited"). A damaged
checkpoint's failed read, which the caller reports once, leaves the same kind of echoes: asyncio
logs the failures of orbax's other read tasks whenever they are dropped (`reported_read`).
`quiet_fault_echoes` and `mark_reported` (called by `mdjax.main`) drop exactly those echoes of a
storage fault; the fault itself still ends the run through the error above. Any other error in those places is printed as before.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

import humanize

from mdjax.errors import StorageError

FRIENDLY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "the file system is read-only"}
_FULL = (errno.ENOSPC, errno.EDQUOT)
# tensorstore (under orbax) reports an OS error as text: "...: <strerror> [os_error_code='28']".
_TS_CODE = re.compile(r"os_error_code='?(\d+)'?")
_QUOTED_PATH = re.compile(r"\"(/[^\"]+)\"")
# Set once a storage fault has been reported, so the interpreter's shutdown does not print the
# abandoned asynchronous writes' own errors after the one line (see quiet_fault_echoes).
_reported = threading.Event()
# Checkpoint folders (each ending in a separator) being read, or whose failed read was reported
# (see reported_read): log records that quote them are echoes of that one report.
_failed_reads: set[str] = set()


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
  """`exc`, its causes and contexts, and the members of exception groups (each once)."""
  seen, todo = set(), [exc]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])


def os_fault(exc: BaseException | None) -> OSError | None:
  """The full-disk / quota / permission / read-only error behind `exc`, or None.

  An `OSError` anywhere in the chain counts as it is; an error whose text is tensorstore's report
  of one (orbax's asynchronous writes) becomes an `OSError` with that errno and the path it names.
  """
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in FRIENDLY:
      return e
  for e in _chain(exc):
    text = str(e)
    code = _TS_CODE.search(text)
    if code and int(code.group(1)) in FRIENDLY:
      number = int(code.group(1))
    else:
      number = next((n for n in FRIENDLY if os.strerror(n) in text), None)
    if number is not None:
      paths = _QUOTED_PATH.findall(text)
      return OSError(number, os.strerror(number), paths[-1] if paths else None)
  return None


def _existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def storage_error(fault: OSError, where: str | None = None, *, needed_bytes: int | None = None,
                  path: str | None = None) -> StorageError:
  """The one-line error for `fault` (from `os_fault`); `where` is the path to name when the error
  does not carry one, `path` one to name instead of the error's; `needed_bytes` what the failed
  write needed, when known."""
  path = path or (os.fspath(fault.filename) if fault.filename else (where or "the workdir"))
  what = FRIENDLY.get(fault.errno, fault.strerror or "the write failed")
  resume = ("Finished stages and intact checkpoints are kept; run the same command again to "
            "resume.")
  if fault.errno in _FULL:
    try:
      usage = shutil.disk_usage(_existing(path))
      room = (f"{humanize.naturalsize(usage.free, binary=True)} free of "
              f"{humanize.naturalsize(usage.total, binary=True)} on its file system")
    except OSError:
      room = "free space unknown"
    need = (f"; this write needed about {humanize.naturalsize(needed_bytes, binary=True)}"
            if needed_bytes else "")
    message = (f"cannot write {path}: {what} ({room}{need}). Free space on that file system (in "
               "a workdir, tensorboard/ logs and *.damaged/ folders are not needed to resume), or "
               f"move the workdir to a larger disk. {resume}")
  else:
    message = (f"cannot write {path}: {what}. Make it writable for this user (or choose another "
               f"--workdir). {resume}")
  return StorageError(message)


@contextlib.contextmanager
def converted(where: str | None = None, *, needed_bytes: int | None = None,
              on_fault: Callable[[OSError], str | None] | None = None):
  """Raises a `StorageError` (from None: no traceback to print) for any exception in the block
  that `os_fault` recognises; other exceptions pass unchanged. `on_fault(fault)` runs first (to
  clean up) and may return the path the message should name."""
  try:
    yield
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    fault = os_fault(e)
    if fault is None:
      raise
    path = on_fault(fault) if on_fault else None
    raise storage_error(fault, where, needed_bytes=needed_bytes, path=path) from None


def mark_reported() -> None:
  """Called by `mdjax.main` after printing a StorageError (see quiet_fault_echoes).

  From then on Python's "coroutine ... was never awaited" is not shown: the writes the failed save
  abandoned (orbax's `write_fragment`) are collected unawaited as the process exits. A warnings
  filter, not a hook, because at that point the interpreter may be shutting down, where only the
  filter list (shared with the C warnings module) is still consulted.
  """
  _reported.set()
  warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


@contextlib.contextmanager
def reported_read(folder: str | os.PathLike):
  """Around a read of the checkpoint in `folder` whose failure the caller reports (damaged: set
  aside with a warning; another config's, or unreadable: an error).

  orbax reads a checkpoint's arrays as many asyncio tasks and stops at the first that fails; the
  others fail on the same damage and, when the event loop or the garbage collector drops them,
  asyncio logs each one ("Task exception was never retrieved", "Future exception was never
  retrieved", with a traceback), at a time that depends on the scheduling: during the read, or
  seconds later in another stage. From the start of the read `quiet_fault_echoes`' filter drops
  the records that quote `folder` (an echo can come before the failure reaches this frame); after
  a read that succeeds it stops, after one that fails it goes on.
  """
  key = os.path.join(os.path.abspath(os.fspath(folder)), "")
  failed_before = key in _failed_reads
  _failed_reads.add(key)
  yield  # a failed read raises here, and the folder stays in the set
  if not failed_before:
    _failed_reads.discard(key)


def _quotes_failed_read(*texts: str) -> bool:
  return any(folder in text for folder in tuple(_failed_reads) for text in texts)


class _DropFaultRecords(logging.Filter):
  """Drops log records that carry (or only quote) a storage fault, or the read error of a damaged
  checkpoint already reported: orbax's and asyncio's echoes."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None and record.levelno < logging.ERROR:
      return True
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-exception-caught
      message = ""
    if _quotes_failed_read(message, str(exc) if exc is not None else ""):
      return False
    return os_fault(exc if exc is not None else Exception(message)) is None


def quiet_fault_echoes(warn=None) -> None:
  """Silences the background threads' own reports of a storage fault (see the module docstring).

  `warn(message)` is told once when a background thread dies of one (e.g. TensorBoard logging
  stopped), since nothing else would say so until the next write in the main thread fails.
  Installed once per process, by `mdjax.main` (a library does not change global hooks).
  """
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_DropFaultRecords())

  previous_unraisable = sys.unraisablehook

  def unraisable(info):
    exc = info.exc_value
    if os_fault(exc) is not None or _quotes_failed_read(str(exc)):
      return
    # tensorstore completing a write whose asyncio loop orbax already closed after a failure.
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    # The abandoned writes of a reported fault, failing again as the interpreter shuts down.
    if _reported.is_set() and sys.is_finalizing():
      return
    previous_unraisable(info)

  sys.unraisablehook = unraisable

  previous_thread_hook = threading.excepthook
  told = []

  def thread_hook(args):
    fault = os_fault(args.exc_value)
    if fault is None:
      previous_thread_hook(args)
    elif warn is not None and not told:
      told.append(True)
      warn(f"a background writer ({args.thread.name if args.thread else 'thread'}) stopped: "
           f"{FRIENDLY[fault.errno]} ({fault.filename or fault.strerror}).")

  threading.excepthook = thread_hook
