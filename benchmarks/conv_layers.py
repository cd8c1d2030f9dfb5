"""Where a classifier step's time goes: each 3x3 conv of a WRN-16-4 step, forward, input gradient
(dX) and weight gradient (dW), in mdjax, in XLA's own form, and in PyTorch, side by side.

    python benchmarks/conv_layers.py                 # WRN-16-4's 3x3 convs at 32x32, batch 128
    python benchmarks/conv_layers.py --batch 8 --layers 16:16:128:1,8:8:256:1   # FastGAN-like maps

Each layer is C->O channels at an HxW input with a stride; every figure is the median of `--steps`
calls of one function compiled with mdjax's CPU compiler options (`cpu_conv.jit`: Eigen's
convolutions; `--xla-defaults`: XLA's, YNNPACK's), compile excluded, float32, on the default device:
  fwd          lax.conv_general_dilated (what mdjax's models run forward, on every backend)
  dX xla       jax.vjp of that conv with respect to its input (XLA's own input gradient)
  dX mdjax     cpu_conv's matmul input gradient (one matmul, then col2im; mdjax uses it at stride 2)
  dW xla       jax.vjp with respect to the kernel (XLA's own weight gradient)
  dW mdjax     cpu_conv's matmul weight gradient (per tap, or im2col for C < 16; mdjax uses it but
               for 3x3 convs under Eigen)
  * onednn     the three passes as oneDNN custom calls (mdjax.core.onednn): what the classifier
               step runs on one CPU device; absent where oneDNN is unavailable
and PyTorch's conv2d on `torch.set_num_threads(2)`, in its default NCHW layout ("torch") and in
channels_last ("torch_cl", NHWC: PyTorch's faster CPU path, benchmarks/classifier_step.py): the
forward pass under no_grad, and forward + the gradient of one operand, from which its dX and dW are the
differences (a conv's backward does not run without its forward in eager PyTorch).

A single conv timed alone is not the same as a step: inside a whole train step XLA fuses and
schedules differently (a variant that wins here can lose in the step: see benchmarks/RESULTS.md,
"Classifier step against PyTorch"), so choices are confirmed with classifier_step.py and
fastgan_256.py. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mdjax.core import cpu_conv, onednn

from machine import median_time  # benchmarks/ is on sys.path when a script in it runs

_NHWC = ("NHWC", "HWIO", "NHWC")
# WRN-16-4 on 32x32 images: its 3x3 convs as C:O:H:stride (each appears 1-3 times per step).
WRN16_4 = "16:64:32:1,64:64:32:1,64:128:32:2,128:128:16:1,128:256:16:2,256:256:8:1"


def jax_layer(batch: int, c: int, o: int, h: int, stride: int, steps: int,
              xla_defaults: bool = False) -> dict:
  rs = np.random.RandomState(0)
  ho = h // stride
  x = jnp.asarray(rs.randn(batch, h, h, c).astype(np.float32))
  w = jnp.asarray(rs.randn(3, 3, c, o).astype(np.float32) * 0.1)
  dy = jnp.asarray(rs.randn(batch, ho, ho, o).astype(np.float32))
  pad, strides = ((1, 1), (1, 1)), (stride, stride)

  def conv(x_, w_):
    return lax.conv_general_dilated(x_, w_, strides, pad, dimension_numbers=_NHWC)

  # mdjax's CPU programs compile with cpu_conv's options (Eigen convolutions); --xla-defaults
  # compiles with XLA's (YNNPACK convolutions), to see what the options buy.
  jit = jax.jit if xla_defaults else cpu_conv.jit
  fns = {
      "fwd": jit(conv),
      "dX xla": jit(lambda x, w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0]),
      "dX mdjax": jit(lambda x, w, dy: cpu_conv._input_grad(  # pylint: disable=protected-access
          dy, w, pad, x.shape, strides)),
      "dW xla": jit(lambda x, w, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0]),
      "dW mdjax": jit(lambda x, w, dy: cpu_conv._weight_grad(  # pylint: disable=protected-access
          x, dy, (3, 3), strides, pad, w.dtype)),
  }
  if onednn.available():  # what the classifier step runs on one CPU device (cpu_conv point 3)
    fns.update({
        "fwd onednn": jax.jit(lambda x, w: onednn.conv(x, w, strides, pad)),
        "dX onednn": jax.jit(lambda x, w, dy: onednn.conv_input_grad(dy, w, x.shape, strides, pad)),
        "dW onednn": jax.jit(lambda x, w, dy: onednn.conv_weight_grad(x, dy, w.shape, strides,
                                                                      pad)),
    })
  out = {}
  for name, fn in fns.items():
    args = (x, w) if name.startswith("fwd") else (x, w, dy)
    out[name] = median_time(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)), steps)[1]
  # The rewrites must compute what XLA's own gradients compute, or their times mean nothing.
  checks = [("dX mdjax", "dX xla"), ("dW mdjax", "dW xla")]
  if "fwd onednn" in fns:
    checks += [("fwd onednn", "fwd"), ("dX onednn", "dX xla"), ("dW onednn", "dW xla")]
  for name, reference in checks:
    args = (x, w) if name.startswith("fwd") else (x, w, dy)
    ref, got = fns[reference](*args), fns[name](*args)
    err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    if err > 1e-4:
      raise AssertionError(f"{name} differs from XLA's {reference} by {err:.2e} (relative)")
  return out


def torch_layer(batch: int, c: int, o: int, h: int, stride: int, steps: int,
                channels_last: bool = False) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  rs = np.random.RandomState(0)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x = torch.from_numpy(rs.randn(batch, c, h, h).astype(np.float32))
  w = torch.from_numpy(rs.randn(o, c, 3, 3).astype(np.float32) * 0.1)
  dy = torch.from_numpy(rs.randn(batch, o, h // stride, h // stride).astype(np.float32))
  x, w, dy = (t.contiguous(memory_format=fmt) for t in (x, w, dy))
  x.requires_grad_(True)
  w.requires_grad_(True)

  def conv():
    return torch.nn.functional.conv2d(x, w, stride=stride, padding=1)

  def no_grad():
    with torch.no_grad():
      conv()

  fwd = median_time(no_grad, steps)[1]
  fwd_dx = median_time(lambda: torch.autograd.grad(conv(), [x], dy), steps)[1]
  fwd_dw = median_time(lambda: torch.autograd.grad(conv(), [w], dy), steps)[1]
  return {"fwd": fwd, "dX": fwd_dx - fwd, "dW": fwd_dw - fwd}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--layers", default=WRN16_4, help="C:O:H:stride,... (3x3 convs, padding 1)")
  p.add_argument("--steps", type=int, default=5, help="timed calls per figure (median)")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--xla-defaults", action="store_true",
                 help="compile with XLA's default CPU options, not mdjax's (cpu_conv.jit)")
  args = p.parse_args()
  layers = [tuple(int(v) for v in item.split(":")) for item in args.layers.split(",") if item]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}, median of "
        f"{args.steps} calls, milliseconds, "
        f"{'XLA default' if args.xla_defaults else 'mdjax (cpu_conv.jit)'} compiler options")
  rows = []
  for c, o, h, stride in layers:
    gflop = 2 * args.batch * (h // stride) ** 2 * 9 * c * o / 1e9
    row = {"c": c, "o": o, "h": h, "stride": stride, "gflop_per_pass": gflop,
           "mdjax": jax_layer(args.batch, c, o, h, stride, args.steps, args.xla_defaults)}
    if not args.no_torch:
      row["torch"] = torch_layer(args.batch, c, o, h, stride, args.steps)
      row["torch_cl"] = torch_layer(args.batch, c, o, h, stride, args.steps, channels_last=True)
    rows.append(row)
    line = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in row["mdjax"].items())
    for side in ("torch", "torch_cl"):
      if side in row:
        line += f" | {side} " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in row[side].items())
    print(f"{c}->{o} at {h}x{h} stride {stride} ({gflop:.2f} GFLOP a pass): {line}", flush=True)
  print(json.dumps({"benchmark": "conv_layers", "batch": args.batch,
                    "xla_defaults": args.xla_defaults, "rows": rows}))


if __name__ == "__main__":
  main()
