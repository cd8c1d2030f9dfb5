"""XLA CPU compiler options and convolution gradient rules that make mdjax's CPU programs fast.

Everything here applies to the CPU backend only (`enabled()`); GPUs and TPUs keep XLA's defaults and
its own convolution gradients (cuDNN's are fast).

1. Compiler options (`CPU_COMPILER_OPTIONS`, `jit()`). jaxlib 0.10's CPU backend hands every
   convolution to YNNPACK by default; XLA's older Eigen convolution ran the WRN layers 1.3-3x
   faster (benchmarks/RESULTS.md, "XLA's CPU convolutions: YNNPACK or Eigen"). The options keep
   YNNPACK for dots and reductions and give convolutions to Eigen. They go to one program at a
   time (`jit()`: jax.jit's compiler_options), never into XLA_FLAGS, because they are not a win
   everywhere: the classifier train step uses them, the GAN programs keep XLA's defaults (their
   `lax.map` loop over classes ran many times slower with them; same section).

2. Gradient rules (`Rules`), where XLA's CPU gradient is slow; which rules apply depends on whose
   convolutions the program compiles to (`Rules.eigen`):
   - with XLA's defaults (YNNPACK): every dW as matmuls (`_weight_grad`), and dX of every
     kh*kw > 1 conv as one matmul plus col2im (`_input_grad`).
   - with Eigen (`eigen=True`, under CPU_COMPILER_OPTIONS): XLA's own gradients, except dX of a
     strided kh*kw > 1 conv (XLA's is an lhs-dilated convolution) and dW of any conv but a 3x3
     one: XLA lowers other kernels' dW badly (FastGAN's 2x2 phase kernels,
     `fastgan.upsample_conv3x3`, became naive loops). The 3x3 dW kept is XLA's, with its input
     fenced (`_eigen_weight_grad`) so that the input's transpose copies the computed activation
     instead of recomputing it in a slow strided loop (RESULTS.md, "The weight gradient's
     transpose, fenced").
   Forward passes and 1x1 input gradients are XLA's own (but under point 3), and so are depthwise
   convolutions but on the CPU (`depthwise_conv_general_dilated`, used by EfficientNet). Every
   rewritten gradient is checked against `jax.grad` in tests/test_cpu_conv.py.

3. oneDNN (`Rules(onednn=True)`, the classifier step on one device or inside
   its per-device shard_map; the `onednn` extra): every routed float32 convolution of at least
   _ONEDNN_MIN_FLOPS, forward, dX and dW, is a custom call into oneDNN (mdjax.core.onednn), the
   library behind PyTorch's CPU convolutions (RESULTS.md, "oneDNN inside the step, through XLA's
   FFI"). Without it, points 1-2 apply. Not under GSPMD partitioning (XLA would gather a custom
   call's operands onto every device) nor in the GAN programs, whose convolutions are vmapped over
   classes (a custom call runs once per class there).

The matmul weight gradient is one matmul per kernel tap,
  dW[i, j] = X_shifted(i, j)^T @ dY   ([C, B*Ho*Wo] @ [B*Ho*Wo, O]),
or, for few input channels (a 7x7 RGB stem), one matmul over im2col patches. The per-tap form copies
the shifted input kh*kw times, and over a whole batch those copies cost more than the matmuls they
feed; so a kh*kw > 1 weight gradient loops (`lax.scan`) over chunks of the batch of about
_DW_CHUNK_ROWS output pixels, summing each chunk's taps: the copies then stay in the cache. XLA's
cost analysis counts the loop's body once: benchmarks count FLOPs on a twin built without the
rules (benchmarks/machine.py, `loop_free_flops`).

Under `jax.vmap` with per-model kernels (the GAN ensemble's "vmap" strategy), batching rules
(`jax.custom_batching.custom_vmap`) run the conv and its gradients once per model instead of as
grouped convolutions and batched matmuls; see the comment above `_once_per_kernel`.

The rules reach a model explicitly: `Rules(eigen=..., onednn=...)` is a convolution with
`lax.conv_general_dilated`'s signature, and the models take it as their `conv` attribute and hand
it to every `nn.Conv` (flax's `conv_general_dilated` hook), `Classifier.with_conv` swapping it in
for a train step. `rules_for_backend()` is what a model is built with: the plain rules (and the
depthwise rule) on a CPU, None (XLA's own convolutions) elsewhere. Only plain NHWC/HWIO
convolutions (no dilation, no feature groups) are routed; anything else is
`lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mdjax.core import onednn
from mdjax.core.collectives import varying_axes

_NHWC = ("NHWC", "HWIO", "NHWC")
# Below this many input channels one im2col matmul beats kh*kw thin per-tap matmuls.
_PATCHES_BELOW_CHANNELS = 16
# dW of a kh*kw > 1 conv loops over chunks of the batch with about this many output pixels each
# (rows of its matmuls): measured best of 1024-16384 (benchmarks/RESULTS.md).
_DW_CHUNK_ROWS = 2048
# The oneDNN rules take a convolution of at least this many FLOPs a pass (2*B*Ho*Wo*kh*kw*C*O).
# Below it Eigen's is faster in a step: the digits recipe's convs (WRN-10-2 at 16x16, batch 32,
# at most 0.15 GFLOP) ran 1.3x slower on oneDNN, while the smallest of WRN-16-4 b128 (a 1x1
# shortcut, 0.54 GFLOP) and of ResNet-50 224 b8 (0.82 GFLOP) gain (benchmarks/RESULTS.md).
_ONEDNN_MIN_FLOPS = 3e8
# YNNPACK keeps dots and reductions; convolutions go to Eigen (module docstring, point 1). jaxlib
# 0.10's default list is these two plus LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def enabled() -> bool:
  return jax.default_backend() == "cpu"


@functools.cache
def _options_accepted() -> bool:
  """Whether this jaxlib compiles with CPU_COMPILER_OPTIONS (once per process: a tiny program).

  A jaxlib that renamed or dropped the option would fail every compile; mdjax then says so once
  and compiles with XLA's defaults (slower convolutions, same results)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        jnp.zeros((), jnp.float32)).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except  # jaxlib raises JaxRuntimeError subtypes
    logging.getLogger(__name__).warning(
        "This jaxlib (%s) rejects mdjax's CPU compiler options %s (%s); compiling with XLA's "
        "defaults, whose CPU convolutions are slower.", jax.__version__, CPU_COMPILER_OPTIONS,
        str(e).splitlines()[0] if str(e) else type(e).__name__)
    return False


