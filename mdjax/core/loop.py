"""Small pieces of a training loop: when to log, checkpoint or sample; whether values are finite.

Loops keep their metrics on device and read them only at the points `itstime` picks, so the host
does not wait for every step; non-finite values are found there (host side) or folded into the
state by the step itself (`all_finite`, device side) to be read at the next such point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def itstime(step: int, every: int, total: int | None = None) -> bool:
  """Whether `step` (counted from 1) is a multiple of `every`, or the last step `total`.

  As big_vision's `u.itstime`: the last step always counts, so a run whose length is not a multiple
  of `every` still logs and checkpoints its end. `every <= 0` means never (except the last step).
  """
  return (every > 0 and step % every == 0) or (total is not None and step == total)


def all_finite(tree: Any) -> jax.Array:
  """A device boolean: every floating-point leaf of `tree` is free of NaN and inf (jittable)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def first_non_finite(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> int | None:
  """The index of the first host row in which one of `keys` is NaN or inf; None if there is none."""
  for i, row in enumerate(rows):
    if not all(math.isfinite(float(row[k])) for k in keys):
      return i
  return None
