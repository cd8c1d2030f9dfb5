"""Images/s of mdjax's jitted classifier train step (Adam and SAM) against the same step in PyTorch.

  /work/venv/bin/python benchmarks/classifier_step.py            # WRN-16-4 32x32 b128, ResNet-50 224x224 b8
  /work/venv/bin/python benchmarks/classifier_step.py --quick    # WRN-16-4 only, fewer steps
  /work/venv/bin/python benchmarks/classifier_step.py --profile  # also forward vs forward+backward

mdjax's side is exactly what training runs: `mdjax.models.build_classifier` (linear head),
`mdjax.optim.make_optimizer` and `mdjax.train.steps.make_train_step` on one device (float32, batch
already on device; on CPU compiled with mdjax.core.cpu_conv's compiler options and gradient
rules, which --profile compares with XLA's defaults). PyTorch's side is a plain torch.nn re-implementation of the same networks
(ImageNet normalisation, pre-activation WRN / torchvision-layout ResNet-50, BN momentum 0.1,
dropout head) with torch.optim.Adam and the usual two-pass SAM (perturb, second backward, restore,
step), on `torch.set_num_threads(2)`, twice: in PyTorch's default NCHW memory format (side
`torch`) and in channels_last (`torch_cl`, NHWC like mdjax: what PyTorch recommends for CPU
convolutions, and the faster of the two here). Compile / warm-up steps are excluded. With mdjax
and PyTorch both timed (the default) the sides take turns in one process, `--steps` rounds of 2
steps each, the order reversed every round (`interleaved`): a shared VM drifts by 10-20% over
minutes, so the ratio is taken round by round and reported as its median, its range and the
number of rounds mdjax won. `--sequential` times all of mdjax's steps first (each figure the
median of `--steps` steps; `--profile`'s PyTorch forward/backward split is printed only then).
Ratios:
  SAM/Adam   = SAM step time / Adam step time (the floor is 2.0: two gradients per step)
  torch/mdjax = PyTorch step time / mdjax step time (> 1: mdjax is faster)

Each mdjax step also reports its FLOPs (XLA's cost analysis of the same step with XLA's own conv
gradients, machine.loop_free_flops: 2 per multiply-add, both SAM gradients included) and the FLOP/s it achieves. `--sides mdjax` leaves
PyTorch out; `--cases wrn10_2:16:32,...` times other backbone:size:batch cases. `--scaling 1,2,4,8`
times the SAM step (per-device perturbation, as training runs it) data parallel over the first 1,
2, 4, 8 devices with the per-device batch fixed (weak scaling): images/s and the efficiency
images/s(n) / (n x images/s(1)). benchmarks/run.py asks for it on GPUs; on a CPU it runs only over
simulated devices (JAX_NUM_CPU_DEVICES), which share the same cores. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mdjax import config as config_lib
from mdjax import models, optim
from mdjax.core import cpu_conv
from mdjax.core import mesh as mesh_lib
from mdjax.train import steps as steps_lib

from machine import lowered_flops, median_time  # benchmarks/ is on sys.path when a script in it runs

NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------------
# mdjax


def _config(backbone: str, optimizer: str, perturbation: str = "global", dtype: str = "float32"):
  c = config_lib.base_config()
  c.model.backbone, c.model.head, c.model.weights = backbone, "linear", "random"
  c.model.dtype = dtype
  c.train.optimizer, c.train.base_optimizer = optimizer, "adam"
  c.train.schedule, c.train.learning_rate = "constant", 1e-3
  c.train.sam_perturbation = perturbation
  return c


def memory_peak() -> int | None:
  """The device's peak bytes in use so far (accelerators; None where the backend keeps no count)."""
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def mdjax_runner(backbone: str, size: int, batch: int, optimizer: str,
                 fast_conv_grads: bool | None = None, devices: int = 1,
                 perturbation: str = "global", dtype: str = "float32") -> tuple:
  """(run, figures): mdjax's train step on the first `devices` devices (global batch `batch`),
  compiled, and a `run()` that takes one step and waits for it.

  The step is compiled explicitly (`lower().compile()`, timed as compile_s) and that executable
  is what runs, so its cost analysis is the program timed.
  """
  config = _config(backbone, optimizer, perturbation, dtype)
  mesh = mesh_lib.data_mesh(jax.devices()[:devices])
  model = models.build_classifier(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config, steps_per_epoch=100)
  state = steps_lib.create_train_state(model, tx, jax.random.PRNGKey(0), (size, size, 3), mesh)
  train_step = steps_lib.make_train_step(model, tx, config, mesh, fast_conv_grads=fast_conv_grads)
  rs = np.random.RandomState(0)
  batch_arrays = jax.device_put(
      {"image": rs.rand(batch, size, size, 3).astype(np.float32),
       "label": rs.randint(0, NUM_CLASSES, batch).astype(np.int32)}, mesh_lib.batch_sharding(mesh))
  t0 = time.perf_counter()
  with jax.threefry_partitionable(steps_lib.INIT_THREEFRY_PARTITIONABLE):
    compiled = train_step.jitted.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t0
  # The cost analysis is that of one device's program, taken from the step's twin with XLA's own
  # conv gradients (the same multiply-adds without cpu_conv's loop: machine.loop_free_flops).
  twin = steps_lib.make_train_step(model, tx, config, mesh, fast_conv_grads=False)
  with jax.threefry_partitionable(steps_lib.INIT_THREEFRY_PARTITIONABLE):
    flops = lowered_flops(twin.jitted.lower(state, batch_arrays)) * devices
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch_arrays)
    jax.block_until_ready(metrics["loss"])

  return run, {"backbone": backbone, "size": size, "batch": batch, "optimizer": optimizer,
               "dtype": dtype, "devices": devices, "flops_per_step": flops,
               "compile_s": compile_s}


