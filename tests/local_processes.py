"""One worker script run as several local JAX processes (jax.distributed over localhost).

The multi-process tests start `python tests/<worker> PORT INDEX OUT_DIR` once per process, each
process on this machine's CPU with its worker's own device count, and wait for all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline_runs import worker_env

HERE = os.path.dirname(os.path.abspath(__file__))


def run_processes(worker: str, port: int, out_dir, *, timeout: int, count: int = 2,
                  merge_stderr: bool = True) -> list[subprocess.CompletedProcess]:
  """Runs `tests/<worker>` as `count` processes and returns each one's result, in process order.

  A process still running after `timeout` seconds fails the test, and every process of the run is
  killed first (a hung peer would otherwise outlive the test, holding its port and cores).
  `merge_stderr` sends each process's stderr into its stdout (one log per process to assert on).
  """
  err = subprocess.STDOUT if merge_stderr else subprocess.PIPE
  args = [[sys.executable, os.path.join(HERE, worker), str(port), str(i), str(out_dir)]
          for i in range(count)]
  procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=err, text=True,
                            env=worker_env(JAX_PLATFORMS="cpu")) for a in args]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return [subprocess.CompletedProcess(a, p.returncode, out, err_text)
          for a, p, (out, err_text) in zip(args, procs, outs)]
