"""Runs mistake-driven training: `python -m mdjax.main --config=configs/cars.py --workdir=DIR`.

Flags:
  --config   a config file with `get_config(arg)`, optionally `:arg` (default configs/default.py);
             any key can be overridden: --config.train.epochs=3
  --workdir  where the run's stages write their outputs; rerunning resumes it. Default:
             runs/<config name>-<hash of the config>, so the same command resumes the same run.
  --coordinator_address, --num_processes, --process_id: a multi-process run (launch/local.sh); on
             SLURM (launch/slurm.sbatch) they come from the task's environment instead.

With MDJAX_DRY_RUN=1 in the environment nothing runs: the process prints one line with the command,
its CUDA_VISIBLE_DEVICES and the arguments it would pass to jax.distributed.initialize, and exits.

A mistake in the command line, the config or the data prints one line starting with
"mdjax: error:" and exits with status 2; so does a full disk or a permission problem anywhere in
the run (status 74), and a workdir another run is using (status 75). The traceback is kept for
bugs only. What mdjax recovered from by itself (a damaged checkpoint set aside, a NaN restored)
prints one line starting with "mdjax: warning:".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import traceback
import warnings

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from mdjax import config as config_lib
from mdjax.core import distributed, storage
from mdjax.errors import (QualityWarning, RecoveryWarning, StorageError, UnknownConfigKeyError,
                          UserError)

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _default_config_path() -> str:
  local = os.path.join("configs", "default.py")
  return local if os.path.exists(local) else os.path.join(_REPO_CONFIGS, "default.py")


_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>-<hash>).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (see launch/).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def _define_config_flag():
  # ml_collections reads sys.argv while the flag is defined (to register the overrides), so a bad
  # override already fails here: defining it inside parse_flags lets that become one clear line.
  return config_flags.DEFINE_config_file("config", _default_config_path(), "mdjax config file[:arg]",
                                         lock_config=True)


def fail(message: str, code: int = 2):
  print(f"mdjax: error: {message}", file=sys.stderr)
  sys.exit(code)


def warn(message: str) -> None:
  # Warnings come while a tqdm bar is drawn (a NaN restored mid-stage): tqdm.write clears the bar,
  # prints the line on a line of its own and redraws the bar below it.
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  tqdm.write(f"mdjax: warning: {message}", file=sys.stderr)
  sys.stderr.flush()


def _show_recovery_warnings() -> None:
  """Recovery and quality warnings as one "mdjax: warning:" line each (not Python's file:line form, which
  points into mdjax's code rather than at what happened); other warnings as Python shows them."""
  show = warnings.showwarning

  def showwarning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, (RecoveryWarning, QualityWarning)):
      warn(" ".join(str(message).split()))
    else:
      show(message, category, filename, lineno, file, line)

  warnings.showwarning = showwarning


def _config_file(argv: list[str]) -> str:
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  return spec.split(":", 1)[0] if spec else _default_config_path()


# ml_collections' refusal of a key on a locked config: 'Key "epoch" does not exist and cannot be
# added since the config is locked. Other fields present: "{'epochs': 20, ...}"'.
_LOCKED_KEY = re.compile(r'Key "([^"]+)" does not exist and cannot be added since the config is '
                         r'locked\. Other fields present: "\{(.*?)\}"', re.S)


def _section_with(fields: set[str]) -> str:
  """"train." for the section of base_config() holding exactly `fields`; "" for the root."""
  def sections(node, prefix):
    yield prefix, set(node.keys())
    for name, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        yield from sections(value, f"{prefix}{name}.")
  return next((prefix for prefix, keys in sections(config_lib.base_config(), "")
               if keys == fields), "")


def _unknown_key(argv: list[str], error: Exception) -> UnknownConfigKeyError | None:
  """Names an unknown key and where it was set: in the config file, or by a --config.KEY flag.

  The base config is locked, so ml_collections refuses the key where it is set, saying which key
  and which other fields its section holds (the section's dotted path follows from those). For a
  config file the traceback's entry in the file gives its line.
  """
  path = _config_file(argv)
  texts = [str(e).replace("\\'", "'") for e in _causes(error)]  # KeyError's repr escapes quotes
  refused = next((m for m in map(_LOCKED_KEY.search, texts) if m), None)
  in_file = [entry for entry in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(entry.filename) == os.path.abspath(path)]
  if in_file and refused:
    fields = set(re.findall(r"'([^']+)':", refused.group(2)))
    key = _section_with(fields) + refused.group(1)
    return UnknownConfigKeyError(key, f"(set in {path} line {in_file[-1].lineno}: "
                                 f"`{(in_file[-1].line or '').strip()}`)", config_lib.closest_key(key))
  known = config_lib.config_keys()
  for token in argv:
    key = token.split("=", 1)[0][len("--config."):]
    if token.startswith("--config.") and key not in known:
      return UnknownConfigKeyError(key, f"(from the flag {token})", config_lib.closest_key(key))
  return None