def _with_time(figures: dict, seconds: float) -> dict:
  return {**figures, "s_per_step": seconds, "images_per_s": figures["batch"] / seconds,
          "flops_per_s": figures["flops_per_step"] / seconds}


def mdjax_step(backbone: str, size: int, batch: int, optimizer: str, steps: int,
               fast_conv_grads: bool | None = None, devices: int = 1,
               perturbation: str = "global", dtype: str = "float32") -> dict:
  """Times mdjax's train step on the first `devices` devices (global batch `batch`): the median
  of `steps` steps after warm-up; with the device's peak memory so far where it keeps one."""
  run, figures = mdjax_runner(backbone, size, batch, optimizer, fast_conv_grads, devices,
                              perturbation, dtype)
  _, median = median_time(run, steps)
  return {**_with_time(figures, median), "memory_peak_bytes": memory_peak()}


def mdjax_step_time(backbone: str, size: int, batch: int, optimizer: str, steps: int,
                    fast_conv_grads: bool | None = None):
  """(compile time, median step time) in seconds."""
  r = mdjax_step(backbone, size, batch, optimizer, steps, fast_conv_grads)
  return r["compile_s"], r["s_per_step"]


def scaling(backbone: str, size: int, per_device_batch: int, counts, steps: int) -> list[dict]:
  """The SAM step (per-device perturbation) over the first n devices for each n in `counts`
  (those the machine has), the per-device batch fixed."""
  out = []
  for n in counts:
    if n > jax.device_count():
      break
    r = mdjax_step(backbone, size, per_device_batch * n, "sam", steps, devices=n,
                   perturbation="per_device")
    r["efficiency"] = r["images_per_s"] / (n * out[0]["images_per_s"]) if out else 1.0
    out.append(r)
    print(f"scaling {backbone} {size}x{size}, {per_device_batch}/device: {n} device(s) "
          f"{r['images_per_s']:.1f} images/s, efficiency {r['efficiency']:.2f}", flush=True)
  return out


