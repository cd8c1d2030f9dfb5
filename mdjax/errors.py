"""Errors a user can act on.

A `UserError` is a mistake in the user's input (config, data, workdir): `mdjax.main` prints its
message on one line and exits with status 2, without a traceback. Everything else is a bug and
keeps its traceback.
"""


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


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss."""
