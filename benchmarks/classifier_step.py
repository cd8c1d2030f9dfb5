"""Images/s of mdjax's jitted classifier train step (Adam and SAM) against the same step in PyTorch.

  /work/venv/bin/python benchmarks/classifier_step.py            # WRN-16-4 32x32 b128, ResNet-50 224x224 b8
  /work/venv/bin/python benchmarks/classifier_step.py --quick    # WRN-16-4 only, fewer steps
  /work/venv/bin/python benchmarks/classifier_step.py --profile  # also forward vs forward+backward

mdjax's side is exactly what training runs: `mdjax.models.build_classifier` (linear head),
`mdjax.optim.make_optimizer` and `mdjax.train.steps.make_train_step` on one device (float32, batch
already on device; on CPU with the matmul weight gradients of mdjax.core.cpu_conv, which
--profile compares with XLA's own). PyTorch's side is a plain torch.nn re-implementation of the same networks
(ImageNet normalisation, pre-activation WRN / torchvision-layout ResNet-50, BN momentum 0.1,
dropout head) with torch.optim.Adam and the usual two-pass SAM (perturb, second backward, restore,
step), on `torch.set_num_threads(2)`. Compile / warm-up steps are excluded; every figure is the
median of `--steps` timed steps. The machine is shared, so compare ratios within one run:
  SAM/Adam   = SAM step time / Adam step time (the floor is 2.0: two gradients per step)
  torch/mdjax = PyTorch step time / mdjax step time (> 1: mdjax is faster)
"""

from __future__ import annotations

import argparse
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

NUM_CLASSES = 10


def _median_time(fn, steps: int, warmup: int = 2) -> tuple[float, float]:
  """(first call incl. compile, median of `steps` later calls) in seconds."""
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


# ------------------------------------------------------------------------------------------------
# mdjax


def _config(backbone: str, optimizer: str):
  c = config_lib.base_config()
  c.model.backbone, c.model.head, c.model.weights = backbone, "linear", "random"
  c.train.optimizer, c.train.base_optimizer = optimizer, "adam"
  c.train.schedule, c.train.learning_rate = "constant", 1e-3
  c.train.sam_perturbation = "global"
  return c


def mdjax_step_time(backbone: str, size: int, batch: int, optimizer: str, steps: int,
                    fast_conv_grads: bool | None = None):
  config = _config(backbone, optimizer)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  model = models.build_classifier(config.model, NUM_CLASSES)
  tx = optim.make_optimizer(config, steps_per_epoch=100)
  state = steps_lib.create_train_state(model, tx, jax.random.PRNGKey(0), (size, size, 3), mesh)
  train_step = steps_lib.make_train_step(model, tx, config, mesh, fast_conv_grads=fast_conv_grads)
  rs = np.random.RandomState(0)
  batch_arrays = jax.device_put(
      {"image": rs.rand(batch, size, size, 3).astype(np.float32),
       "label": rs.randint(0, NUM_CLASSES, batch).astype(np.int32)}, mesh_lib.batch_sharding(mesh))
  holder = [state]

  def run():
    holder[0], metrics = train_step(holder[0], batch_arrays)
    jax.block_until_ready(metrics["loss"])

  return _median_time(run, steps)


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

  def loss(params, x, y):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
    return steps_lib.cross_entropy(logits, y)

  def fast_loss(params, x, y):
    with cpu_conv.use_fast_conv_grads(True):
      return loss(params, x, y)

  fwd = jax.jit(loss)
  grad = jax.jit(jax.value_and_grad(loss))
  fast_grad = jax.jit(jax.value_and_grad(fast_loss))
  out = {}
  with jax.threefry_partitionable(False):
    out["forward"] = _median_time(lambda: fwd(variables["params"], x, y).block_until_ready(), steps)[1]
    out["forward+backward (XLA conv grads)"] = _median_time(
        lambda: jax.block_until_ready(grad(variables["params"], x, y)), steps)[1]
    if cpu_conv.enabled():
      out["forward+backward (matmul dW)"] = _median_time(
          lambda: jax.block_until_ready(fast_grad(variables["params"], x, y)), steps)[1]
  return out


# ------------------------------------------------------------------------------------------------
# PyTorch (imported here only: mdjax itself never imports torch)


