#!/usr/bin/env bash
# Runs mdjax as N processes on this machine, one per GPU (or N CPU processes for testing), joined
# with jax.distributed over localhost. Arguments after the count go to mdjax.main.
#
#   launch/local.sh 4 --config=configs/cars.py --workdir=runs/cars
#
# Each process sees one GPU (CUDA_VISIBLE_DEVICES=i); the global batch (train.batch_size) is split
# over all devices of all processes, so it must be a multiple of the device count. $PYTHON chooses
# the interpreter (default: python), $MDJAX_PORT the coordinator's port (default: a random one).
#
# CPU processes round like a one-process run of D CPU devices when both run with NPROC=D exported
# (XLA sizes its CPU thread pool by it; README, "Several GPUs or hosts").
#
# The processes wait for each other at every collective, so one that fails would leave the others
# waiting forever: as soon as any process exits with an error, the others are stopped and the
# script exits with that process's status. Ctrl-C stops them all.
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES [mdjax.main flags...]}
shift
port=${MDJAX_PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}
pids=()
stop_all() { kill "${pids[@]}" 2>/dev/null || true; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  if command -v nvidia-smi >/dev/null 2>&1; then export CUDA_VISIBLE_DEVICES=$i; fi
  "$python" -m mdjax.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for ((left = n; left > 0; left--)); do
  # wait -n returns as soon as any one process ends, with its exit status.
  wait -n && continue
  status=$?
  echo "launch/local.sh: a process exited with status $status; stopping the others." >&2
  stop_all
  wait || true
  break
done
exit "$status"