def mdjax_profile(backbone: str, size: int, batch: int, steps: int) -> dict:
  """Forward (train mode) vs forward+backward of the loss, jitted, float32."""
  config = _config(backbone, "adam")
  model = models.build_classifier(config.model, NUM_CLASSES)
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3)), train=False))(
        jax.random.PRNGKey(0))
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.rand(batch, size, size, 3).astype(np.float32))
  y = jnp.asarray(rs.randint(0, NUM_CLASSES, batch))

  xla_model = model.with_conv(None)  # XLA's own convolution gradients

  def loss(params, x, y):
    logits, _ = xla_model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
    return steps_lib.cross_entropy(logits, y)

  fast_model = model.with_conv(cpu_conv.Rules())

  def fast_loss(params, x, y):
    logits, _ = fast_model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.PRNGKey(1)})
    return steps_lib.cross_entropy(logits, y)

  fwd = jax.jit(loss)
  grad = jax.jit(jax.value_and_grad(loss))
  fast_grad = jax.jit(jax.value_and_grad(fast_loss))
  out = {}
  with jax.threefry_partitionable(False):
    out["forward"] = median_time(lambda: fwd(variables["params"], x, y).block_until_ready(), steps)[1]
    out["forward+backward (XLA conv grads)"] = median_time(
        lambda: jax.block_until_ready(grad(variables["params"], x, y)), steps)[1]
    if cpu_conv.enabled():
      out["forward+backward (matmul dW)"] = median_time(
          lambda: jax.block_until_ready(fast_grad(variables["params"], x, y)), steps)[1]
  return out


# ------------------------------------------------------------------------------------------------
# PyTorch (imported here only: mdjax itself never imports torch)


# PyTorch's sides: the memory format of its activations and weights. NCHW is its default;
# channels_last (NHWC, mdjax's layout) is what PyTorch recommends for convolutions on CPUs (oneDNN),
# and ran its WRN-16-4 step 1.45x faster on a 2-core Intel Xeon VM (benchmarks/RESULTS.md).
TORCH_SIDES = {"torch": "nchw", "torch_cl": "channels_last"}


def torch_runner(backbone: str, size: int, batch: int, optimizer: str, rho: float = 0.05,
                 memory_format: str = "nchw"):
  """(step, model, x, y, loss_fn): PyTorch's train step of the same recipe, as a function that
  takes one step, on `torch.set_num_threads(2)`, its tensors in `memory_format` (TORCH_SIDES)."""
  import torch
  import torch_reference as ref
  torch.set_num_threads(2)
  torch.manual_seed(0)
  # Every backbone torch_reference has (each CIFAR WRN, ResNet-50): the suite's cases include the
  # digits recipe's wrn10_2, which a fixed two-entry table here once failed on.
  model = ref.build_classifier(backbone, "linear", NUM_CLASSES).train()
  rs = np.random.RandomState(0)
  x = torch.from_numpy(rs.rand(batch, 3, size, size).astype(np.float32))  # NCHW: torch's native
  y = torch.from_numpy(rs.randint(0, NUM_CLASSES, batch).astype(np.int64))
  if memory_format == "channels_last":
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  elif memory_format != "nchw":
    raise ValueError(f"memory_format {memory_format!r}: expected one of "
                     f"{sorted(set(TORCH_SIDES.values()))}")
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # after .to(): the parameters it steps
  loss_fn = torch.nn.CrossEntropyLoss()

  def adam_step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  def sam_step():
    return ref.sam_step(model, loss_fn, x, y, opt, rho=rho).item()

  return (adam_step if optimizer == "adam" else sam_step), model, x, y, loss_fn


def torch_step_time(backbone: str, size: int, batch: int, optimizer: str, steps: int,
                    rho: float = 0.05, profile: bool = False, memory_format: str = "nchw"):
  import torch
  step, model, x, y, loss_fn = torch_runner(backbone, size, batch, optimizer, rho, memory_format)
  result = median_time(step, steps)
  if not profile:
    return result

  def fwd():
    with torch.no_grad():
      loss_fn(model(x), y).item()

  def fwd_bwd():
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()

  return result, {"forward (no grad)": median_time(fwd, steps)[1],
                  "forward+backward": median_time(fwd_bwd, steps)[1]}


# ------------------------------------------------------------------------------------------------
# Side by side


