"""The ONE compiled program that advances K class GANs by one step, and its strategies.

The K states are stacked along a leading "class" axis and one jitted step advances all of them.
Three ways to run the K GANs inside that one program (`gan.ensemble`, the STRATEGIES registry):

* "vmap": `jax.vmap` over the stacked states. The accelerator path: one batched kernel per layer.
  On CPU the convolutions and their gradients are not batched (that makes grouped convolutions,
  slow on XLA's CPU backend): mdjax.core.cpu_conv's batching rules unroll them into K plain
  ones, while every other op (BatchNorm, GLU, losses, Adam, EMA) runs batched over the classes.
* "map": `jax.lax.map` over the stacked states, a loop over the classes inside the one program:
  the single-class step is compiled once (compile time independent of K) and runs as fast as K
  separate programs. The CPU path.
* "unroll": a static Python loop over the K states inside the one jit; compile time grows
  linearly with K.

On a CPU, "map" runs as fast as K separate programs and compiles the single-class step once;
"vmap" (convolutions unrolled per class) steps a little faster but compiles about twice as long,
and "unroll" compiles K times as long. `python benchmarks/gan_ensemble.py --classes 5 --resolution
32` compares a strategy with K separate programs; its figures are in benchmarks/RESULTS.md.

"auto" picks map on CPU and vmap on GPU/TPU.

Several devices: the class axis is sharded over a 1-D mesh with axis "class"
(mdjax.core.mesh.class_mesh) and the step is a `jax.shard_map` of the per-device step: each device
runs its own classes (vmapped, mapped or unrolled over its local classes) with no communication at
all, since the GANs are independent. K is padded to a multiple of the device count with copies of
the chunk's last class (same data, same keys); the copies' results are dropped. On one device
shard_map is the identity.

NaN/inf: the step folds a per-class "all finite" flag (losses and updated parameters) into the
state, to be read by the host at its next logging / sampling / checkpoint point.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from mdjax.core import loop
from mdjax.core.mesh import CLASS_AXIS
from mdjax.errors import ConfigError
from mdjax.gan import class_data
from mdjax.gan import step as step_lib


class GanFns(NamedTuple):
  """The single-class GAN as pure functions (the contract of mdjax.gan.step, config bound)."""
  init: Callable[[jax.Array], Any]                                  # rng -> state
  step: Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]     # state, real [-1,1], rng
  sample: Callable[[Any, jax.Array, int], jax.Array]                # state, rng, n -> [-1, 1]


def default_gan_fns(gan_config: ml_collections.ConfigDict) -> GanFns:
  """The FastGAN of mdjax.gan.step with `gan_config` bound.

  Any object with `init`, `step` and `sample` attributes of the GanFns signatures works as
  `step_fns` (mdjax.gan.step.make_gan_fns returns one).
  """
  return step_lib.make_gan_fns(gan_config)


def _vmapped(one, gan, *per_class):
  return jax.vmap(one)(gan, *per_class)


def _mapped(one, gan, *per_class):
  return lax.map(lambda args: one(*args), (gan, *per_class))


def _unrolled(one, gan, *per_class):
  outs = [one(jax.tree.map(lambda x, i=i: x[i], gan), *(a[i] for a in per_class))
          for i in range(per_class[0].shape[0])]
  return tuple(stack_states(list(part)) for part in zip(*outs))


# How one program runs its K classes: f(one, stacked gan states, *per-class arrays) applies the
# single-class step `one` to every class and stacks its outputs (module docstring).
STRATEGIES: dict[str, Callable] = {"vmap": _vmapped, "unroll": _unrolled, "map": _mapped}
# What `gan.ensemble` accepts: a strategy, or "auto" (resolved per platform).
ENSEMBLES = ("auto", *STRATEGIES)


def resolve_strategy(strategy: str, platform: str | None = None) -> str:
  """"auto" -> "map" on CPU, "vmap" elsewhere (see the module docstring)."""
  if strategy not in ENSEMBLES:
    raise ConfigError("gan.ensemble", strategy, "one of " + ", ".join(ENSEMBLES))
  if strategy != "auto":
    return strategy
  return "map" if (platform or jax.default_backend()) == "cpu" else "vmap"


def class_step(fns: GanFns, gan_state, rng: jax.Array, images: jax.Array, count: jax.Array,
               step: jax.Array, *, batch_size: int, triplet=None, teacher=None):
  """One GAN step of ONE class: draw its batch from its own images, then `fns.step`.

  `images` is that class's padded uint8 [capacity, R, R, 3]; `rng` its stream key; `step` the global
  step. Jitted alone this is exactly what a separate single-class training runs.

  GAN distillation (mdjax.gan.distill): with a `triplet` (a distill.Triplet) and this class's
  `teacher` ({"variables": the frozen classifier's, "hard" / "easy": padded features [capacity, F],
  "hard_count" / "easy_count"}), batches of hard and easy features are drawn too, from a stream of
  their own, and the step is `fns.guided_step` with the triplet term in G's loss. Without them the
  step and its keys are exactly the plain one's.
  """
  data_key, gan_key = jax.random.split(jax.random.fold_in(rng, step))
  idx = class_data.batch_indices(data_key, count, images.shape[0], batch_size)
  batch = images[idx].astype(jnp.float32) / 127.5 - 1.0
  if triplet is None:
    return fns.step(gan_state, batch, gan_key)
  return fns.guided_step(gan_state, batch, gan_key,
                         triplet.g_term_for(teacher, data_key, batch_size))


def stack_states(trees: list) -> Any:
  """Per-class pytrees -> one pytree with a leading class axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _local_step(ens, images, counts, step, teacher=None, *, fns: GanFns, batch_size: int,
                strategy: str, triplet=None):
  """Advances this device's classes by one step; ens["gan"] etc. have a leading class axis.

  With a `triplet`, `teacher` holds the classifier's variables (shared by every class, closed over
  by the per-class step) and the per-class hard / easy features (mapped like the images).
  """
  per_class_teacher = ()
  if triplet is not None:
    per_class_teacher = tuple(teacher[k] for k in _TEACHER_PER_CLASS)

  def one(gan_state, rng, imgs, count, *class_teacher):
    this_teacher = None
    if triplet is not None:
      this_teacher = dict(zip(_TEACHER_PER_CLASS, class_teacher), variables=teacher["variables"])
    new_state, metrics = class_step(fns, gan_state, rng, imgs, count, step, batch_size=batch_size,
                                    triplet=triplet, teacher=this_teacher)
    finite = loop.all_finite(metrics) & loop.all_finite(new_state)
    return new_state, metrics, finite

  new_gan, metrics, finite = STRATEGIES[strategy](one, ens["gan"], ens["rng"], images, counts,
                                                  *per_class_teacher)
  new = dict(ens, gan=new_gan, ok=ens["ok"] & finite)
  return new, metrics


