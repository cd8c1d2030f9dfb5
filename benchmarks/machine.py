"""The machine a benchmark ran on, and its measured matmul peak (the denominator of FLOP fractions).

    python benchmarks/machine.py [--n 2048] [--reps 10]

Prints the CPU model, the accelerator kind and count, the process count, the versions of the
numerical stack, and the float32 FLOP/s of a large `jnp.matmul` (n x n by n x n), the best of
`--reps` timed calls after a warm-up call. The FLOP count is XLA's own cost analysis of that
matmul (2 n^3), the same analysis the benchmarks apply to their steps, so a step's FLOP fraction
compares like with like. The peak is measured rather than taken from a data sheet: on a shared CPU
it is what XLA's matmul reaches now, with the threads it gets now. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "grain", "orbax-checkpoint", "torch",
               "jax-cuda12-plugin"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def flops_of(compiled) -> float:
  """Floating-point operations of one call of a compiled XLA program (XLA's cost analysis).

  Per device for a program partitioned over several devices. A `while` loop's body (lax.map,
  lax.scan) is counted once, not once per iteration.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


def median_time(fn, steps: int, warmup: int = 2) -> tuple[float, float]:
  """(first call, compile included; median of `steps` later calls) of `fn()` in seconds, after
  `warmup` calls in all."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def loop_free_flops(twin, *args) -> float:
  """Floating-point operations of one call of `twin(*args)`: the program to count, built with
  XLA's own convolutions (mdjax.core.cpu_conv.Rules left out: `make_train_step(...,
  fast_conv_grads=False)`, a GANSpec with `fast_convs=False`).

  Why a twin: on CPU, mdjax computes convolution weight gradients in a loop over chunks of the
  batch, whose body XLA's cost analysis counts once (a WRN-16-4 b128 step read 207 GFLOP against
  its twin's 276). XLA's own gradients do the same multiply-adds with no loop, and without the
  extra additions of mdjax's col2im, so the twin's count is the step's work. The twin is only
  lowered: the analysis of the unoptimised program was within 1% of the compiled one's
  (benchmarks/RESULTS.md).
  """
  import jax  # pylint: disable=import-outside-toplevel
  return lowered_flops(jax.jit(lambda *a: twin(*a)).lower(*args))  # pylint: disable=unnecessary-lambda


def lowered_flops(lowered) -> float:
  """Floating-point operations of a lowered (not compiled) program, by XLA's cost analysis."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


def measure_peak(n: int, reps: int, dtype: str = "float32") -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  flops = flops_of(compiled)
  compiled(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    compiled(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  best = min(times)
  return {"matmul_n": n, "dtype": dtype, "flops": flops, "best_s": best,
          "median_s": sorted(times)[len(times) // 2], "flops_per_s": flops / best}


def machine_info() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "process_count": jax.process_count(), "cpu_model": cpu_model(),
          "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
          "hostname": platform.node(), "os": platform.platform(), "versions": versions()}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=0, help="matmul size (default: 2048 on CPU, 8192 else)")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--bf16", action="store_true", help="also the bfloat16 matmul peak")
  args = p.parse_args()
  info = machine_info()
  n = args.n or (2048 if info["platform"] == "cpu" else 8192)
  info["peak"] = measure_peak(n, args.reps)
  if args.bf16:
    info["peak_bfloat16"] = measure_peak(n, args.reps, "bfloat16")
    print(f"bfloat16 matmul {n}x{n} peak {info['peak_bfloat16']['flops_per_s'] / 1e9:.1f} "
          "GFLOP/s", flush=True)
  print(f"{info['device_kind']} x{info['device_count']} ({info['cpu_model']}, "
        f"{info['cpu_count']} CPUs): float32 matmul {n}x{n} peak "
        f"{info['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
  print(json.dumps(info))
  return 0


if __name__ == "__main__":
  sys.exit(main())
