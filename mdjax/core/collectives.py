"""A mean over a mesh axis whose bits do not depend on how the devices are spread over processes.

`jax.lax.pmean` leaves the order of the additions to the collective's implementation, and that
order changes with the process layout: on CPU, the devices of one process are reduced by XLA's
in-process all-reduce, those of several processes by gloo's, which splits and orders the sum
differently. The means then differ in the last bits (1e-8 in the classifier's parameters after one
SAM step, measured with 1 process x 4 devices against 2 x 2), and training amplifies that into
different weak classes and accuracies a few hundred steps later. GPUs likewise: NCCL picks its
ring or tree by topology.

`ordered_mean` adds the devices' values in device order (device 0 first) on every device, so the
result is the same bits for 1 x 4, 2 x 2 or 4 x 1, and on every device. Only exact operations
cross devices:

  1. every leaf is flattened into one vector per dtype, cut into n chunks (n = the axis size);
  2. `all_to_all` sends chunk i of every device to device i (data movement only);
  3. device i adds its n copies of chunk i in device order and divides by n;
  4. each device writes its chunk into its own row of an [n, chunk] array of zeros, and a `psum`
     of those arrays gathers the chunks: every element is one value plus zeros, which is exact
     in any order. (`psum` rather than `all_gather` because its result is invariant over the
     axis, which shard_map's out_specs=P() requires; jax has no public invariant all_gather.)

The traffic is one all_to_all and one all-reduce of the vector: about twice a plain all-reduce's,
for a classifier's gradient (the only large input) a small part of a step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _as_varying(x: jax.Array, axis_name: str) -> jax.Array:
  # all_to_all takes values that differ between devices; an invariant leaf (the same everywhere)
  # is marked varying first. Outside a checked shard_map there is nothing to mark.
  typ = jax.typeof(x)
  manual = getattr(typ, "manual_axis_type", None)
  varying = manual.varying if manual is not None else getattr(typ, "vma", None)
  if varying is None or axis_name in varying:
    return x
  return jax.lax.pcast(x, axis_name, to="varying")


def _ordered_mean_vector(flat: jax.Array, axis_name: str, n: int) -> jax.Array:
  size = flat.shape[0]
  chunk = max(1, math.ceil(size / n))
  rows = jnp.pad(flat, (0, chunk * n - size)).reshape(n, chunk)
  # Row j of `parts` is device j's copy of this device's chunk.
  parts = jax.lax.all_to_all(_as_varying(rows, axis_name), axis_name, 0, 0, tiled=True)
  total = parts[0]
  for j in range(1, n):  # device order, one add at a time: no reassociation
    total = total + parts[j]
  mean = total / jnp.asarray(n, flat.dtype)
  slots = jnp.zeros((n, chunk), flat.dtype)
  slots = jax.lax.dynamic_update_slice(slots, mean[None], (jax.lax.axis_index(axis_name), 0))
  return jax.lax.psum(slots, axis_name).reshape(-1)[:size]


def ordered_mean(tree: Any, axis_name: str) -> Any:
  """`jax.lax.pmean(tree, axis_name)` summed in device order (module docstring).

  For use inside `jax.shard_map` over `axis_name`; floating-point leaves only. The result is
  invariant over the axis (the same on every device).
  """
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  n = jax.lax.axis_size(axis_name)
  if n == 1:
    # One device: nothing to order. pmean (exact here: x / 1) still marks the result invariant
    # over the axis, which shard_map's out_specs=P() needs.
    return jax.lax.pmean(tree, axis_name)
  out: list[jax.Array | None] = [None] * len(leaves)
  by_dtype: dict[np.dtype, list[int]] = {}
  for i, leaf in enumerate(leaves):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"ordered_mean takes floating-point leaves; got {dtype}")
    by_dtype.setdefault(dtype, []).append(i)
  for dtype, idx in by_dtype.items():
    flat = jnp.concatenate([jnp.ravel(leaves[i]).astype(dtype) for i in idx])
    mean = _ordered_mean_vector(flat, axis_name, n)
    offset = 0
    for i in idx:
      shape = jnp.shape(leaves[i])
      size = int(np.prod(shape, dtype=np.int64))
      out[i] = mean[offset:offset + size].reshape(shape)
      offset += size
  return jax.tree.unflatten(treedef, out)


def varying_axes(x) -> frozenset:
  """The shard_map axes over which `x` differs between devices (empty outside shard_map)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; older releases call it .vma
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))
