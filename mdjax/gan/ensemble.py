"""One FastGAN per weak class, all trained by ONE compiled program (Algorithm 1, line 8).

Each selected class gets an independent GAN: its own parameters, optimizer states, EMA generator
and RNG stream (`fold_in(PRNGKey(seed), class_index)`, so a class's result does not depend on which
other classes share its program or chunk). The K states are stacked along a leading "class" axis
and one jitted step advances all of them.

Three ways to run the K GANs inside that one program (`gan.ensemble`):

* "vmap": `jax.vmap` over the stacked states. The accelerator path: one batched kernel per layer.
  On CPU the convolutions and their gradients are not batched (that makes grouped convolutions,
  slow on XLA's CPU backend): mdjax.core.cpu_conv's batching rules unroll them into K plain
  ones, while every other op (BatchNorm, GLU, losses, Adam, EMA) runs batched over the classes.
* "map": `jax.lax.map` over the stacked states, a loop over the classes inside the one program:
  the single-class step is compiled once (compile time independent of K) and runs as fast as K
  separate programs. The CPU path.
* "unroll": a static Python loop over the K states inside the one jit; compile time grows
  linearly with K.

Measured on this 2-core CPU with benchmarks/gan_ensemble.py (K = 5 one program against 5
separately compiled single-class steps, interleaved; ngf = ndf = 16, nz 64, batch 8, the default
config's width; quiet machine):

  32x32   map 0.918 s/step vs separate 0.913 s (1.00x), compile 43 s vs 30 s
          unroll 0.93-1.11 s vs 1.01 s (1.08x and 0.91x in two runs), compile 200-270 s
          vmap with grouped convs 1.35 s/step (compile 40 s); 1.14 s with forward convs as batched
          im2col matmuls; with convs and their gradients unrolled per class (the vmap path now)
          0.848 s vs 0.940 s (1.11x, profile: 1.37 busy threads vs 1.31, 1.19 vs 1.24 s of op
          time per step), compile 79 s vs 31 s
  64x64   map 1.875 s/step vs separate 1.952 s (1.04x), compile 50 s vs 41 s
          unroll 1.876 vs 1.873 s (1.00x), compile 484 s vs 43 s
          vmap (convs unrolled) 1.580 vs 1.619 s (1.02x), compile 102 s vs 40 s

REFERENCE.md section 6 measured naive vmap 4x slower and an unrolled program 1.3x faster than
separate programs, but against separate programs running XLA's own convolution gradients. With
those as matmuls (mdjax.core.cpu_conv) a single-class step is compute-bound (11 GFLOP at ~60
GFLOP/s at 32x32, and 87% parallel efficiency on the 2 cores: 0.33 s on one core against 0.19 s
on two), so one program has little left to save: no form reached 1.3x here. Profiled
(`benchmarks/gan_ensemble.py --profile`, K = 5, 32x32, quiet machine): the separate steps keep at
least 1.31 worker threads busy inside HLO ops on average (a lower bound: YNNPACK's helper work on
the other core is not traced); the unrolled program overlaps more (1.44) but its ops then take 18%
longer (1.33 against 1.13 s of op time per step), so the wall time stays the same (0.88 against
0.87 s): the two cores are already in use. The map program: 1.27 against 1.30, 0.94 against 0.95 s.
What vmap (convs unrolled) saves is the small ops: a single-class step at 32x32 runs ~4,000 HLO
ops, ~3,500 of them under 100 us (47 ms of its 0.23 s of op time); batched over the classes they
are K times fewer. The convolutions' matmuls, most of the time, are the same work either way.
Sharding the classes over two CPU devices (one per core) was slower too (0.83x unrolled, 0.61x
vmapped). The full-width FastGAN (ngf = ndf = 64, 32x32, K = 5) measured one program and separate
programs at parity (42.5 vs 39.6 s per step under load, before the matmul gradients), and the
unrolled program took 17 min to compile against 2.7 min for the single-class one.

"auto" picks map on CPU and vmap on GPU/TPU. Classes are trained in chunks of at most
`gan.chunk_size` (Stanford Cars selects 40 weak classes; 40 stacked FastGAN states or 40 unrolled
copies of the step are more than one program should hold): chunks run one after the other, their
sizes are balanced (10 classes with chunk_size 8 -> 5 + 5, not 8 + 2) and every chunk uses the same
padded image capacity, so all chunks of one size share one compiled program.

Several devices: the class axis is sharded over a 1-D mesh with axis "class" and the step is a
`jax.shard_map` of the per-device step: each device runs its own classes (vmapped, mapped or
unrolled over its local classes) with no communication at all, since the GANs are independent. K is
padded to a multiple of the device count with copies of the chunk's last class (same data, same
keys); the copies' results are dropped. On one device shard_map is the identity.

Several processes (launch/local.sh, SLURM): the mesh spans every process's devices, so each
process steps only its own classes. Every process runs the same host loop; what the host reads
(losses, NaN flags) is gathered from all processes (`multihost_utils.process_allgather`), a class's
state for sample grids and generation is first replicated to every device (`_local_class_state`),
so each process samples it locally, and only process 0 writes files (grids, meta.json,
TensorBoard); orbax checkpoints the sharded state collectively.

Data: the classes' images are stacked into one uint8 array [K, capacity, R, R, 3] padded with zeros
beyond each class's count, kept on device (sharded like the states), and each step draws a batch
for class k from row k only: indices are a random permutation of [0, count_k) (padding slots get a
score above every real one, so they are never chosen), so a class can never see another class's
images or padding. Within a batch sampling is without replacement (with wrap-around when a class has
fewer images than the batch). Images are resized to `gan.resolution` here with PIL bicubic
(non-square images are stretched; crop before calling if that matters) and mapped to [-1, 1] inside
the step.

Randomness: step s of class k uses `fold_in(rng_k, s)`, split into a data key and the GAN step's
key, so resuming from a checkpoint at step s replays exactly what uninterrupted training does.

NaN/inf: the step folds a per-class "all finite" flag (losses and updated parameters) into the
state, so a non-finite value at any step is seen at the next logging / sampling / checkpoint point
(the host only reads it there, keeping the loop asynchronous). Then the whole chunk is restored from
its last checkpoint (always good: the flag is checked before every save), the failing classes'
RNG streams are refolded (`fold_in(rng_k, restarts_k)`) and training continues with a warning.
The healthy classes replay the same steps with the same keys, so their results are unchanged.
After `max_nan_restarts` failures of one class, training stops with NonFiniteLossError.

Workdir layout: `chunk_<j>/meta.json` (which classes and data the checkpoints belong to; a mismatch
on resume is a UserError, never a silent mix), `chunk_<j>/checkpoints/` (orbax: stacked states,
per-class RNG, restarts, step), `samples/class_<k>/step_<s>.png` grids from the EMA generator with a
fixed noise per class plus `real.png`, and `tensorboard/` with per-class scalars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mdjax.config import GAN_ENSEMBLES as STRATEGIES
from mdjax.errors import ConfigError, DataError, NonFiniteLossError, UserError
from mdjax.gan import generate

CLASS_AXIS = "class"
GRID_SIZE = 16
# fold_in constants separating a class's key streams (training uses the class key itself).
_GRID_STREAM, _GENERATE_STREAM = 1_000_001, 1_000_002


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


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------
def prepare_class_images(images: np.ndarray, resolution: int, *, class_index: int = -1) -> np.ndarray:
  """Checks one class's images and resizes them to uint8 [N, R, R, 3] (PIL bicubic)."""
  images = np.asarray(images)
  where = f"class {class_index}" if class_index >= 0 else "images"
  if images.dtype != np.uint8:
    raise DataError(f"{where}: expected uint8 images, got {images.dtype}. Convert with "
                    "np.clip(x * 255, 0, 255).astype(np.uint8) for images in [0, 1].")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(f"{where}: expected images [N, H, W, 3] (or grayscale [N, H, W]), got shape "
                    f"{images.shape}.")
  if len(images) == 0:
    raise DataError(f"{where}: no images; a class GAN needs at least one training image.")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if images.shape[1:3] != (resolution, resolution):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    images = np.stack([
        np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC))
        for im in images])
  return np.ascontiguousarray(images)


