"""The ONE compiled program that advances K class GANs by one step, and its strategies.

The K states are stacked along a leading "class" axis and one jitted step advances all of them.
Three ways to run the K GANs inside that one program (`gan.ensemble`, the STRATEGIES registry):

* "vmap": `jax.vmap` over the stacked states. The accelerator path: one batched kernel per layer.
  On CPU the convolutions and their gradients are not batched (that makes grouped convolutions,
  slow on XLA's CPU backend): mdjax.core.cpu_conv's batching rules unroll them into K plain
  ones, while every other op (BatchNorm, GLU, losses, Adam, EMA) runs batched over the classes.
* "map": `jax.lax.map` over the stacked states, a loop over the classes inside the one program:
  the single-class step is compiled once (compile time independent of K) and runs as fast as K
  separate programs. The CPU path on several devices; a device with one class runs its step
  with no loop around it.
* "unroll": a static Python loop over the K states inside the one jit; compile time grows
  linearly with K.
* "per_class": no loop inside a program: the single-class step is compiled once (donating the
  class's state) and the host runs it for each class in turn, every class keeping its state in
  buffers of its own (`ens["gan"]` is a list of K states; checkpoints stay stacked:
  `stacked_layout` / `per_class_layout`). One device only. The CPU path: as fast as K separate
  programs by construction and compiled once, where "map" pays for moving each class's state in
  and out of the stacked arrays, which at the full width (568 MB a class at ngf = ndf = 64) made
  it 0.59-0.68x of separate programs (benchmarks/RESULTS.md, "Why one program loses at width 64").

On a CPU at width 16, "map" runs as fast as K separate programs and compiles the single-class
step once; "vmap" (convolutions unrolled per class) steps a little faster but compiles about twice
as long, and "unroll" compiles K times as long. At width 64 only "per_class" keeps up.
`python benchmarks/gan_ensemble.py --classes 5 --resolution 32` compares a strategy with K
separate programs; its figures are in benchmarks/RESULTS.md.

"auto" picks per_class on one CPU device, map on several CPU devices, vmap on GPU/TPU.

Several devices: the class axis is sharded over a 1-D mesh with axis "class"
(mdjax.core.mesh.class_mesh) and the step is a `jax.shard_map` of the per-device step: each device
runs its own classes (vmapped, mapped or unrolled over its local classes) with no communication at
all, since the GANs are independent. K is padded to a multiple of the device count with copies of
the chunk's last class (same data, same keys); the copies' results are dropped. On one device
shard_map is the identity.

Stopped classes: `ens["active"]` (bool [K]) says which classes still train (mdjax.gan.monitor stops
a class once its images pass the judge). A program built with `masked=True` keeps a stopped class's
state as it is: under vmap, map and unroll the class's step is computed with the others and its
result discarded (one select per leaf: the classes run in lockstep inside one program), under
per_class the host does not call its step at all. Without `masked` (every class trains the same
steps) the program has no select.

NaN/inf: the step folds a per-class "all finite" flag of the losses into the state; the host
reads it at its next logging / sampling / checkpoint point together with a check of every class's
whole state (`states_finite`). Checking the state there rather than in every step finds the same
failures, because a NaN/inf in a GAN's state persists (every leaf's update reads its old value),
and spares the step a read of the whole state: 0.07 s per class at the full width, where a class's
state is 568 MB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from mdjax.core import loop
from mdjax.core.mesh import CLASS_AXIS
from mdjax.errors import ConfigError, UserError
from mdjax.gan import class_data
from mdjax.gan import step as step_lib


# The single-class GAN as pure functions: mdjax.gan.step's contract (init, step, sample; the
# FastGAN there also has guided_step for distillation). Any GANFns with the first three works.
GANFns = step_lib.GANFns


def default_gan_fns(gan_config: ml_collections.ConfigDict, grey_data: bool = False) -> GANFns:
  """The FastGAN of mdjax.gan.step with `gan_config` bound (`grey_data`: the classes' images are
  all grey, for `gan.colour = "auto"`).

  Any object with `init`, `step` and `sample` attributes of the GANFns signatures works as
  `step_fns` (mdjax.gan.step.make_gan_fns returns one).
  """
  return step_lib.make_gan_fns(gan_config, grey_data)


def _vmapped(one, gan, *per_class):
  return jax.vmap(one)(gan, *per_class)


def _mapped(one, gan, *per_class):
  if per_class[0].shape[0] == 1:
    # One class on this device (K no larger than the device count): the class's step as it is,
    # with no loop around it. XLA compiled the smoke FastGAN step 29.9 s at backend level 0
    # inside a one-trip `lax.map` loop and 21.8 s without it (4 CPU devices, one class each).
    return _unrolled(one, gan, *per_class)
  return lax.map(lambda args: one(*args), (gan, *per_class))


def _unrolled(one, gan, *per_class):
  outs = [one(jax.tree.map(lambda x, i=i: x[i], gan), *(a[i] for a in per_class))
          for i in range(per_class[0].shape[0])]
  return tuple(stack_states(list(part)) for part in zip(*outs))


# How one program runs its K classes: f(one, stacked gan states, *per-class arrays) applies the
# single-class step `one` to every class and stacks its outputs (module docstring).
STRATEGIES: dict[str, Callable] = {"vmap": _vmapped, "unroll": _unrolled, "map": _mapped}
# The strategy that runs the single-class program once per class from the host (module docstring).
PER_CLASS = "per_class"
# What `gan.ensemble` accepts: a strategy, or "auto" (resolved per platform and device count).
ENSEMBLES = ("auto", *STRATEGIES, PER_CLASS)


def resolve_strategy(strategy: str, platform: str | None = None, devices: int | None = None) -> str:
  """"auto" -> "per_class" on one CPU device, "map" on several, "vmap" elsewhere (module docstring).

  `devices` is the size of the class mesh (default: every device of this run)."""
  if strategy not in ENSEMBLES:
    raise ConfigError("gan.ensemble", strategy, "one of " + ", ".join(ENSEMBLES))
  if strategy != "auto":
    return strategy
  if (platform or jax.default_backend()) != "cpu":
    return "vmap"
  return PER_CLASS if (jax.device_count() if devices is None else devices) == 1 else "map"


def class_step(fns: GANFns, gan_state, rng: jax.Array, images: jax.Array, count: jax.Array,
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


def _checked_class_step(fns: GANFns, gan_state, rng, images, count, step, *, batch_size: int,
                        triplet=None, teacher=None):
  """`class_step`, plus the class's "all finite" flag of its losses (module docstring)."""
  new_state, metrics = class_step(fns, gan_state, rng, images, count, step, batch_size=batch_size,
                                  triplet=triplet, teacher=teacher)
  return new_state, metrics, loop.all_finite(metrics)


