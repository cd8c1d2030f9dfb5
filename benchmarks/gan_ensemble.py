"""One compiled program for K class GANs vs K separately compiled single-class steps.

    python benchmarks/gan_ensemble.py --classes 5 --resolution 32 [--steps 5] [--strategy auto]
        [--ngf 64 --ndf 64 --nz 256 --batch-size 8 --devices 1]

First checks equivalence: from the same initial states and seeds, `--check-steps` steps of the
one-program ensemble (mdjax.gan.program.make_ensemble_step) and of K separate jitted single-class
steps (program.class_step, exactly what a one-class training runs) must give the same parameters
(max_abs_diff over every leaf of every class's GAN state, Adam moments included). Then times both
on the same process, interleaved (one ensemble step, then the K separate steps, repeated
`--steps` times; medians), so load from other processes on a shared machine hits both alike.
Both sides donate their states. The separate side calls one compiled single-class program K times
per step (the classes' images padded to one shape; K real trainings would compile K same-shaped
programs, which changes compile time only). Compile time is that of `lower().compile()` of each.

`--profile DIR` then traces 3 more steps of each side with `jax.profiler.trace` (DIR/one_program,
DIR/separate; open them in Perfetto or XProf) and adds a summary per side under "profile":
op_s_per_step, the time XLA's worker threads spend inside HLO ops per step (summed over threads),
and mean_busy_threads = op time / wall time. On the 2-core CPU that tells whether one program could
gain by overlapping the classes' ops: it can only win time where the separate steps leave a core
idle.
Each op counts once, on the thread that runs it: work it hands to the other thread (YNNPACK's own
parallel loops inside matmul fusions) is not traced, so mean_busy_threads is a lower bound.

FLOPs: XLA's cost analysis of the single-class step (its loop-free twin, machine.loop_free_flops),
times K, is the work of one step of either side (`flops_per_step`); each side's FLOP/s divides it by its step time. The one program's
own analysis is not used: a `lax.map` loop ("map") is counted once, not K times, and "per_class"
(the single-CPU-device default) compiles one class's program (kept as `xla_flops_one_program` for
reference). With "per_class", "one program" is that single-class program run once per class from
the host, each class's state in buffers of its own (mdjax.gan.program).

The LAST line printed is a JSON object: classes, resolution, strategy, ngf, ndf, nz, batch_size,
devices, one_program_s_per_step, separate_s_per_step, speedup (separate / one_program),
max_abs_diff, compile_one_program_s, compile_separate_s, flops_per_step,
one_program_flops_per_s, separate_flops_per_s (and "profile" with --profile).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mdjax.gan.program import ENSEMBLES

from machine import flops_of, loop_free_flops  # benchmarks/ is on sys.path when a script in it runs


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--classes", type=int, default=5)
  p.add_argument("--resolution", type=int, default=32)
  p.add_argument("--steps", type=int, default=5, help="timed steps (after compilation)")
  p.add_argument("--check-steps", type=int, default=2, help="steps of the equivalence check")
  p.add_argument("--strategy", default="auto", choices=ENSEMBLES)
  p.add_argument("--ngf", type=int, default=None, help="default: config.gan.ngf (64)")
  p.add_argument("--ndf", type=int, default=None, help="default: config.gan.ndf (64)")
  p.add_argument("--nz", type=int, default=None, help="default: config.gan.nz (256)")
  p.add_argument("--batch-size", type=int, default=None, help="default: config.gan.batch_size (8)")
  p.add_argument("--devices", type=int, default=1, help="CPU devices for the class mesh")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="the GANs' computation dtype (gan.dtype)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--profile", metavar="DIR", default=None,
                 help="also trace 3 steps of each side into DIR and summarise thread use")
  return p.parse_args()


def _profile(run, out_dir: pathlib.Path, steps: int = 3) -> dict:
  """Traces `steps` calls of `run()` and sums the HLO ops XLA's CPU worker threads executed.

  jax.profiler.ProfileData reads the trace; the worker threads are the "XLAEigen" lines. Their
  "ThunkExecutor" / thread-pool events wrap the ops, so they are left out of the sum.
  """
  with jax.profiler.trace(str(out_dir)):
    t0 = time.perf_counter()  # inside the trace: starting and stopping the profiler take seconds
    for _ in range(steps):
      run()
    wall = (time.perf_counter() - t0) / steps
  (xplane,) = out_dir.glob("plugins/profile/*/*.xplane.pb")
  by_kind = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes:
    for line in plane.lines:
      if "XLAEigen" in line.name:
        for e in line.events:
          if not e.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
            by_kind[re.sub(r"[.\d]+$", "", e.name)] += e.duration_ns
  op_s = sum(by_kind.values()) / 1e9 / steps
  return {"wall_s_per_step": round(wall, 4), "op_s_per_step": round(op_s, 4),
          "mean_busy_threads": round(op_s / wall, 2),
          # The HLO op kinds (names without their numbers) that took the most time, s per step.
          "top_ops": {k: round(v / 1e9 / steps, 4) for k, v in by_kind.most_common(8)}}


def main():
  args = _parse()
  if args.devices > 1:
    jax.config.update("jax_num_cpu_devices", args.devices)
  from mdjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mdjax.core import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from mdjax.gan import chunks, class_data, program  # pylint: disable=import-outside-toplevel

  cfg = config_lib.base_config().gan
  cfg.resolution = args.resolution
  cfg.ensemble = args.strategy
  cfg.dtype = args.dtype
  for key, value in (("ngf", args.ngf), ("ndf", args.ndf), ("nz", args.nz),
                     ("batch_size", args.batch_size)):
    if value is not None:
      cfg[key] = value
  k, r, b = args.classes, cfg.resolution, cfg.batch_size
  mesh = mesh_lib.class_mesh(jax.devices()[:args.devices])
  strategy = program.resolve_strategy(cfg.ensemble, mesh.devices.flat[0].platform)
  fns = program.default_gan_fns(cfg)
  print(f"K={k} R={r} strategy={strategy} ngf={cfg.ngf} ndf={cfg.ndf} nz={cfg.nz} batch={b} "
        f"devices={mesh.size} backend={jax.default_backend()} cpus={os.cpu_count()}", flush=True)

  # Classes of different sizes, as weak classes are.
  rng = np.random.default_rng(args.seed)
  images = [rng.integers(0, 256, (20 + 7 * i, r, r, 3), dtype=np.uint8) for i in range(k)]
  classes = list(range(k))

  # --- one program -------------------------------------------------------------------------------
  padded = classes + [classes[-1]] * (-k % mesh.size)
  sharding = mesh_lib.class_sharding(mesh)
  data, counts = class_data.stack_class_images([images[c] for c in padded])
  data, counts = jax.device_put((data, counts), sharding)
  ens = chunks.init_ensemble(fns, args.seed, padded, mesh)
  one_step = program.make_ensemble_step(fns, batch_size=b, strategy=strategy, mesh=mesh)

  # --- K separate programs (each class its own jitted step, as a one-class training) ------------
  single = jax.jit(functools.partial(program.class_step, fns, batch_size=b), donate_argnums=0)
  sep_states, sep_rngs, sep_data = [], [], []
  for c in classes:
    init_key, stream = chunks.class_keys(args.seed, c)
    sep_states.append(jax.jit(fns.init)(init_key))
    sep_rngs.append(stream)
    # Padded to the common capacity so the K classes share ONE compiled single-class program
    # (K trainings would compile K identical-size programs; only compile time would differ, and
    # batches do not depend on the padding: class_data.batch_indices).
    padded_images = np.zeros((max(len(x) for x in images), r, r, 3), np.uint8)
    padded_images[:len(images[c])] = images[c]
    sep_data.append((jnp.asarray(padded_images), jnp.int32(len(images[c]))))

  # Compiled explicitly, so the executables timed below are the ones cost-analysed.
  t0 = time.perf_counter()
  if strategy == program.PER_CLASS:
    # The host runs the one compiled single-class program per class: it is what compiles (once;
    # the jitted step compiles it again at its first call, in the equivalence check, untimed).
    ens = program.per_class_layout(ens)
    compiled_one = one_step.class_program.lower(
        ens["gan"][0], ens["rng"], data, counts, jnp.int32(0), jnp.int32(0)).compile()
  else:
    one_step = compiled_one = one_step.lower(ens, data, counts, jnp.int32(0)).compile()
  compile_one = time.perf_counter() - t0
  t0 = time.perf_counter()
  single = single.lower(sep_states[0], sep_rngs[0], *sep_data[0], jnp.int32(0)).compile()
  compile_sep = time.perf_counter() - t0
  from mdjax.gan import step as step_lib  # pylint: disable=import-outside-toplevel
  twin = step_lib.make_gan_fns(dataclasses.replace(step_lib.GANSpec.from_config(cfg),
                                                   fast_convs=False))
  class_flops = loop_free_flops(functools.partial(program.class_step, twin, batch_size=b),
                                sep_states[0], sep_rngs[0], *sep_data[0], jnp.int32(0))

  def run_one(ens, s):
    ens, m = one_step(ens, data, counts, jnp.int32(s))
    jax.block_until_ready(ens)
    return ens

  def run_separate(states, s):
    out = []
    for c in classes:
      st, _ = single(states[c], sep_rngs[c], *sep_data[c], jnp.int32(s))
      out.append(st)
    jax.block_until_ready(out)
    return out

  for s in range(args.check_steps):
    ens = run_one(ens, s)
    sep_states = run_separate(sep_states, s)

  max_diff = 0.0
  for c in classes:
    a = jax.device_get(program.unstack_class(ens, c))
    bb = jax.device_get(sep_states[c])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(bb)):
      if np.issubdtype(np.asarray(x).dtype, np.inexact):
        max_diff = max(max_diff, float(np.max(np.abs(np.asarray(x, np.float64) - y))))
  print(f"equivalence after {args.check_steps} steps: max |one program - separate| = "
        f"{max_diff:.3g}", flush=True)

  t_one, t_sep = [], []
  for i in range(args.steps):
    s = args.check_steps + i
    t0 = time.perf_counter()
    ens = run_one(ens, s)
    t_one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    sep_states = run_separate(sep_states, s)
    t_sep.append(time.perf_counter() - t0)
    print(f"step {s}: one program {t_one[-1]:.3f} s, separate {t_sep[-1]:.3f} s", flush=True)
  one, sep = statistics.median(t_one), statistics.median(t_sep)
  result = {
      "classes": k, "resolution": r, "strategy": strategy, "dtype": cfg.dtype, "ngf": cfg.ngf,
      "ndf": cfg.ndf,
      "nz": cfg.nz, "batch_size": b, "devices": mesh.size, "timed_steps": args.steps,
      "one_program_s_per_step": round(one, 4), "separate_s_per_step": round(sep, 4),
      "speedup": round(sep / one, 3), "max_abs_diff": max_diff,
      "compile_one_program_s": round(compile_one, 1),
      "compile_separate_s": round(compile_sep, 1),
      "flops_per_step": k * class_flops, "xla_flops_one_program": flops_of(compiled_one),
      "one_program_flops_per_s": k * class_flops / one,
      "separate_flops_per_s": k * class_flops / sep,
  }
  if args.profile:
    step = args.check_steps + args.steps

    # Both sides donate their states: each traced call continues from the previous result.
    def advance_one():
      nonlocal ens
      ens = run_one(ens, step)

    def advance_separate():
      nonlocal sep_states
      sep_states = run_separate(sep_states, step)

    profile = {}
    for name, advance in (("one_program", advance_one), ("separate", advance_separate)):
      profile[name] = _profile(advance, pathlib.Path(args.profile) / name)
      print(f"profile {name}: {profile[name]}", flush=True)
    result["profile"] = profile
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
