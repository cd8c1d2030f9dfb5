"""The launchers: launch/slurm.sbatch (dry run under a stand-in srun fed a fake SLURM job), the
arguments every process passes to jax.distributed.initialize, and launch/local.sh stopping every
process as soon as one fails."""

from __future__ import annotations

import inspect
import os
import re
import stat
import subprocess
import sys
import time

import jax
import pytest

from mdjax import main as main_lib
from mdjax.core import distributed
from mdjax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for srun with SLURM's documented behaviour for this job shape: tasks laid out in
# blocks over the nodes (task i on node i // tasks_per_node, local id i % tasks_per_node), each
# task seeing every GPU of its node under --gpu-bind=none, only its own one otherwise.
FAKE_SRUN = r'''#!{python}
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SRUN_LOG"], "w") as fh:
    fh.write("\n".join(args))
n = next(i for i, a in enumerate(args) if not a.startswith("--"))
options, command = args[:n], args[n:]
nodes = os.environ["FAKE_HOSTS"].split(",")
per_node, gpus = int(os.environ["SLURM_NTASKS_PER_NODE"]), int(os.environ["SLURM_GPUS_PER_NODE"])
total = per_node * len(nodes)
status = 0
for i in range(total):
    local = i % per_node
    visible = range(gpus) if "--gpu-bind=none" in options else [local]
    env = dict(os.environ, SLURM_NTASKS=str(total), SLURM_PROCID=str(i), SLURM_LOCALID=str(local),
               SLURM_NODEID=str(i // per_node), SLURMD_NODENAME=nodes[i // per_node],
               SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"],
               CUDA_VISIBLE_DEVICES=",".join(map(str, visible)))
    status = subprocess.run(command, env=env).returncode or status
sys.exit(status)
'''


def executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def sbatch_options() -> dict[str, str]:
  lines = open(os.path.join(REPO, "launch", "slurm.sbatch")).read().splitlines()
  return dict(re.match(r"#SBATCH --([\w-]+)=(\S+)", line).groups() for line in lines
              if line.startswith("#SBATCH"))


def test_sbatch_asks_gpus_per_node_one_task_each():
  options = sbatch_options()
  assert options["gpus-per-node"] == options["ntasks-per-node"] == "8"
  assert "gpus-per-task" not in options and "gres" not in options


@pytest.mark.parametrize("nodes", [1, 2])
def test_slurm_dry_run_prints_each_task_command_and_environment(tmp_path, nodes):
  """1 node x 8 GPUs and 2 nodes x 8 GPUs, as `sbatch [--nodes=2] launch/slurm.sbatch` runs."""
  hosts = [f"gpu{n:03d}" for n in range(7, 7 + nodes)]
  executable(tmp_path / "srun", FAKE_SRUN.replace("{python}", sys.executable))
  env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
         "PYTHON": sys.executable, "MDJAX_DRY_RUN": "1", "FAKE_SRUN_LOG": str(tmp_path / "log"),
         "FAKE_HOSTS": ",".join(hosts), "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(nodes),
         "SLURM_JOB_NODELIST": "gpu007" if nodes == 1 else "gpu[007-008]",
         "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "8"}
  args = ["--config=configs/cars.py", "--workdir=/shared/runs/cars"]
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "log").read_text().split("\n")[:2] == ["--kill-on-bad-exit=1",
                                                           "--gpu-bind=none"]
  lines = [l for l in result.stdout.splitlines() if l.startswith("mdjax: dry run:")]
  assert len(lines) == 8 * nodes
  port = 61440 + 4242 % 4096  # the coordinator port every task derives from the job id
  for i, line in enumerate(lines):
    assert (f"process {i} of {8 * nodes} on {hosts[i // 8]}: "
            "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 ") in line, line
    assert (f"jax.distributed.initialize(coordinator_address='gpu007:{port}', "
            f"num_processes={8 * nodes}, process_id={i}, local_device_ids=[{i % 8}])") in line
    assert line.endswith(f"command: {sys.executable} -m mdjax.main {' '.join(args)}"), line


def slurm_env(**overrides):
  env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
         "SLURM_JOB_NODELIST": "node[03-04]", "SLURM_JOB_ID": "7",
         "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  return {**env, **overrides}


def test_slurm_task_arguments():
  assert distributed.slurm_task(slurm_env()) == distributed.Setup("node03:61447", 16, 11, (3,))
  # A site that binds one GPU per task anyway: that GPU is the task's device 0.
  assert distributed.slurm_task(slurm_env(CUDA_VISIBLE_DEVICES="3")).local_device_ids == (0,)
  assert distributed.slurm_task(slurm_env(MDJAX_PORT="1234")).coordinator_address == "node03:1234"
  assert distributed.slurm_task(slurm_env(SLURM_NTASKS="1")) is None  # one process: no init
  assert distributed.slurm_task({}) is None
  with pytest.raises(UserError, match="one task per GPU"):
    distributed.slurm_task(slurm_env(SLURM_LOCALID="5", CUDA_VISIBLE_DEVICES="0,1,2,3"))
  assert distributed.first_host("gpu[003-004,007],gpu010") == "gpu003"
  assert distributed.first_host("a1,b2") == "a1"


def test_init_distributed_passes_the_launchers_arguments(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  main_lib.init_distributed(distributed.slurm_task(slurm_env()))
  main_lib.init_distributed(None)  # a single process joins nothing
  assert calls == [{"coordinator_address": "node03:61447", "num_processes": 16, "process_id": 11,
                    "local_device_ids": [3], "cluster_detection_method": "deactivate"}]
  # The names are those of the installed jax's own signature.
  from jax._src import distributed as jax_distributed  # the real function, not the stand-in
  inspect.signature(jax_distributed.initialize).bind(**calls[0])


FAKE_PYTHON = r'''#!/usr/bin/env bash
# A stand-in for python in launch/local.sh: process 1 fails after a moment, the others would run
# for a minute.
for a in "$@"; do case $a in --process_id=*) id=${a#--process_id=};; esac; done
echo "$$ $*" > "DIR/process_$id"
if [[ $id == FAILING ]]; then sleep 0.5; exit 3; fi
exec sleep SECONDS
'''


def run_local(tmp_path, failing: int, sleep: int):
  fake = executable(tmp_path / "python", FAKE_PYTHON.replace("DIR", str(tmp_path))
                    .replace("FAILING", str(failing)).replace("SECONDS", str(sleep)))
  start = time.monotonic()
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "3", "--config=x"],
                          env={**os.environ, "PYTHON": str(fake), "MDJAX_PORT": "23456"},
                          capture_output=True, text=True, timeout=120)
  records = [(tmp_path / f"process_{i}").read_text().split() for i in range(3)]
  return result, time.monotonic() - start, records


def test_local_sh_stops_every_process_when_one_fails(tmp_path):
  result, seconds, records = run_local(tmp_path, failing=1, sleep=60)
  assert result.returncode == 3 and "stopping the others" in result.stderr
  assert seconds < 20  # not the 60 s the others would have run
  for pid, *_ in records:
    with pytest.raises(ProcessLookupError):
      os.kill(int(pid), 0)  # stopped, not left running
  assert records[2][1:] == ["-m", "mdjax.main", "--coordinator_address=127.0.0.1:23456",
                            "--num_processes=3", "--process_id=2", "--config=x"]


def test_local_sh_exits_zero_when_all_succeed(tmp_path):
  result, _, _ = run_local(tmp_path, failing=-1, sleep=0)
  assert result.returncode == 0, result.stderr