def compiler_options(enable: bool | None = None) -> dict | None:
  """The compiler options of mdjax's CPU programs (module docstring, point 1), or None.

  `enable=None` means "on the CPU backend"; None is also returned where this jaxlib rejects them."""
  if enable is None:
    enable = enabled()
  return dict(CPU_COMPILER_OPTIONS) if enable and _options_accepted() else None


def jit(fun: Callable, *, enable: bool | None = None, **kwargs) -> Callable:
  """`jax.jit(fun, **kwargs)` with `compiler_options(enable)`: for mdjax's top-level programs.

  JAX takes compiler options only on an outermost jit; a function that another jitted function
  calls is traced into its caller and compiles with the caller's options."""
  return jax.jit(fun, compiler_options=compiler_options(enable), **kwargs)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  return tuple(dimension_numbers) == _NHWC


def _weight_grad(x, dy, kernel_hw, strides, padding, dtype):
  kh, kw = kernel_hw
  sh, sw = strides
  b, ho, wo, o = dy.shape
  c = x.shape[-1]
  dyf = dy.reshape(-1, o)
  mm = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  if c < _PATCHES_BELOW_CHANNELS and kh * kw > 1:
    patches = lax.conv_general_dilated_patches(x, (kh, kw), (sh, sw), padding,
                                               dimension_numbers=_NHWC)  # features ordered (c, kh, kw)
    dw = mm(patches.reshape(-1, c * kh * kw).T, dyf)
    return dw.reshape(c, kh, kw, o).transpose(1, 2, 0, 3).astype(dtype)
  pads = ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0))

  def per_tap(xs, dys):
    """[kh*kw, C, O]: one matmul per tap over the images `xs` (unpadded) and their `dys`."""
    xp = jnp.pad(xs, pads)
    dysf = dys.reshape(-1, o)
    n = xs.shape[0]
    return jnp.stack([
        mm(lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                     (1, sh, sw, 1)).reshape(-1, c).T, dysf)
        for i in range(kh) for j in range(kw)])

  chunk = _images_per_chunk(b, ho * wo) if kh * kw > 1 else b
  if chunk == b:
    dw = per_tap(x, dy)
  else:  # the batch in chunks, so that the taps' copies stay in the cache (module docstring)
    n = b // chunk
    zeros = jnp.zeros((kh * kw, c, o), jnp.float32)
    # Under shard_map the sum varies over the devices as x and dy do; the loop's carry must be
    # typed alike from the start (a per-device SAM step fails to trace otherwise).
    axes = tuple(sorted(varying_axes(x) | varying_axes(dy)))
    if axes:
      zeros = lax.pcast(zeros, axes, to="varying")
    dw, _ = lax.scan(lambda acc, xy: (acc + per_tap(*xy), None), zeros,
                     (x.reshape(n, chunk, *x.shape[1:]), dy.reshape(n, chunk, ho, wo, o)))
  return dw.reshape(kh, kw, c, o).astype(dtype)