def _torch_models():
  import torch_reference as ref  # benchmarks/ is on sys.path when a script in it runs
  return {"wrn16_4": lambda: ref.build_classifier("wrn16_4", "linear", NUM_CLASSES),
          "resnet50": lambda: ref.build_classifier("resnet50", "linear", NUM_CLASSES)}


def torch_step_time(backbone: str, size: int, batch: int, optimizer: str, steps: int,
                    rho: float = 0.05, profile: bool = False):
  import torch
  import torch_reference as ref
  torch.set_num_threads(2)
  torch.manual_seed(0)
  model = _torch_models()[backbone]().train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  rs = np.random.RandomState(0)
  x = torch.from_numpy(rs.rand(batch, 3, size, size).astype(np.float32))  # NCHW: torch's native
  y = torch.from_numpy(rs.randint(0, NUM_CLASSES, batch).astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()

  def adam_step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  def sam_step():
    return ref.sam_step(model, loss_fn, x, y, opt, rho=rho).item()

  result = _median_time(adam_step if optimizer == "adam" else sam_step, steps)
  if not profile:
    return result

  def fwd():
    with torch.no_grad():
      loss_fn(model(x), y).item()

  def fwd_bwd():
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()

  return result, {"forward (no grad)": _median_time(fwd, steps)[1],
                  "forward+backward": _median_time(fwd_bwd, steps)[1]}


# ------------------------------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
  parser.add_argument("--quick", action="store_true", help="WRN-16-4 only, 3 steps")
  parser.add_argument("--profile", action="store_true", help="also time forward vs forward+backward")
  parser.add_argument("--models", default="", help="comma-separated subset of wrn16_4,resnet50")
  args = parser.parse_args()
  cases = [("wrn16_4", 32, 128), ("resnet50", 224, 8)]
  steps = args.steps
  if args.quick:
    cases, steps = cases[:1], min(steps, 3)
  if args.models:
    cases = [c for c in cases if c[0] in args.models.split(",")]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
        f"median of {steps} steps after warm-up (compile excluded)")
  for backbone, size, batch in cases:
    print(f"\n== {backbone} {size}x{size}, batch {batch}, float32 ==")
    t = {}
    for opt in ("adam", "sam"):
      compile_s, t[("mdjax", opt)] = mdjax_step_time(backbone, size, batch, opt, steps)
      print(f"mdjax {opt:4s}: {t[('mdjax', opt)]:.3f} s/step = {batch / t[('mdjax', opt)]:7.1f} images/s"
            f"   (first call incl. compile {compile_s:.1f} s)", flush=True)
    for opt in ("adam", "sam"):
      res = torch_step_time(backbone, size, batch, opt, steps, profile=args.profile and opt == "adam")
      prof = None
      if isinstance(res[0], tuple):
        res, prof = res
      t[("torch", opt)] = res[1]
      print(f"torch {opt:4s}: {res[1]:.3f} s/step = {batch / res[1]:7.1f} images/s", flush=True)
      if prof:
        print("  torch " + ", ".join(f"{k} {v:.3f} s" for k, v in prof.items()))
    if args.profile:
      if cpu_conv.enabled():
        xla = mdjax_step_time(backbone, size, batch, "adam", steps, fast_conv_grads=False)[1]
        print(f"  mdjax adam with XLA's own conv gradients: {xla:.3f} s/step "
              f"(matmul dW speed-up {xla / t[('mdjax', 'adam')]:.2f}x)")
      prof = mdjax_profile(backbone, size, batch, steps)
      print("  mdjax " + ", ".join(f"{k} {v:.3f} s" for k, v in prof.items()))
    print(f"SAM/Adam time ratio: mdjax {t[('mdjax', 'sam')] / t[('mdjax', 'adam')]:.2f}, "
          f"torch {t[('torch', 'sam')] / t[('torch', 'adam')]:.2f}")
    print(f"torch/mdjax time ratio: Adam {t[('torch', 'adam')] / t[('mdjax', 'adam')]:.2f}, "
          f"SAM {t[('torch', 'sam')] / t[('mdjax', 'sam')]:.2f}")


if __name__ == "__main__":
  main()
