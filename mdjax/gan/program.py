"""The compiled program that advances K class GANs by one step, and its three strategies.

Moved out of mdjax.gan.ensemble; see that module's docstring for the strategies and sharding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mdjax.config import GAN_ENSEMBLES as STRATEGIES
from mdjax.errors import ConfigError
from mdjax.gan import class_data

CLASS_AXIS = "class"

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
  from mdjax.gan import step as step_lib  # pylint: disable=import-outside-toplevel
  if hasattr(step_lib, "make_gan_fns"):
    return step_lib.make_gan_fns(gan_config)
  return GanFns(
      init=lambda rng: step_lib.init_gan_state(rng, gan_config),
      step=lambda state, batch, rng: step_lib.gan_step(state, batch, rng, config=gan_config),
      sample=lambda state, rng, n: step_lib.sample(state, rng, n, config=gan_config))


def resolve_strategy(strategy: str, platform: str | None = None) -> str:
  """"auto" -> "map" on CPU, "vmap" elsewhere (see the module docstring)."""
  if strategy not in STRATEGIES:
    raise ConfigError("gan.ensemble", strategy, " | ".join(STRATEGIES))
  if strategy != "auto":
    return strategy
  return "map" if (platform or jax.default_backend()) == "cpu" else "vmap"


def class_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all) with the axis the class dimension is sharded on."""
  devices = list(devices if devices is not None else jax.devices())
  # Auto axis: the host-side code slices single classes out of the stacked state, which explicit
  # sharding would refuse; inside the step shard_map makes the layout explicit anyway.
  return jax.make_mesh((len(devices),), (CLASS_AXIS,), (jax.sharding.AxisType.Auto,),
                       devices=devices)


def class_step(fns: GanFns, gan_state, rng: jax.Array, images: jax.Array, count: jax.Array,
               step: jax.Array, *, batch_size: int):
  """One GAN step of ONE class: draw its batch from its own images, then `fns.step`.

  `images` is that class's padded uint8 [capacity, R, R, 3]; `rng` its stream key; `step` the global
  step. Jitted alone this is exactly what a separate single-class training runs.
  """
  data_key, gan_key = jax.random.split(jax.random.fold_in(rng, step))
  idx = class_data.batch_indices(data_key, count, images.shape[0], batch_size)
  batch = images[idx].astype(jnp.float32) / 127.5 - 1.0
  return fns.step(gan_state, batch, gan_key)


# ------------------------------------------------------------------------------------------------
# The one compiled program.
# ------------------------------------------------------------------------------------------------
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _local_step(ens, images, counts, step, *, fns: GanFns, batch_size: int, strategy: str):
  """Advances this device's classes by one step; ens["gan"] etc. have a leading class axis."""

  def one(gan_state, rng, imgs, count):
    new_state, metrics = class_step(fns, gan_state, rng, imgs, count, step, batch_size=batch_size)
    finite = _all_finite(metrics) & _all_finite(new_state)
    return new_state, metrics, finite

  if strategy == "vmap":
    new_gan, metrics, finite = jax.vmap(one)(ens["gan"], ens["rng"], images, counts)
  elif strategy == "map":
    new_gan, metrics, finite = jax.lax.map(lambda args: one(*args),
                                           (ens["gan"], ens["rng"], images, counts))
  else:
    outs = [one(jax.tree.map(lambda x, i=i: x[i], ens["gan"]), ens["rng"][i], images[i], counts[i])
            for i in range(ens["rng"].shape[0])]
    new_gan, metrics, finite = _stack([o[0] for o in outs]), _stack([o[1] for o in outs]), \
        jnp.stack([o[2] for o in outs])
  new = dict(ens, gan=new_gan, ok=ens["ok"] & finite)
  return new, metrics


@functools.lru_cache(maxsize=16)
def make_ensemble_step(fns: GanFns, *, batch_size: int, strategy: str,
                       mesh: jax.sharding.Mesh) -> Callable:
  """`step(ens, images, counts, step) -> (ens, metrics [K])`: ONE jitted program for K classes.

  `ens` = {"gan": stacked states, "rng": uint32 [K, 2], "ok": bool [K], "restarts": int32 [K]},
  sharded over the mesh's "class" axis with K a multiple of the device count; it is donated.
  Cached, so chunks of one size, resumed runs and tests share one compiled program.
  """
  strategy = resolve_strategy(strategy, mesh.devices.flat[0].platform)
  local = functools.partial(_local_step, fns=fns, batch_size=batch_size, strategy=strategy)
  spec = P(CLASS_AXIS)
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()),
                         out_specs=(spec, spec), check_vma=False)
  return jax.jit(mapped, donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _jit(fn: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
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


def _local_class_state(ens: dict, position: int, mesh: jax.sharding.Mesh):
  """The class at `position`, as arrays on this process's first device (works across processes).

  The class's shard may live on another process's device: it is first replicated to every device
  of the mesh (a collective all processes run), then this process's copy is taken.
  """
  replicated = _replicate_class(mesh)(ens["gan"], jnp.int32(position))
  return jax.tree.map(lambda x: x.addressable_data(0), replicated)


def _to_host(tree):
  """Numpy copy of a class-sharded pytree, the whole of it on every process."""
  return multihost_utils.process_allgather(tree, tiled=True)


def _is_writer() -> bool:
  return jax.process_index() == 0


class _NoWriter:
  """Stands in for the TensorBoard writer on processes other than 0."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