def _images_per_chunk(batch: int, pixels: int) -> int:
  """The most images (a divisor of `batch`) whose output pixels fit in _DW_CHUNK_ROWS, at least 1."""
  fits = [d for d in range(1, batch + 1) if batch % d == 0 and d * pixels <= _DW_CHUNK_ROWS]
  return max(fits, default=1)


# vmap over per-model kernels (the GAN ensemble's "vmap" strategy: K classes' GANs stacked) would
# turn every convolution into a grouped one (feature_group_count = K), which XLA's CPU backend runs
# slower than K plain ones (benchmarks/RESULTS.md, "vmap with grouped convs"), and the matmuls of
# the gradients into batched matmuls. The batching rule below instead unrolls the conv and its
# gradient into K ordinary ones inside the vmapped program; everything else (BatchNorm,
# activations, optimizer) stays batched. With a kernel shared by the batch, the forward conv keeps
# vmap's own rules (they fold the batch into the conv's batch dimension); its gradient does not
# (`per_model_grads`): the kernel's gradient is then one per model, which XLA's own rule computes
# as a convolution with batch_group_count = K.


def _once_per_kernel(fn: Callable, per_model_grads: bool = False) -> Callable:
  """`fn(x, w, ...)`, whose vmap over a batched kernel `w` runs `fn` once per kernel (and, with
  `per_model_grads`, over any batched argument)."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    if not in_batched[1] and not per_model_grads:  # a shared kernel: vmap's own rules
      out = jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched))(*args)
    else:
      outs = [wrapped(*(a[i] if b else a for a, b in zip(args, in_batched)))
              for i in range(axis_size)]
      out = jax.tree.map(lambda *o: jnp.stack(o), *outs)
    return out, jax.tree.map(lambda _: True, out)
  return wrapped


@functools.cache
def _plain_conv(strides, padding):
  return _once_per_kernel(functools.partial(lax.conv_general_dilated, window_strides=strides,
                                            padding=padding, dimension_numbers=_NHWC))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, eigen):
  return _plain_conv(strides, padding)(x, w)


def _conv_fwd(x, w, strides, padding, eigen):
  return _conv(x, w, strides, padding, eigen), (x, w)


def _input_grad(dy, w, padding, x_shape, strides):
  """dX as ONE matmul, dY @ W^T, then col2im: a sum of kh*kw shifted (and, for stride s,
  s-dilated) slices.

  Why: XLA's CPU input gradient (a convolution of dY with the flipped kernel, lhs-dilated for
  strided convs) runs far below matmul speed on FastGAN's large maps (benchmarks/RESULTS.md), while
  the same multiply-adds as one [B*Ho*Wo, O] @ [O, kh*kw*C] matmul run near it; the col2im sum is
  one fused elementwise pass (lax.pad's interior padding places a strided conv's taps).
  """
  kh, kw, c, o = w.shape
  b, ho, wo, _ = dy.shape
  (pt, pb), (pl, pr) = padding
  cols = jnp.matmul(dy.reshape(-1, o), w.reshape(kh * kw * c, o).T.astype(dy.dtype),
                    preferred_element_type=jnp.float32).reshape(b, ho, wo, kh, kw, c)
  hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
  sh, sw = strides
  dxp = None
  zero = jnp.zeros((), cols.dtype)
  for i in range(kh):
    for j in range(kw):
      tap = lax.pad(cols[:, :, :, i, j], zero,
                    ((0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1),
                     (j, wp - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
      dxp = tap if dxp is None else dxp + tap
  return dxp[:, pt:pt + x_shape[1], pl:pl + x_shape[2]].astype(dy.dtype)


def _conv_bwd(strides, padding, eigen, residuals, dy):
  x, w = residuals
  dx, dw = _plain_bwd(strides, padding, eigen)(x, w, dy)
  # Under shard_map, a replicated kernel applied to per-device data is implicitly made per-device,
  # and that cast's transpose sums over the devices: do what JAX's own rule would.
  extra = tuple(varying_axes(dw) - varying_axes(w))
  return dx, jax.lax.psum(dw, extra) if extra else dw


@functools.cache
def _plain_bwd(strides, padding, eigen):
  return _once_per_kernel(functools.partial(_conv_bwd_one, strides, padding, eigen),
                          per_model_grads=True)


def _conv_bwd_one(strides, padding, eigen, x, w, dy):
  """(dX, dW): XLA's own, but the rewritten cases of the module docstring (point 2)."""
  kh, kw = w.shape[:2]
  taps = kh * kw
  strided = max(strides) > 1
  if eigen:  # compiled with CPU_COMPILER_OPTIONS: Eigen's convolutions
    xla_dx = taps == 1 or not strided
    xla_dw = (kh, kw) == (3, 3) and (strided or padding == ((1, 1), (1, 1)))
  else:  # XLA's default options: YNNPACK's convolutions
    xla_dx, xla_dw = taps == 1, False

  def conv(x_, w_):
    return lax.conv_general_dilated(x_, w_, strides, padding, dimension_numbers=_NHWC)

  dx = (jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0] if xla_dx
        else _input_grad(dy, w, padding, x.shape, strides))
  dw = (_eigen_weight_grad(x, dy, w, strides, padding) if xla_dw
        else _weight_grad(x, dy, (kh, kw), strides, padding, w.dtype))
  return dx, dw