def stack_class_images(images_per_class: Sequence[np.ndarray],
                       capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-class uint8 [N_k, R, R, 3] -> (uint8 [K, capacity, R, R, 3] zero-padded, int32 counts [K])."""
  counts = np.asarray([len(x) for x in images_per_class], np.int32)
  capacity = int(capacity or counts.max())
  shape = images_per_class[0].shape[1:]
  stacked = np.zeros((len(images_per_class), capacity) + shape, np.uint8)
  for k, x in enumerate(images_per_class):
    stacked[k, :len(x)] = x
  return stacked, counts


def batch_indices(key: jax.Array, count: jax.Array, capacity: int, batch_size: int) -> jax.Array:
  """`batch_size` indices in [0, count): a random subset (wrapping when count < batch_size).

  Written by hand because `jax.random.choice(replace=False)` needs a static population size, and
  the count differs per class inside one vmapped/mapped/unrolled program. Image i gets the score
  `uniform(fold_in(key, i))`, which does not depend on `capacity`, so a class draws the same
  batches whatever the other classes' sizes (its result does not depend on its chunk).
  """
  scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(jnp.arange(capacity))
  scores = jnp.where(jnp.arange(capacity) < count, scores, 2.0)  # padding sorts last
  order = jnp.argsort(scores)
  return order[jnp.arange(batch_size) % jnp.maximum(count, 1)]


def class_step(fns: GanFns, gan_state, rng: jax.Array, images: jax.Array, count: jax.Array,
               step: jax.Array, *, batch_size: int):
  """One GAN step of ONE class: draw its batch from its own images, then `fns.step`.

  `images` is that class's padded uint8 [capacity, R, R, 3]; `rng` its stream key; `step` the global
  step. Jitted alone this is exactly what a separate single-class training runs.
  """
  data_key, gan_key = jax.random.split(jax.random.fold_in(rng, step))
  idx = batch_indices(data_key, count, images.shape[0], batch_size)
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


def class_keys(seed: int, class_index: int) -> tuple[jax.Array, jax.Array]:
  """(init key, training stream key) of one class: the class index folded into the seed."""
  init_key, stream_key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), class_index))
  return init_key, stream_key


@functools.lru_cache(maxsize=32)
def _jit(fn: Callable, static_argnums: tuple[int, ...] = ()) -> Callable:
  """One jitted wrapper per function, so repeated calls reuse its compiled programs."""
  return jax.jit(fn, static_argnums=static_argnums)


def init_ensemble(fns: GanFns, seed: int, class_indices: Sequence[int],
                  mesh: jax.sharding.Mesh) -> dict:
  """Stacked initial states of `class_indices` (already padded to a multiple of the mesh size).

  Each class is initialised by the same jitted single-class `init` a separate training would run,
  so the ensemble starts from exactly the separate trainings' parameters.
  """
  init = _jit(fns.init)
  states, rngs = [], []
  for k in class_indices:
    init_key, stream_key = class_keys(seed, k)
    states.append(init(init_key))
    rngs.append(stream_key)
  ens = {"gan": _stack(states), "rng": jnp.stack(rngs),
         "ok": jnp.ones((len(class_indices),), bool),
         "restarts": jnp.zeros((len(class_indices),), jnp.int32)}
  return jax.device_put(ens, NamedSharding(mesh, P(CLASS_AXIS)))


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


# ------------------------------------------------------------------------------------------------
# Checkpoints (orbax): the whole chunk (stacked states, per-class rng, restarts) + the step.
# ------------------------------------------------------------------------------------------------
class _Checkpoints:

  def __init__(self, directory: Path, max_to_keep: int = 2):
    self.manager = ocp.CheckpointManager(
        directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                   create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, ens: dict) -> None:
    # Saves are asynchronous; orbax copies the arrays to host before returning, so donating
    # `ens` to the next step is safe.
    self.manager.save(step, args=ocp.args.StandardSave(ens), force=True)

  def restore(self, step: int, like: dict) -> dict:
    self.manager.wait_until_finished()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ------------------------------------------------------------------------------------------------
# The host loop.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EnsembleResult:
  """What `train_class_gans` returns.

  Attributes:
    class_indices: the trained classes, sorted.
    steps: GAN steps every class was trained for.
    generated: {class index: uint8 [n, R, R, 3]} from the EMA generator (when `num_samples` given).
    history: {class index: [{"step": s, "d_loss": ..., "g_loss": ..., ...}]} at logging points.
    nan_restarts: {class index: times its GAN was restored after a NaN/inf}.
    states: {class index: final GAN state as numpy pytree} (only with `keep_states=True`).
    workdir: where checkpoints, sample grids and TensorBoard logs are.
    strategy: "vmap" or "unroll", as resolved.
  """
  class_indices: tuple[int, ...]
  steps: int
  generated: dict[int, np.ndarray]
  history: dict[int, list[dict]]
  nan_restarts: dict[int, int]
  states: dict[int, Any]
  workdir: Path
  strategy: str


def balanced_chunks(class_indices: Sequence[int], chunk_size: int) -> list[list[int]]:
  """Splits classes into ceil(K / chunk_size) chunks whose sizes differ by at most one."""
  n = math.ceil(len(class_indices) / chunk_size)
  base, extra = divmod(len(class_indices), n)
  chunks, start = [], 0
  for j in range(n):
    size = base + (j < extra)
    chunks.append(list(class_indices[start:start + size]))
    start += size
  return chunks


def _fingerprint(images: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def _meta(classes, images, gan_config, seed) -> dict:
  keys = ("resolution", "batch_size", "ngf", "ndf", "nz", "learning_rate", "beta1", "beta2",
          "ema_decay", "recon_loss", "diffaug")
  return {"classes": [int(k) for k in classes], "counts": [len(x) for x in images],
          "data": [_fingerprint(x) for x in images], "seed": int(seed),
          "gan": {k: gan_config.get(k) for k in keys}}


def _check_meta(chunk_dir: Path, meta: dict) -> None:
  path = chunk_dir / "meta.json"
  if path.exists():
    old = json.loads(path.read_text())
    if old != meta:
      diff = sorted(k for k in meta if old.get(k) != meta[k])
      raise UserError(
          f"{chunk_dir} holds GAN checkpoints of a different run (differs in: {', '.join(diff)}). "
          "Use a new workdir, or delete that directory to retrain these GANs.")
  elif _is_writer():
    chunk_dir.mkdir(parents=True, exist_ok=True)
    tmp = chunk_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)
  if jax.process_count() > 1:  # no process reads on before process 0 has written it
    multihost_utils.sync_global_devices(f"gan meta {chunk_dir}")


def _host_metrics(metrics, num_real: int) -> dict[str, np.ndarray]:
  return {name: np.asarray(v, np.float64)[:num_real] for name, v in _to_host(metrics).items()}


def train_class_gans(images_by_class: Mapping[int, np.ndarray], gan_config: ml_collections.ConfigDict,
                     workdir: str, seed: int, *, step_fns: GanFns | None = None,
                     num_samples: int | Mapping[int, int] | None = None,
                     mesh: jax.sharding.Mesh | None = None, max_nan_restarts: int = 3,
                     keep_states: bool = False, progress: bool = True) -> EnsembleResult:
  """Trains one GAN per class in `images_by_class`, K classes per compiled program; resumable.

  Args:
    images_by_class: {class index: uint8 [N, H, W, 3]} training images of each weak class; resized
      to `gan_config.resolution` if needed.
    gan_config: `config.gan` (steps, batch_size, ensemble, chunk_size, sample_every,
      checkpoint_every, log_every, and the FastGAN keys read by `step_fns`).
    workdir: directory for checkpoints, sample grids and TensorBoard logs; rerunning with the same
      workdir resumes (and returns at once for finished chunks).
    seed: base seed; class k uses `fold_in(PRNGKey(seed), k)`.
    step_fns: the single-class GAN; default: FastGAN from mdjax.gan.step.
    num_samples: images to generate per class from the final EMA generator (int for all, or per
      class); None generates nothing (use `generate.generate_images` later from saved states).
    mesh: 1-D mesh with axis "class" (default: all devices).
    max_nan_restarts: restorations after NaN/inf allowed per class before giving up.
    keep_states: also return every class's final state (numpy; large for full-width FastGANs).
    progress: show a tqdm bar (mean / worst D and G loss over the chunk's classes) and, at every
      sample point, a line with each class's D and G loss.
  """
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  g = gan_config
  if not images_by_class:
    raise DataError("train_class_gans got no classes; select at least one weak class.")
  fns = step_fns or default_gan_fns(g)
  mesh = mesh or class_mesh()
  strategy = resolve_strategy(g.ensemble, mesh.devices.flat[0].platform)
  workdir = Path(workdir)
  classes = sorted(int(k) for k in images_by_class)
  images = {k: prepare_class_images(images_by_class[k], g.resolution, class_index=k) for k in classes}
  capacity = max(len(x) for x in images.values())
  chunks = balanced_chunks(classes, g.chunk_size)
  n_dev = mesh.size
  if isinstance(num_samples, int):
    num_samples = {k: num_samples for k in classes}

  result = EnsembleResult(tuple(classes), g.steps, {}, {k: [] for k in classes},
                          {k: 0 for k in classes}, {}, workdir, strategy)
  writer = SummaryWriter(str(workdir / "tensorboard")) if _is_writer() else _NoWriter()
  bar = tqdm(total=g.steps * len(chunks), disable=not (progress and _is_writer()),
             desc="class GANs", unit="step",
             dynamic_ncols=True)
  sample = _jit(fns.sample, (2,))
  sharding = NamedSharding(mesh, P(CLASS_AXIS))
  stack = contextlib.ExitStack()  # closes every chunk's checkpoint manager, also on errors
  try:
    for j, chunk in enumerate(chunks):
      num_real = len(chunk)
      padded = chunk + [chunk[-1]] * (-num_real % n_dev)
      chunk_dir = workdir / f"chunk_{j:03d}"
      _check_meta(chunk_dir, _meta(chunk, [images[k] for k in chunk], g, seed))
      data, counts = stack_class_images([images[k] for k in padded], capacity)
      data, counts = jax.device_put((data, counts), sharding)
      step_fn = make_ensemble_step(fns, batch_size=g.batch_size, strategy=strategy, mesh=mesh)
      ckpt = _Checkpoints(chunk_dir / "checkpoints")
      stack.callback(ckpt.close)
      ens = init_ensemble(fns, seed, padded, mesh)
      step = ckpt.latest_step()
      if step is None:
        step = 0
        ckpt.save(0, ens)
        for k in chunk if _is_writer() else ():
          generate.save_grid(images[k][:GRID_SIZE], workdir / "samples" / f"class_{k:04d}" / "real.png")
      else:
        ens = ckpt.restore(step, ens)
      restarts = _to_host(ens["restarts"])
      for p, k in enumerate(chunk):
        result.nan_restarts[k] = int(restarts[p])
      bar.set_description(f"class GANs (chunk {j + 1}/{len(chunks)}: {len(chunk)} classes)")
      bar.n = j * g.steps + step
      bar.refresh()

      while step < g.steps:
        ens, metrics = step_fn(ens, data, counts, jnp.int32(step))
        step += 1
        bar.update(1)
        checkpoint_now = step % g.checkpoint_every == 0 or step == g.steps
        sample_now = step % g.sample_every == 0 or step == g.steps
        if not (checkpoint_now or sample_now or step % g.log_every == 0):
          continue
        ok = _to_host(ens["ok"])
        if not ok.all():
          ens, step = _recover(ens, ok, padded, ckpt, max_nan_restarts, step, sharding)
          restarts = _to_host(ens["restarts"])
          for p, k in enumerate(chunk):
            result.nan_restarts[k] = int(restarts[p])
            result.history[k] = [h for h in result.history[k] if h["step"] <= step]
          bar.n = j * g.steps + step
          bar.refresh()
          continue
        host = _host_metrics(metrics, num_real)
        for p, k in enumerate(chunk):
          result.history[k].append({"step": step, **{n: float(v[p]) for n, v in host.items()}})
          for n, v in host.items():
            writer.add_scalar(f"class_{k:04d}/{n}", float(v[p]), step)
        bar.set_postfix(_postfix(host), refresh=False)
        if checkpoint_now:
          ckpt.save(step, ens)
        if sample_now:
          if progress and _is_writer():  # the bar shows mean/worst; this line every class's own
            bar.write(f"GAN step {step}/{g.steps}: {_class_losses(host, chunk)}")
          for p, k in enumerate(chunk):
            state = _local_class_state(ens, p, mesh)  # a collective: every process runs it
            if not _is_writer():
              continue
            grid_key = jax.random.fold_in(class_keys(seed, k)[1], _GRID_STREAM)
            grid = generate.to_uint8(sample(state, grid_key, GRID_SIZE))
            generate.save_grid(grid, workdir / "samples" / f"class_{k:04d}" / f"step_{step:07d}.png")
            writer.add_image(f"class_{k:04d}/samples", generate.make_grid(grid), step,
                             dataformats="HWC")

      for p, k in enumerate(chunk):
        n = (num_samples or {}).get(k, 0)
        if not (n > 0 or keep_states):
          continue
        state = _local_class_state(ens, p, mesh)
        if n > 0:
          gen_key = jax.random.fold_in(class_keys(seed, k)[1], _GENERATE_STREAM)
          result.generated[k] = generate.generate_images(
              fns.sample, state, n, gen_key, batch_size=4 * g.batch_size)
        if keep_states:
          result.states[k] = jax.device_get(state)
      writer.flush()
  finally:
    stack.close()
    bar.close()
    writer.close()
  return result


_LOSSES = (("d_loss", "D"), ("g_loss", "G"))


def _postfix(host: dict[str, np.ndarray]) -> dict[str, str]:
  """Mean and worst (largest) value over classes of the D and G losses."""
  return {short: f"{host[name].mean():.3f}/{host[name].max():.3f}"
          for name, short in _LOSSES if name in host}


def _class_losses(host: dict[str, np.ndarray], chunk: Sequence[int]) -> str:
  """Every class's D and G loss on one line: "class 2 D 1.408 G 0.431 | class 3 ..."."""
  return " | ".join(
      " ".join([f"class {k}"] + [f"{short} {host[name][p]:.3f}" for name, short in _LOSSES
                                 if name in host])
      for p, k in enumerate(chunk))


def _recover(ens: dict, ok: np.ndarray, classes: Sequence[int], ckpt: _Checkpoints,
             max_restarts: int, step: int, sharding) -> tuple[dict, int]:
  """Restores the chunk's last checkpoint and refolds the RNG of the classes that went non-finite."""
  bad = [p for p in range(len(ok)) if not ok[p]]
  bad_classes = sorted({classes[p] for p in bad})
  # Counted from the live state: the checkpoint's counts predate the failures since it was saved.
  restarts = _to_host(ens["restarts"]).copy()
  last = ckpt.latest_step()
  restored = ckpt.restore(last, ens)
  for p in bad:
    restarts[p] += 1
  # Padded copies of a class fail with it; count a class once.
  worst = max(restarts[p] for p in bad)
  if worst > max_restarts:
    raise NonFiniteLossError(
        f"The GAN of class(es) {bad_classes} produced NaN/inf values again after {max_restarts} "
        f"restorations of the last good checkpoint (step {last}); stopped at step {step}. Lower "
        "gan.learning_rate, check those classes' images (constant or corrupt images?), or train "
        "them with more images.")
  warnings.warn(
      f"GAN of class(es) {bad_classes}: NaN/inf detected by step {step}; restored the checkpoint of "
      f"step {last} and continuing with a fresh random stream for them (restart {worst} of at most "
      f"{max_restarts}).", RuntimeWarning, stacklevel=3)
  rng = _to_host(restored["rng"]).copy()
  for p in bad:
    rng[p] = np.asarray(jax.random.fold_in(rng[p], int(restarts[p])))
  restored["rng"] = jax.device_put(rng, sharding)
  restored["restarts"] = jax.device_put(restarts, sharding)
  restored["ok"] = jax.device_put(np.ones_like(ok), sharding)
  return restored, last