# The teacher's per-class arrays (leading class axis); its "variables" are shared by all classes.
_TEACHER_PER_CLASS = ("hard", "hard_count", "easy", "easy_count")


@functools.lru_cache(maxsize=16)
def make_ensemble_step(fns: GanFns, *, batch_size: int, strategy: str,
                       mesh: jax.sharding.Mesh, triplet=None) -> Callable:
  """`step(ens, images, counts, step) -> (ens, metrics [K])`: ONE jitted program for K classes.

  `ens` = {"gan": stacked states, "rng": uint32 [K, 2], "ok": bool [K], "restarts": int32 [K]},
  sharded over the mesh's "class" axis with K a multiple of the device count; it is donated.
  Cached, so chunks of one size, resumed runs and tests share one compiled program.

  With a `triplet` (GAN distillation, mdjax.gan.distill) the step takes a fifth argument,
  `teacher` = {"variables": the classifier's (replicated), "hard", "easy": float32 [K, capacity, F],
  "hard_count", "easy_count": int32 [K]}: inputs of the program, not constants in it, so every
  round of distillation reuses the one compiled program with a new classifier and new features.
  """
  strategy = resolve_strategy(strategy, mesh.devices.flat[0].platform)
  local = functools.partial(_local_step, fns=fns, batch_size=batch_size, strategy=strategy,
                            triplet=triplet)
  spec = P(CLASS_AXIS)
  if triplet is None:
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()),
                           out_specs=(spec, spec), check_vma=False)
    return jax.jit(mapped, donate_argnums=0)
  teacher_spec = {"variables": P(), **{k: spec for k in _TEACHER_PER_CLASS}}
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(), teacher_spec),
                         out_specs=(spec, spec), check_vma=False)
  return jax.jit(lambda ens, images, counts, step, teacher: mapped(ens, images, counts, step,
                                                                   teacher),
                 donate_argnums=0)


@functools.lru_cache(maxsize=32)
def jit_once(fn: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
  """One jitted wrapper per function, so repeated calls reuse its compiled programs."""
  return jax.jit(fn, static_argnums=static_argnums)


def unstack_class(ens: dict, position: int):
  """The GAN state of the class at `position` of a stacked ensemble (on its device)."""
  return jax.tree.map(lambda x: x[position], ens["gan"])


@functools.cache
def _replicate_class(mesh: jax.sharding.Mesh) -> Callable:
  return jax.jit(
      lambda gan, p: jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, p, keepdims=False), gan),
      out_shardings=NamedSharding(mesh, P()))


def local_class_state(ens: dict, position: int, mesh: jax.sharding.Mesh):
  """The class at `position`, as arrays on this process's first device (works across processes).

  The class's shard may live on another process's device: it is first replicated to every device
  of the mesh (a collective all processes run), then this process's copy is taken.
  """
  replicated = _replicate_class(mesh)(ens["gan"], jnp.int32(position))
  return jax.tree.map(lambda x: x.addressable_data(0), replicated)