def _eigen_weight_grad(x, dy, w, strides, padding):
  """dW of a 3x3 conv as XLA computes it for Eigen, but reading a materialized `x`.

  XLA's own dW is this convolution: the input transposed to [C, H, W, B] (as the batch of a
  convolution whose features are the images), the output gradient to [H, W, B, O] (as its kernel,
  dilated by the stride), giving [C, kh, kw, O]. Left to itself XLA fuses the BatchNorm and ReLU
  that produce `x` into the transpose: a loop with strided reads from several arrays, 55-110 ms
  at [128, 32, 32, 64] where a plain transposing copy of `x` takes about 20
  (benchmarks/RESULTS.md). `_materialized` keeps that fusion out, so the transpose is a plain
  copy of the `x` the forward pass computed. Stride 1 is written out as XLA emits it; a strided
  conv's is XLA's own transpose rule applied to the materialized `x`.
  """
  if max(strides) > 1:
    xm = _materialized(x, w)
    conv = functools.partial(lax.conv_general_dilated, xm, window_strides=strides,
                             padding=padding, dimension_numbers=_NHWC)
    return jax.vjp(conv, w)[1](dy)[0].astype(w.dtype)
  xt = _materialized(x, w).transpose(3, 1, 2, 0)
  dyt = dy.transpose(1, 2, 0, 3)
  out = lax.conv_general_dilated(xt, dyt, (1, 1), padding, dimension_numbers=_NHWC)
  return out.transpose(1, 2, 0, 3).astype(w.dtype)


def _materialized(x, witness):
  """`x`, as an array XLA fuses none of its producers into the consumers of.

  XLA has no fusion barrier that survives its CPU pipeline (`lax.optimization_barrier` is
  removed before fusion), but it fuses nothing across a conditional. Both branches give `x`
  (x * 1 == x for every float, NaN and -0 included), so the result is `x` whichever runs; they
  differ in form only because JAX forwards a branch that returns its operand unchanged, which
  would drop the conditional. The predicate reads an element of `witness` (the kernel: small
  and, unlike a batch-sharded `x`, on every device, so reading it needs no collective) so that
  XLA cannot fold it; it is False for a NaN, and either branch gives `x`.
  """
  first = witness.reshape(-1)[0]
  return lax.cond(first == first, lambda v: v, lambda v: v * 1, x)


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, w, strides, padding):
  """A float32 convolution and both its gradients as oneDNN's (module docstring, point 3)."""
  return onednn.conv(x, w, strides, padding)


def _onednn_conv_fwd(x, w, strides, padding):
  return _onednn_conv(x, w, strides, padding), (x, w)


def _onednn_conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  dx = onednn.conv_input_grad(dy, w, x.shape, strides, padding)
  dw = onednn.conv_weight_grad(x, dy, w.shape, strides, padding)
  extra = tuple(varying_axes(dw) - varying_axes(w))  # as in _conv_bwd
  return dx, jax.lax.psum(dw, extra) if extra else dw


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def _routable_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, batch_group_count, preferred_element_type):
  """The explicit (non-negative) pads of a 4-D NHWC/HWIO convolution with no dilation, no batch
  groups and no preferred element type: the convolutions this module rewrites; else None."""
  if not (_is_nhwc(dimension_numbers) and lhs.ndim == 4 and batch_group_count == 1
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and preferred_element_type is None):
    return None
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return pads if all(p >= 0 for pair in pads for p in pair) else None


