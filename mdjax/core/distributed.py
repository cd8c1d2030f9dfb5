"""What each process of a multi-process run passes to `jax.distributed.initialize`.

Two launchers start the processes (see launch/):

* launch/local.sh passes `--coordinator_address`, `--num_processes` and `--process_id` to
  mdjax.main and gives process i one GPU (CUDA_VISIBLE_DEVICES=i).
* launch/slurm.sbatch asks SLURM for whole nodes' GPUs (`--gpus-per-node`) and one task per GPU
  (`--ntasks-per-node`), started by `srun --gpu-bind=none`, so every task on a node sees all of
  that node's GPUs and task SLURM_LOCALID takes GPU SLURM_LOCALID: local_device_ids =
  [SLURM_LOCALID]. That is also what JAX's own SLURM detection assumes, which is why the old
  `--gpus-per-task=1` request failed: each task then sees only its own GPU, renumbered 0, and
  every local rank but 0 asks for a device it does not have (jax-ml/jax issues 23452, 28194).
  Should a site bind one GPU to each task anyway (CUDA_VISIBLE_DEVICES holds a single GPU), that
  GPU is device 0 of the task: local_device_ids = [0].

`slurm_task` reads a task's SLURM environment and returns all four arguments, so JAX's own cluster
detection is never consulted and what runs is exactly what `describe` prints in a dry run.

Written here rather than taken from jax._src.clusters (private): the first host of a SLURM node
list ("gpu[003-004,007],gpu010" -> "gpu003") and the coordinator port follow the same scheme.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from mdjax.errors import UserError

# The coordinator's port where MDJAX_PORT does not set one: JAX's SLURM scheme, a port in the
# ephemeral range [61440, 65535] derived from the job id, so every task of a job agrees on it.
_PORT_BASE, _PORT_SPAN = 65536 - 4096, 4096


@dataclasses.dataclass(frozen=True)
class Setup:
  """The arguments of `jax.distributed.initialize` for one process."""
  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None = None

  def kwargs(self) -> dict:
    out = dataclasses.asdict(self)
    if self.local_device_ids is not None:
      out["local_device_ids"] = list(self.local_device_ids)
    return out


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: "node[01-04,07],gpu1" -> "node01"."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += ch == "["
    depth -= ch == "]"
    if ch == "," and depth == 0:
      end = i
      break
  first = nodelist[:end].strip()
  if "[" not in first:
    return first
  prefix, rest = first.split("[", 1)
  ranges, suffix = rest.split("]", 1)
  return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except (KeyError, ValueError):
    raise UserError(f"${name}={env.get(name)!r} in a SLURM task's environment; expected an "
                    "integer. Start mdjax with srun (launch/slurm.sbatch).") from None


def slurm_task(env: Mapping[str, str]) -> Setup | None:
  """The Setup of this SLURM task, or None outside a multi-task SLURM step (one process)."""
  if int(env.get("SLURM_NTASKS", "1") or 1) <= 1 or "SLURM_PROCID" not in env:
    return None
  nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or \
      env.get("SLURM_NODELIST")
  if not nodelist:
    raise UserError("a SLURM task without $SLURM_JOB_NODELIST: cannot find the coordinator host. "
                    "Start mdjax with srun (launch/slurm.sbatch).")
  port = env.get("MDJAX_PORT") or str(_PORT_BASE + _int(env, "SLURM_JOB_ID") % _PORT_SPAN)
  local = _int(env, "SLURM_LOCALID")
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if len(visible) == 1:
    device = 0  # SLURM bound this task to one GPU: inside the task it is device 0
  elif visible and local >= len(visible):
    raise UserError(
        f"SLURM task {env.get('SLURM_PROCID')} is local task {local} of its node but sees "
        f"{len(visible)} GPUs (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}): start at most "
        "one task per GPU (--ntasks-per-node equal to --gpus-per-node, launch/slurm.sbatch).")
  else:
    device = local
  return Setup(coordinator_address=f"{first_host(nodelist)}:{port}",
               num_processes=_int(env, "SLURM_NTASKS"), process_id=_int(env, "SLURM_PROCID"),
               local_device_ids=(device,))


def describe(setup: Setup | None, env: Mapping[str, str], command: Sequence[str]) -> str:
  """One line: what this process would run, with the environment it would run in (dry run)."""
  host = env.get("SLURMD_NODENAME") or os.uname().nodename
  visible = env.get("CUDA_VISIBLE_DEVICES", "<unset: every GPU>")
  where = (f"process {setup.process_id} of {setup.num_processes} on {host}" if setup else
           f"single process on {host}")
  init = (", ".join(f"{k}={v!r}" for k, v in setup.kwargs().items()) if setup else "not called")
  return (f"mdjax: dry run: {where}: CUDA_VISIBLE_DEVICES={visible} "
          f"jax.distributed.initialize({init}) command: {' '.join(command)}")