@functools.cache
def _finite_states(per_class: bool) -> Callable:
  if per_class:
    # One program for one class's state, run for each class: compiled once whatever K. One
    # program over the list of K states was fused into one kernel by XLA and compiled in 4.2 s
    # for K = 2 and 34.6 s for K = 5 (the smoke config's 327-leaf states; this one: 2.4 s).
    one = jax.jit(loop.all_finite)
    fold = jax.jit(lambda ok, finite: ok & jnp.stack(finite))

    def check(ok, gan):
      return fold(ok, [one(s) for s in gan])
    check.class_program = one  # for tests: the one program that reads a state
    return check
  return jax.jit(lambda ok, gan: ok & jax.vmap(loop.all_finite)(gan))


def states_finite(ens: dict) -> jax.Array:
  """bool [K], laid out like ens["ok"]: no NaN/inf in a class's losses since the flag was last
  reset, nor in its current state (module docstring). A collective in multi-process runs."""
  return _finite_states(isinstance(ens["gan"], list))(ens["ok"], ens["gan"])


def _position_step(gan_state, rngs, images, counts, step, position, teacher=None, *, fns: GANFns,
                   batch_size: int, triplet=None):
  """The "per_class" program: the class at `position` of the stacked per-class inputs (its RNG,
  images, count, teacher features: small) advanced from its own `gan_state` (module docstring)."""
  def pick(x):
    return lax.dynamic_index_in_dim(x, position, keepdims=False)
  class_teacher = None
  if triplet is not None:
    class_teacher = dict({k: pick(teacher[k]) for k in _TEACHER_PER_CLASS},
                         variables=teacher["variables"])
  return _checked_class_step(fns, gan_state, pick(rngs), pick(images), pick(counts), step,
                             batch_size=batch_size, triplet=triplet, teacher=class_teacher)


def _per_class_step(fns: GANFns, *, batch_size: int, mesh: jax.sharding.Mesh,
                    triplet=None, masked: bool = False) -> Callable:
  """The "per_class" ensemble step: same signature and results as the one-program steps, with
  `ens["gan"]` a list of the K classes' states (each donated to its class's call). With `masked`
  a stopped class (`ens["active"]` false) is not stepped; its metrics are NaN."""
  if mesh.size != 1:
    raise UserError(f"gan.ensemble={PER_CLASS} runs the classes on one device, but the class mesh "
                    f"has {mesh.size}; use map or vmap (or auto) on several devices.")
  one = jax.jit(functools.partial(_position_step, fns=fns, batch_size=batch_size,
                                  triplet=triplet), donate_argnums=0)
  gather = jax.jit(lambda ok, finite, metrics: (ok & jnp.stack(finite), stack_states(metrics)))
  positions = []  # each class's position as a device scalar, made once rather than every step

  def step(ens, images, counts, step, teacher=None):
    positions.extend(jnp.int32(p) for p in range(len(positions), len(ens["gan"])))
    active = np.asarray(ens["active"]) if masked else np.ones(len(ens["gan"]), bool)
    outs = {p: one(state, ens["rng"], images, counts, step, positions[p], teacher)
            for p, state in enumerate(ens["gan"]) if active[p]}
    like = next(iter(outs.values()))[1]
    skipped = jax.tree.map(lambda m: jnp.full_like(m, jnp.nan), like) if len(outs) < len(active) \
        else None
    finite = [outs[p][2] if p in outs else jnp.bool_(True) for p in range(len(active))]
    metrics = [outs[p][1] if p in outs else skipped for p in range(len(active))]
    ok, metrics = gather(ens["ok"], finite, metrics)
    gan = [outs[p][0] if p in outs else state for p, state in enumerate(ens["gan"])]
    return dict(ens, gan=gan, ok=ok), metrics

  step.class_program = one  # for benchmarks/gan_ensemble.py: lowered and compiled alone
  return step