def _flops(x_shape, w_shape, strides, pads) -> int:
  _, ho, wo, _ = onednn.output_shape(x_shape, w_shape, strides, pads)
  kh, kw, c, o = w_shape
  return 2 * x_shape[0] * ho * wo * kh * kw * c * o


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, *, eigen: bool = False,
                         onednn_convs: bool = False):
  """`lax.conv_general_dilated` with the rules of the module docstring where they apply: the
  matmul gradients, or with `eigen` the ones for Eigen's convolutions, or with `onednn_convs`
  oneDNN's for float32 convolutions of at least _ONEDNN_MIN_FLOPS (`Rules` binds the flags)."""
  pads = _routable_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, batch_group_count, preferred_element_type)
  if pads is not None and feature_group_count == 1:
    strides = tuple(int(s) for s in window_strides)
    if (onednn_convs and lhs.dtype == rhs.dtype == jnp.float32
        and _flops(lhs.shape, rhs.shape, strides, pads) >= _ONEDNN_MIN_FLOPS
        and onednn.available()):  # built here, for the first convolution that qualifies
      return _onednn_conv(lhs, rhs, strides, pads)
    return _conv(lhs, rhs, strides, pads, eigen)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count,
                                  batch_group_count=batch_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type)


def depthwise_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                   rhs_dilation=None, dimension_numbers=None,
                                   feature_group_count=1, batch_group_count=1, precision=None,
                                   preferred_element_type=None):
  """A depthwise convolution (one kernel per channel) as kh*kw shifted multiply-adds, for XLA's CPU
  backend; any other convolution is `lax.conv_general_dilated` unchanged.

  Why: XLA's CPU backend runs a convolution with feature_group_count = channels (EfficientNet's
  depthwise convs) 20-50x slower than the same multiply-adds written as kh*kw strided slices of
  the padded input, each times its tap's per-channel weights, summed (one fused elementwise pass;
  batch 64 of EfficientNet-Lite0's shapes at 64x64, ms: 32x32x96 k3 s2 123 -> 6.2, 16x16x144 k3
  171 -> 5.0, 8x8x480 k3 142 -> 4.7; benchmarks/RESULTS.md). Its gradients are JAX's own of
  slices, pads and products: elementwise too. The signature is `lax.conv_general_dilated`'s, so it
  plugs into `nn.Conv` (its `conv_general_dilated` hook) with the parameter tree unchanged.
  """
  c = lhs.shape[-1]
  pads = _routable_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, batch_group_count, preferred_element_type)
  if pads is None or not (feature_group_count == c and rhs.shape[2:] == (1, c)):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count,
                                    batch_group_count=batch_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)
  kh, kw = rhs.shape[:2]
  sh, sw = window_strides
  b, h, w, _ = lhs.shape
  (pt, pb), (pl, pr) = pads
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  xp = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                      (1, sh, sw, 1))
      term = tap * rhs[i, j, 0].astype(lhs.dtype)
      out = term if out is None else out + term
  return out


@dataclasses.dataclass(frozen=True)
class Rules:
  """A convolution with `lax.conv_general_dilated`'s signature that runs the CPU rules (module
  docstring): what a model's `conv` attribute holds, and so what each of its `nn.Conv`s calls.

  `eigen`: the program compiles with CPU_COMPILER_OPTIONS (`jit()`), so convolutions run on Eigen
  and the rules for Eigen apply (point 2); otherwise the rules for XLA's default YNNPACK
  convolutions (every dW and every kh*kw > 1 dX as matmuls). Where this jaxlib rejects those
  options (`jit()` then compiles with XLA's defaults) `with_eigen` makes the YNNPACK rules.
  `onednn`: float32 convolutions and their gradients run on oneDNN (point 3) where
  `onednn.available()`; the model's user vouches that no GSPMD partitioning applies (one device,
  or inside a shard_map over every mesh axis), since XLA would replicate a custom call's operands.
  `depthwise` is the depthwise rule (EfficientNet's depthwise convolutions on a CPU).
  """

  eigen: bool = False
  onednn: bool = False

  @classmethod
  def with_eigen(cls, eigen: bool, onednn: bool = False) -> Rules:
    return cls(eigen=eigen and _options_accepted(), onednn=onednn)

  def __call__(self, lhs, rhs, window_strides, padding, **kwargs):
    return conv_general_dilated(lhs, rhs, window_strides, padding, eigen=self.eigen,
                                onednn_convs=self.onednn, **kwargs)

  @staticmethod
  def depthwise(lhs, rhs, window_strides, padding, **kwargs):
    return depthwise_conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def rules_for_backend() -> Rules | None:
  """What a model is built with: the plain CPU rules on the CPU backend (its forward passes are
  XLA's; its gradients the matmul forms; depthwise convolutions the multiply-adds), None (XLA's
  own convolutions) on GPUs and TPUs."""
  return Rules() if enabled() else None