def interleaved(runs: dict, rounds: int, steps_per_round: int = 2, warmup: int = 2,
                pause_s: float = 0.25) -> dict:
  """{name: [[seconds of each step] per round]}: the `runs` (name -> a function taking one step)
  take turns, `steps_per_round` steps each per round, after `warmup` untimed steps each.

  Why not one side after the other: a shared VM's speed drifts by 10-20% over minutes, which moved
  sequential ratios between 0.93x and 1.15x for the same two programs (benchmarks/RESULTS.md).
  Taking turns puts both sides in the same minutes, and the ratio is taken per round. The order turns
  around every round (A B, B A, ...), so neither side always follows the other, and each turn
  starts after a pause in which the other side's worker threads stop spinning (XLA's Eigen pool
  and PyTorch's OpenMP threads spin-wait for work for a while after a step; a thread still
  spinning takes a core from the side that runs next).
  """
  names = list(runs)
  for name in names:
    for _ in range(warmup):
      runs[name]()
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(pause_s)
      round_times = []
      for _ in range(steps_per_round):
        t0 = time.perf_counter()
        runs[name]()
        round_times.append(time.perf_counter() - t0)
      times[name].append(round_times)
  return times


def paired_ratio(times: dict, numerator: str, denominator: str) -> dict:
  """The ratio of two sides' step times, round by round (median step of each side in the
  round), from `interleaved`'s output: its median, min and max over the rounds."""
  ratios = [statistics.median(a) / statistics.median(b)
            for a, b in zip(times[numerator], times[denominator])]
  return {"rounds": len(ratios), "per_round": ratios, "median": statistics.median(ratios),
          "min": min(ratios), "max": max(ratios)}


# ------------------------------------------------------------------------------------------------


