"""Errors a user can act on.

A `UserError` is a mistake in the user's input (config, data, workdir) or a problem of the machine
the user can fix (a full disk, a workdir another run is using): `mdjax.main` prints its message on
one line and exits with the error's `exit_code` (2 unless a subclass says otherwise), without a
traceback. Everything else is a bug and keeps its traceback.
"""

import os


class UserError(Exception):
  """A problem the user can fix; the message says what was wrong and what to do."""

  exit_code = 2


class ConfigError(UserError):
  """A config key has a value mdjax cannot use."""

  def __init__(self, key: str, value, allowed: str):
    self.key, self.value, self.allowed = key, value, allowed
    super().__init__(f"config.{key}={value!r} is not valid: expected {allowed}.")


class UnknownConfigKeyError(UserError):
  """A key `mdjax.config.base_config()` does not define was set (a typo): configs are locked."""

  def __init__(self, key: str, where: str, suggestion: str | None = None):
    self.key, self.where, self.suggestion = key, where, suggestion
    hint = f"; did you mean {suggestion!r}?" if suggestion else "."
    super().__init__(f"unknown config key {key!r} {where}{hint} Every key is one that "
                     "mdjax/config.py:base_config() defines (a misspelt one would otherwise be "
                     "ignored silently).")


class DataError(UserError):
  """Data is missing, unreadable or laid out in a way mdjax does not understand."""


class StorageError(UserError):
  """A write (or read) in the workdir failed: a full disk, a quota, a permission, a read-only file
  system. Nothing finished is lost; once the cause is fixed the same command resumes. Exit status
  EX_IOERR (74, sysexits.h), so a script can tell it from a mistake in the command (2)."""

  exit_code = os.EX_IOERR


class WorkdirBusyError(UserError):
  """Another run holds the workdir's lock. Exit status EX_TEMPFAIL (75, sysexits.h): try again
  when that run has finished."""

  exit_code = os.EX_TEMPFAIL


class RecoveryWarning(RuntimeWarning):
  """mdjax recovered from a fault by itself (a damaged checkpoint set aside, a NaN restored from
  the last good checkpoint); the message says what it did. `mdjax.main` prints it on one line as
  "mdjax: warning: ..."."""


class QualityWarning(UserWarning):
  """The run went on, but something it made looks wrong (e.g. a GAN's images collapsed onto a
  few); the message says what and what to try. Printed like RecoveryWarning."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss."""
