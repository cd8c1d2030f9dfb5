#!/usr/bin/env bash
# Runs mdjax as N processes on this machine, one per GPU (or N CPU processes for testing), joined
# with jax.distributed over localhost. Arguments after the count go to mdjax.main.
#
#   launch/local.sh 4 --config=configs/cars.py --workdir=runs/cars
#
# Each process sees one GPU (CUDA_VISIBLE_DEVICES=i); the global batch (train.batch_size) is split
# over all devices of all processes, so it must be a multiple of the device count.
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES [mdjax.main flags...]}
shift
port=${MDJAX_PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  if command -v nvidia-smi >/dev/null 2>&1; then export CUDA_VISIBLE_DEVICES=$i; fi
  "$python" -m mdjax.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