def _cases(spec: str):
  out = []
  for item in filter(None, spec.split(",")):
    backbone, size, batch = item.split(":")
    out.append((backbone, int(size), int(batch)))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=5,
                      help="timed steps per measurement (median); with both sides, the rounds of "
                           "2 steps each side takes in turn")
  parser.add_argument("--quick", action="store_true", help="WRN-16-4 only, 3 steps")
  parser.add_argument("--profile", action="store_true", help="also time forward vs forward+backward")
  parser.add_argument("--models", default="", help="comma-separated subset of wrn16_4,resnet50")
  parser.add_argument("--cases", default="", help="backbone:size:batch,... instead of the defaults")
  parser.add_argument("--sides", default="mdjax,torch,torch_cl",
                      help="some of mdjax, torch (PyTorch, NCHW), torch_cl (PyTorch, "
                           "channels_last)")
  parser.add_argument("--sequential", action="store_true",
                      help="time mdjax's steps, then PyTorch's, instead of taking turns")
  parser.add_argument("--scaling", default="", help="device counts, e.g. 1,2,4,8 (SAM step)")
  parser.add_argument("--scaling-case", default="",
                      help="backbone:size:per-device batch of the scaling (default: the first case)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="mdjax's computation dtype (model.dtype); PyTorch stays float32")
  parser.add_argument("--optimizers", default="adam,sam", help="some of adam,sam")
  args = parser.parse_args()
  cases = [("wrn16_4", 32, 128), ("resnet50", 224, 8)]
  steps = args.steps
  if args.quick:
    cases, steps = cases[:1], min(steps, 3)
  if args.models:
    cases = [c for c in cases if c[0] in args.models.split(",")]
  if args.cases:
    cases = _cases(args.cases)
  sides = args.sides.split(",")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
        f"median of {steps} steps after warm-up (compile excluded)")
  unknown = set(sides) - {"mdjax", *TORCH_SIDES}
  if unknown:
    parser.error(f"--sides: unknown {sorted(unknown)}; expected some of "
                 f"mdjax,{','.join(TORCH_SIDES)}")
  torch_sides = [side for side in sides if side in TORCH_SIDES]
  side_by_side = "mdjax" in sides and torch_sides and not args.sequential
  report = {"steps": steps, "cases": [], "torch": [], "scaling": [],
            "timing": "interleaved" if side_by_side else "sequential"}
  if side_by_side:
    print(f"{', '.join(sides)} take turns: {steps} rounds of 2 steps each per side, the order "
          f"reversed every round; ratios are per round (torch/mdjax > 1: mdjax is faster)")
  for backbone, size, batch in cases:
    print(f"\n== {backbone} {size}x{size}, batch {batch}, {args.dtype} ==")
    t = {}
    for opt in args.optimizers.split(","):
      mdjax_figures, torch_figures = None, {}
      if side_by_side:
        runs = {}
        runs["mdjax"], mdjax_figures = mdjax_runner(backbone, size, batch, opt, dtype=args.dtype)
        for side in torch_sides:
          runs[side] = torch_runner(backbone, size, batch, opt, memory_format=TORCH_SIDES[side])[0]
        times = interleaved(runs, rounds=steps)
        del runs
        median = {side: statistics.median(x for r in rounds for x in r)
                  for side, rounds in times.items()}
        mdjax_figures = _with_time(mdjax_figures, median["mdjax"])
        for side in torch_sides:
          torch_figures[side] = {"s_per_step": median[side],
                                 "torch_over_mdjax": paired_ratio(times, side, "mdjax")}
      else:
        if "mdjax" in sides:
          mdjax_figures = mdjax_step(backbone, size, batch, opt, steps, dtype=args.dtype)
        for side in torch_sides:
          res = torch_step_time(backbone, size, batch, opt, steps,
                                profile=args.profile and opt == "adam",
                                memory_format=TORCH_SIDES[side])
          prof = None
          if isinstance(res[0], tuple):
            res, prof = res
          torch_figures[side] = {"s_per_step": res[1]}
          if prof:
            print(f"  {side} " + ", ".join(f"{k} {v:.3f} s" for k, v in prof.items()))
      if mdjax_figures:
        r = mdjax_figures
        report["cases"].append(r)
        t[("mdjax", opt)] = r["s_per_step"]
        print(f"mdjax    {opt:4s}: {r['s_per_step']:.3f} s/step = "
              f"{r['images_per_s']:7.1f} images/s, "
              f"{r['flops_per_step'] / 1e9:.2f} GFLOP/step = {r['flops_per_s'] / 1e9:.1f} GFLOP/s"
              f"   (compile {r['compile_s']:.1f} s)", flush=True)
      for side, figures in torch_figures.items():
        sec = figures["s_per_step"]
        t[(side, opt)] = sec
        report["torch"].append({"backbone": backbone, "size": size, "batch": batch,
                                "optimizer": opt, "memory_format": TORCH_SIDES[side],
                                "images_per_s": batch / sec, **figures})
        line = f"{side:8s} {opt:4s}: {sec:.3f} s/step = {batch / sec:7.1f} images/s"
        if "torch_over_mdjax" in figures:
          q = figures["torch_over_mdjax"]
          line += (f"   {side}/mdjax {q['median']:.2f} (rounds: {q['min']:.2f}-{q['max']:.2f}, "
                   f"{sum(x > 1 for x in q['per_round'])} of {q['rounds']} with mdjax ahead)")
        print(line, flush=True)
    if args.profile and "mdjax" in sides:
      if cpu_conv.enabled():
        xla = mdjax_step_time(backbone, size, batch, "adam", steps, fast_conv_grads=False)[1]
        print(f"  mdjax adam with XLA's defaults (YNNPACK convolutions, XLA's own gradients): "
              f"{xla:.3f} s/step (cpu_conv's options and rules: "
              f"{xla / t[('mdjax', 'adam')]:.2f}x faster)")
      prof = mdjax_profile(backbone, size, batch, steps)
      print("  mdjax " + ", ".join(f"{k} {v:.3f} s" for k, v in prof.items()))
    for side in sides:
      if (side, "adam") in t and (side, "sam") in t:
        print(f"SAM/Adam time ratio {side}: {t[(side, 'sam')] / t[(side, 'adam')]:.2f}")
    for side in torch_sides:
      if ("mdjax", "adam") in t and ("mdjax", "sam") in t:
        print(f"{side}/mdjax time ratio: Adam {t[(side, 'adam')] / t[('mdjax', 'adam')]:.2f}, "
              f"SAM {t[(side, 'sam')] / t[('mdjax', 'sam')]:.2f}")
  if args.scaling:
    backbone, size, batch = _cases(args.scaling_case)[0] if args.scaling_case else cases[0]
    counts = [int(n) for n in args.scaling.split(",")]
    print(f"\n== scaling: {backbone} {size}x{size}, {batch} images per device, SAM ==")
    report["scaling"] = scaling(backbone, size, batch, counts, steps)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
