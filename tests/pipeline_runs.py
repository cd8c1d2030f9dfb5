"""Whole `mdjax.main` runs for the tests, and the one uninterrupted reference run they share.

tests/test_run_pipeline.py (kill -9 in every stage) and tests/test_faults.py (fault injection)
both resume runs of the same small config and compare them with one uninterrupted run of it.
That run is made once per test session, whichever test asks first, and shared by the pytest-xdist
workers through a file lock (`smoke_reference`): on 2 cores a second copy would cost minutes.
Tests read it and copy from it; none may write into it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "pipeline_worker.py")
# The smallest whole run that still has every stage: the smoke config with 2 weak classes and one
# training epoch (1-3 min on a quiet 2-core machine). Its judge is the digits' SVC on 8x8 pixels.
SMOKE_RUN = ["--config=configs/default.py:smoke", "--config.mistake.nwpc=2",
             "--config.train.epochs=1"]


def worker_env(**extra) -> dict:
  env = dict(os.environ)  # conftest's JAX_COMPILATION_CACHE_DIR: later runs load their programs
  env.pop("JAX_NUM_CPU_DEVICES", None)  # a run uses the one CPU device, as a user's does
  env.update(extra)
  return env


# The limit only catches a hang: on a machine shared with other jobs a run was measured at over
# 15 min.
def run_worker(faults: str, workdir, *flags, timeout: int = 2400, **env):
  """`python tests/pipeline_worker.py FAULTS -- <SMOKE_RUN> --workdir=W <flags>` (see that file)."""
  return subprocess.run([sys.executable, WORKER, faults, "--", *SMOKE_RUN, f"--workdir={workdir}",
                         *flags], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=worker_env(**env))


def log(result) -> str:
  return (f"rc={result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
          f"--- stderr\n{result.stderr[-5000:]}")


def shared_reference(root) -> tuple[str, str]:
  """(workdir, stdout) of the uninterrupted SMOKE_RUN under `root`, made by the first caller.

  `root` is a folder every xdist worker of the session sees; the lock makes the others wait for
  the run instead of repeating it. A failed run is not cached: the next caller tries again.
  """
  workdir = os.path.join(root, "smoke_reference")
  done = os.path.join(root, "smoke_reference.stdout")
  with open(os.path.join(root, "smoke_reference.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(done):
      if os.path.exists(workdir):
        shutil.rmtree(workdir)  # a failed attempt of another worker: start over
      result = run_worker("none", workdir)
      assert result.returncode == 0, log(result)
      with open(done + ".tmp", "w") as fh:
        fh.write(result.stdout)
      os.replace(done + ".tmp", done)
  with open(done) as fh:
    return workdir, fh.read()
