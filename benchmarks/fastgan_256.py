"""Seconds per FastGAN iteration (D + G + EMA) at 256x256, batch 8, ngf = ndf = 64, nz = 256.

    /work/venv/bin/python benchmarks/fastgan_256.py [--iters 3] [--parts] [--resolution 256]

The official PyTorch FastGAN (github.com/odegeasslbc/FastGAN-pytorch) is the yardstick: mdjax's
iteration should not be slower than its `train.py` iteration on the same CPU (with MSE in place of
its LPIPS reconstruction loss, as mdjax uses). This script times the jitted `gan_step` (median of
`--iters` runs after compiling), and with `--parts` also the pieces of it, each jitted on its own:
G forward, D forward on a real batch (with the decoders), D loss gradient, and G gradient through
D, so one can see where the time goes. The step's FLOPs are XLA's cost analysis of the compiled
step (`flops_per_step`, and `flops_per_s` at the median time). The last line is JSON with every
figure. The machine is
shared: run it when it is quiet, and read the spread (min / max) next to the median. What each
CPU change bought, step by step, is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from mdjax.config import base_config
from mdjax.gan import fastgan
from mdjax.gan import step as gan_step_lib

from machine import loop_free_flops  # benchmarks/ is on sys.path when a script in it runs


def timed(fn, *args, iters: int):
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return dict(compile_and_first_s=round(first, 2), median_s=round(statistics.median(times), 3),
              min_s=round(min(times), 3), max_s=round(max(times), 3))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--parts", action="store_true")
  args = p.parse_args()

  cfg = base_config().gan
  cfg.resolution, cfg.ngf, cfg.ndf, cfg.nz = args.resolution, args.width, args.width, 256
  fns = gan_step_lib.make_gan_fns(cfg)
  r, b = args.resolution, args.batch
  t = time.perf_counter()
  state = jax.jit(fns.init)(jax.random.key(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  real = jax.random.uniform(jax.random.key(1), (b, r, r, 3), minval=-1, maxval=1)
  n_g = sum(x.size for x in jax.tree.leaves(state.g_params))
  n_d = sum(x.size for x in jax.tree.leaves(state.d_params))
  print(f"FastGAN {r}x{r}, batch {b}, ngf=ndf={args.width}: G {n_g / 1e6:.2f} M params, "
        f"D {n_d / 1e6:.2f} M params; init {init_s:.1f} s; devices {jax.devices()}", flush=True)

  keys = iter(jax.random.split(jax.random.key(2), 100))
  keys_for_count = jax.random.key(3)
  # Compiled explicitly (its compile time is reported); FLOPs from the loop-free twin (machine.py).
  t = time.perf_counter()
  step = jax.jit(fns.step).lower(state, real, next(keys)).compile()
  compile_s = time.perf_counter() - t
  results = {"step": timed(lambda s, x: step(s, x, next(keys))[1], state, real, iters=args.iters)}
  results["step"]["compile_s"] = round(compile_s, 2)
  twin = gan_step_lib.make_gan_fns(dataclasses.replace(gan_step_lib.GANSpec.from_config(cfg),
                                                       fast_convs=False))
  flops = loop_free_flops(twin.step, state, real, keys_for_count)
  results["flops_per_step"] = flops
  results["flops_per_s"] = flops / results["step"]["median_s"]
  print(f"step: {results['step']}, {flops / 1e9:.1f} GFLOP = "
        f"{results['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)

  if args.parts:
    gen, disc = fastgan.build(r, args.width, args.width)
    small = fastgan.small_size(r)
    z = jax.random.normal(jax.random.key(3), (b, 256))
    g_vars = {"params": state.g_params, "batch_stats": state.g_stats}
    d_vars = {"params": state.d_params, "batch_stats": state.d_stats}
    real_small = fastgan.downscale(real, small)

    def g_fwd(gp):
      out, _ = gen.apply({**g_vars, "params": gp}, z, train=True, rngs={"noise": jax.random.key(4)},
                         mutable=["batch_stats"])
      return out

    def d_fwd(dp, img, img_small, part=None):
      out, _ = disc.apply({**d_vars, "params": dp}, img, img_small, train=True, part=part,
                          mutable=["batch_stats"])
      return out

    def d_real_loss(dp):
      logits, recs = d_fwd(dp, real, real_small, part=0)
      return jnp.mean(jax.nn.relu(1 - logits)) + sum(jnp.mean(jnp.square(x)) for x in recs)

    def g_loss(gp):
      return -jnp.mean(d_fwd(state.d_params, *g_fwd(gp)))

    parts = {
        "g_forward": (jax.jit(g_fwd), state.g_params),
        "d_forward_real_with_decoders": (jax.jit(functools.partial(d_fwd, part=0)),
                                         state.d_params, real, real_small),
        "d_forward_fake": (jax.jit(d_fwd), state.d_params, real, real_small),
        "d_real_grad": (jax.jit(jax.grad(d_real_loss)), state.d_params),
        "g_grad_through_d": (jax.jit(jax.grad(g_loss)), state.g_params),
    }
    for name, (fn, *fargs) in parts.items():
      results[name] = timed(fn, *fargs, iters=args.iters)
      print(f"{name}: {results[name]}", flush=True)

  print(json.dumps({"benchmark": "fastgan_step", "resolution": r, "batch": b, "ngf": args.width,
                    "ndf": args.width, "nz": 256, "backend": jax.default_backend(),
                    "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                    "pytorch_reference_s": 9.5, **results}))


if __name__ == "__main__":
  main()
