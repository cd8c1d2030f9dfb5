"""A convolution whose gradients XLA's CPU backend computes as matrix products.

Why: on XLA's CPU backend the weight gradient of a convolution takes several times as long as the
forward conv, while the input gradient costs about one forward conv (figures:
benchmarks/RESULTS.md). XLA lowers dW as a convolution whose "batch" is the input channels and
whose kernel is the whole output gradient, a shape its CPU runtime handles badly. The same sum,
written as one matmul per kernel tap,
  dW[i, j] = X_shifted(i, j)^T @ dY   ([C, B*Ho*Wo] @ [B*Ho*Wo, O]),
runs several times faster (matmul-shaped work is what the CPU backend is good at); for few input
channels (a 7x7 RGB stem) one matmul over im2col patches is better than 49 thin ones.

The per-tap form copies the shifted input kh*kw times, and over a whole batch those copies cost
more than the matmuls they feed (a 64->64 3x3 conv at 32x32, batch 128: nine 33 MB copies). So a
kh*kw > 1 weight gradient loops (`lax.scan`) over chunks of the batch of about _DW_CHUNK_ROWS
output pixels, summing each chunk's taps: the copies then stay in the cache. That layer's dW went
from 220-234 ms to 103-107 ms, the WRN-16-4 b128 step from 2.28 to 1.94-2.10 s and the FastGAN
256x256 iteration from 6.1-6.3 to 5.4-5.5 s (benchmarks/RESULTS.md). XLA's cost analysis counts
the loop's body once: benchmarks count FLOPs on a twin with XLA's own gradients (`xla_conv_grads`).

Scope: only used on the CPU backend (`enabled()`), only for plain NHWC/HWIO convolutions (no
dilation, no feature groups); everything else calls `lax.conv_general_dilated` unchanged, and
GPUs/TPUs never see this code (cuDNN's own gradients are fast). The forward pass and the input
gradient of 1x1 convs are XLA's own. dW, and dX of every kh*kw > 1 conv (`_input_grad`, added for
FastGAN's large maps), are rewritten; both are checked against `jax.grad` in
tests/test_cpu_conv.py. A forward pass as im2col + one matmul was tried and not kept: on FastGAN it
was slower than XLA's own forward conv.

Under `jax.vmap` with per-model kernels (the GAN ensemble's "vmap" strategy), batching rules
(`jax.custom_batching.custom_vmap`) run the conv and these gradients once per model instead of as
grouped convolutions and batched matmuls; see the comment above `_once_per_kernel`.

It reaches the models without changing them: `use_fast_conv_grads()` is a Flax method interceptor
that, inside its `with` block, makes every `nn.Conv` call this function instead of
`lax.conv_general_dilated` (flax.linen.Conv's own `conv_general_dilated` hook).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
# Below this many input channels one im2col matmul beats kh*kw thin per-tap matmuls.
_PATCHES_BELOW_CHANNELS = 16
# dW of a kh*kw > 1 conv loops over chunks of the batch with about this many output pixels each
# (rows of its matmuls): measured best of 1024-16384 (benchmarks/RESULTS.md).
_DW_CHUNK_ROWS = 2048
# Set inside `xla_conv_grads()`: use_fast_conv_grads then leaves every conv to XLA.
_xla_only = False


def varying_axes(x) -> frozenset:
  """The shard_map axes over which `x` differs between devices (empty outside shard_map)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; older releases call it .vma
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def enabled() -> bool:
  return jax.default_backend() == "cpu"


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
# activations, optimizer) stays batched. With a kernel shared by the batch, vmap's own rules apply
# (they fold the batch into the conv's batch dimension).


def _once_per_kernel(fn: Callable) -> Callable:
  """`fn(x, w, ...)`, whose vmap over a batched kernel `w` runs `fn` once per kernel."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    if not in_batched[1]:  # a shared kernel: vmap's own rules
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return _plain_conv(strides, padding)(x, w)


def _conv_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


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


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  dx, dw = _plain_bwd(strides, padding)(x, w, dy)
  # Under shard_map, a replicated kernel applied to per-device data is implicitly made per-device,
  # and that cast's transpose sums over the devices: do what JAX's own rule would.
  extra = tuple(varying_axes(dw) - varying_axes(w))
  return dx, jax.lax.psum(dw, extra) if extra else dw


@functools.cache
def _plain_bwd(strides, padding):
  return _once_per_kernel(functools.partial(_conv_bwd_one, strides, padding))


def _conv_bwd_one(strides, padding, x, w, dy):
  if w.shape[0] * w.shape[1] > 1:
    dx = _input_grad(dy, w, padding, x.shape, strides)
  else:
    _, x_vjp = jax.vjp(lambda x_: lax.conv_general_dilated(x_, w, strides, padding,
                                                             dimension_numbers=_NHWC), x)
    (dx,) = x_vjp(dy)
  dw = _weight_grad(x, dy, w.shape[:2], strides, padding, w.dtype)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the matmul weight gradient where it applies."""
  plain = (_is_nhwc(dimension_numbers) and feature_group_count == 1 and batch_group_count == 1
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and preferred_element_type is None and lhs.ndim == 4)
  if plain:
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if all(p >= 0 for pair in pads for p in pair):
      return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count,
                                  batch_group_count=batch_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name == "__call__" and isinstance(module, nn.Conv)
      and module.conv_general_dilated is None and module.conv_general_dilated_cls is None):
    # Flax modules are frozen dataclasses; the hook is set for this call only and restored.
    object.__setattr__(module, "conv_general_dilated", conv_general_dilated)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "conv_general_dilated", None)
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def use_fast_conv_grads(enable: bool | None = None):
  """Within the block (while tracing), flax Convs use `conv_general_dilated` above.

  `enable=None` turns it on for the CPU backend only; inside `xla_conv_grads()` it is off."""
  if enable is None:
    enable = enabled()
  if not enable or _xla_only:
    yield
    return
  with nn.intercept_methods(_interceptor):
    yield


@contextlib.contextmanager
def xla_conv_grads():
  """Within the block (while tracing), `use_fast_conv_grads` changes nothing: every convolution
  keeps XLA's own gradients.

  For counting a step's FLOPs (benchmarks/machine.py): XLA's cost analysis counts the body of a
  loop once, and the weight gradients here loop over chunks of the batch; XLA's own gradients do
  the same multiply-adds with no loop. Trace a fresh function inside it (jit caches traces).
  """
  global _xla_only  # pylint: disable=global-statement
  previous, _xla_only = _xla_only, True
  try:
    yield
  finally:
    _xla_only = previous