def _causes(error: BaseException):
  """`error` and the exceptions it was raised from (ml_collections wraps its KeyError)."""
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


def parse_flags(argv: list[str]):
  """absl flag parsing, with every user mistake turned into one line and exit status 2.

  Returns the remaining arguments and the config.
  """
  try:
    config_flag = _define_config_flag()
    rest = flags.FLAGS(argv)
    config = config_flag.value
    config.to_dict()  # a config file that failed to load raises only when first read
    return rest, config
  except UserError as e:
    fail(str(e))
  except flags.Error as e:
    fail(_one_line(e).replace("flag --", "--"))
  except (AttributeError, KeyError) as e:
    unknown = _unknown_key(argv, e)
    fail(str(unknown) if unknown else f"cannot load the config file ({_one_line(e)}); pass "
         "--config=PATH/TO/config.py[:arg]")
  except (OSError, SyntaxError, ImportError) as e:
    fail(f"cannot load the config file ({_one_line(e)}); pass --config=PATH/TO/config.py[:arg]")
  except (TypeError, ValueError) as e:
    fail(f"bad config override: {_one_line(e)}")


def config_name(argv: list[str]) -> str:
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "default")
  path, _, arg = spec.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem + (("-" + re.sub(r"[^A-Za-z0-9.=]+", "_", arg)) if arg else "")


def default_workdir(config, argv: list[str]) -> str:
  digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join("runs", f"{config_name(argv)}-{digest[:8]}")


def enable_compilation_cache() -> None:
  """Keeps compiled XLA programs across runs, so a resumed run does not compile again.

  The FastGAN ensemble step takes minutes to compile on a CPU; from the cache it loads in about a
  second. $JAX_COMPILATION_CACHE_DIR chooses the folder (jax reads it itself).

  Every program is kept, not only those that took jax's default 1 s to compile: a run compiles
  many small ones besides (stacking states, metrics, finite checks), which a resumed run would
  otherwise compile again; they halve the compile time of a resumed smoke run, for a few MB a
  config. $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS still sets the threshold.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.expanduser("~"), ".cache", "mdjax", "jax"))
  if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def distributed_setup(env) -> distributed.Setup | None:
  """This process's part of a multi-process run: from the flags (launch/local.sh), else from its
  SLURM task's environment (launch/slurm.sbatch); None for a single process."""
  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    if not _COORDINATOR.value or _PROCESS_ID.value is None:
      raise UserError("--num_processes > 1 needs --coordinator_address=HOST:PORT and --process_id "
                      "(launch/local.sh passes all three).")
    return distributed.Setup(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  return distributed.slurm_task(env)


def init_distributed(setup: distributed.Setup | None) -> None:
  """Joins the multi-process run `setup` describes (nothing for a single process)."""
  if setup is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  # Every argument comes from the launcher: JAX's own cluster detection, which would choose the
  # local devices by its own rule, is switched off.
  jax.distributed.initialize(**setup.kwargs(), cluster_detection_method="deactivate")
  from mdjax.core import process  # pylint: disable=g-import-not-at-top
  process.use_service_barriers()


def main() -> None:
  argv, config = parse_flags(sys.argv)
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; use --config=... and --workdir=...")
  logging.set_verbosity(logging.WARNING)
  _show_recovery_warnings()
  storage.quiet_fault_echoes(warn)
  try:
    setup = distributed_setup(os.environ)
    if os.environ.get("MDJAX_DRY_RUN", "") not in ("", "0"):
      print(distributed.describe(setup, os.environ, [sys.executable, "-m", "mdjax.main",
                                                     *sys.argv[1:]]), flush=True)
      return
    config_lib.validate(config)
    workdir = _WORKDIR.value or default_workdir(config, sys.argv)
    enable_compilation_cache()
    init_distributed(setup)
    # Imported here, not at the top, as JAX is everywhere below: `--help` and flag errors are
    # answered without starting JAX (config.validate imports its registries the same way).
    from mdjax.pipeline import run  # pylint: disable=g-import-not-at-top
    run.run(config, workdir)
  except UserError as e:
    if isinstance(e, StorageError):
      storage.mark_reported()
    fail(str(e), e.exit_code)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # A full disk or a permission problem outside the stages' own checks (data caches, ...).
    fault = storage.os_fault(e)
    if fault is None:
      raise
    storage.mark_reported()
    fail(str(storage.storage_error(fault)), StorageError.exit_code)
  except KeyboardInterrupt:
    print("\nmdjax: interrupted; finished stages and the last checkpoint are kept. "
          "Run the same command again to resume.", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  main()