# The two layouts' conversions move one class per call, so each is one small program whatever K:
# programs over all K classes at once (K x 327 leaves at the smoke config) took 1.4 s (unstack) and
# 1.3 s (stack) to compile at K = 2 and 7.7 s and 2.6 s at K = 10 (benchmarks/RESULTS.md).
@jax.jit
def _pick_class(gan, position):
  return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, position, keepdims=False), gan)


@functools.partial(jax.jit, donate_argnums=0)
def _put_class(gan, state, position):
  return jax.tree.map(lambda x, s: lax.dynamic_update_index_in_dim(x, s, position, 0), gan, state)


@functools.partial(jax.jit, static_argnums=1)
def _repeat_class(state, k: int):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), state)


def per_class_layout(ens: dict) -> dict:
  """A stacked ensemble (leading class axis) -> the "per_class" layout (`ens["gan"]` a list)."""
  if isinstance(ens["gan"], list):
    return ens
  return dict(ens, gan=[_pick_class(ens["gan"], jnp.int32(p)) for p in range(ens["ok"].shape[0])])


def stacked_layout(ens: dict) -> dict:
  """The inverse of `per_class_layout` (what checkpoints hold); a stacked ensemble is returned
  as is."""
  if not isinstance(ens["gan"], list):
    return ens
  states = ens["gan"]
  stacked = _repeat_class(states[0], len(states))  # class 0 in every row; the others over it
  for p, state in enumerate(states[1:], start=1):
    stacked = _put_class(stacked, state, jnp.int32(p))
  return dict(ens, gan=stacked)


def _local_step(ens, images, counts, step, teacher=None, *, fns: GANFns, batch_size: int,
                strategy: str, triplet=None, masked: bool = False):
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
    return _checked_class_step(fns, gan_state, rng, imgs, count, step, batch_size=batch_size,
                               triplet=triplet, teacher=this_teacher)

  new_gan, metrics, finite = STRATEGIES[strategy](one, ens["gan"], ens["rng"], images, counts,
                                                  *per_class_teacher)
  if masked:  # a stopped class keeps its state; its discarded step cannot flag it
    active = ens["active"]
    new_gan = jax.tree.map(
        lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
        new_gan, ens["gan"])
    finite = finite | ~active
    metrics = jax.tree.map(lambda m: jnp.where(active, m, jnp.nan), metrics)
  new = dict(ens, gan=new_gan, ok=ens["ok"] & finite)
  return new, metrics


# The teacher's per-class arrays (leading class axis); its "variables" are shared by all classes.
_TEACHER_PER_CLASS = ("hard", "hard_count", "easy", "easy_count")


@functools.lru_cache(maxsize=16)
def make_ensemble_step(fns: GANFns, *, batch_size: int, strategy: str,
                       mesh: jax.sharding.Mesh, triplet=None, masked: bool = False) -> Callable:
  """`step(ens, images, counts, step) -> (ens, metrics [K])`: ONE jitted program for K classes.

  `ens` = {"gan": stacked states, "rng": uint32 [K, 2], "ok": bool [K], "restarts": int32 [K],
  "active": bool [K]}, sharded over the mesh's "class" axis with K a multiple of the device count;
  it is donated. With `masked`, classes whose "active" flag is down keep their state (module
  docstring) and report NaN metrics. Cached, so chunks of one size, resumed runs and tests share
  one compiled program.

  With a `triplet` (GAN distillation, mdjax.gan.distill) the step takes a fifth argument,
  `teacher` = {"variables": the classifier's (replicated), "hard", "easy": float32 [K, capacity, F],
  "hard_count", "easy_count": int32 [K]}: inputs of the program, not constants in it, so every
  round of distillation reuses the one compiled program with a new classifier and new features.
  """
  strategy = resolve_strategy(strategy, mesh.devices.flat[0].platform, mesh.size)
  if strategy == PER_CLASS:
    return _per_class_step(fns, batch_size=batch_size, mesh=mesh, triplet=triplet, masked=masked)
  local = functools.partial(_local_step, fns=fns, batch_size=batch_size, strategy=strategy,
                            triplet=triplet, masked=masked)
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
  """The GAN state of the class at `position` of an ensemble (on its device)."""
  if isinstance(ens["gan"], list):
    return ens["gan"][position]
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
  if isinstance(ens["gan"], list):  # "per_class": one device, this process's
    return ens["gan"][position]
  replicated = _replicate_class(mesh)(ens["gan"], jnp.int32(position))
  return jax.tree.map(lambda x: x.addressable_data(0), replicated)
