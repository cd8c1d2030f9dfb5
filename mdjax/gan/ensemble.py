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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mdjax.errors import DataError
from mdjax.gan import chunks as chunks_lib
from mdjax.gan import class_data, generate, program
from mdjax.gan.program import CLASS_AXIS, GanFns

GRID_SIZE = 16


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


def _host_metrics(metrics, num_real: int) -> dict[str, np.ndarray]:
  return {name: np.asarray(v, np.float64)[:num_real] for name, v in program._to_host(metrics).items()}


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
  fns = step_fns or program.default_gan_fns(g)
  mesh = mesh or program.class_mesh()
  strategy = program.resolve_strategy(g.ensemble, mesh.devices.flat[0].platform)
  workdir = Path(workdir)
  classes = sorted(int(k) for k in images_by_class)
  images = {k: class_data.prepare_class_images(images_by_class[k], g.resolution, class_index=k) for k in classes}
  capacity = max(len(x) for x in images.values())
  chunks = class_data.balanced_chunks(classes, g.chunk_size)
  n_dev = mesh.size
  if isinstance(num_samples, int):
    num_samples = {k: num_samples for k in classes}

  result = EnsembleResult(tuple(classes), g.steps, {}, {k: [] for k in classes},
                          {k: 0 for k in classes}, {}, workdir, strategy)
  writer = SummaryWriter(str(workdir / "tensorboard")) if program._is_writer() else program._NoWriter()
  bar = tqdm(total=g.steps * len(chunks), disable=not (progress and program._is_writer()),
             desc="class GANs", unit="step",
             dynamic_ncols=True)
  sample = program._jit(fns.sample, (2,))
  sharding = NamedSharding(mesh, P(CLASS_AXIS))
  stack = contextlib.ExitStack()  # closes every chunk's checkpoint manager, also on errors
  try:
    for j, chunk in enumerate(chunks):
      num_real = len(chunk)
      padded = chunk + [chunk[-1]] * (-num_real % n_dev)
      chunk_dir = workdir / f"chunk_{j:03d}"
      chunks_lib._check_meta(chunk_dir, chunks_lib._meta(chunk, [images[k] for k in chunk], g, seed))
      data, counts = class_data.stack_class_images([images[k] for k in padded], capacity)
      data, counts = jax.device_put((data, counts), sharding)
      step_fn = program.make_ensemble_step(fns, batch_size=g.batch_size, strategy=strategy, mesh=mesh)
      ckpt = chunks_lib._Checkpoints(chunk_dir / "checkpoints")
      stack.callback(ckpt.close)
      ens = chunks_lib.init_ensemble(fns, seed, padded, mesh)
      step = ckpt.latest_step()
      if step is None:
        step = 0
        ckpt.save(0, ens)
        for k in chunk if program._is_writer() else ():
          generate.save_grid(images[k][:GRID_SIZE], workdir / "samples" / f"class_{k:04d}" / "real.png")
      else:
        ens = ckpt.restore(step, ens)
      restarts = program._to_host(ens["restarts"])
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
        ok = program._to_host(ens["ok"])
        if not ok.all():
          ens, step = chunks_lib._recover(ens, ok, padded, ckpt, max_nan_restarts, step, sharding)
          restarts = program._to_host(ens["restarts"])
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
          if progress and program._is_writer():  # the bar shows mean/worst; this line every class's own
            bar.write(f"GAN step {step}/{g.steps}: {_class_losses(host, chunk)}")
          for p, k in enumerate(chunk):
            state = program._local_class_state(ens, p, mesh)  # a collective: every process runs it
            if not program._is_writer():
              continue
            grid_key = jax.random.fold_in(chunks_lib.class_keys(seed, k)[1], chunks_lib._GRID_STREAM)
            grid = generate.to_uint8(sample(state, grid_key, GRID_SIZE))
            generate.save_grid(grid, workdir / "samples" / f"class_{k:04d}" / f"step_{step:07d}.png")
            writer.add_image(f"class_{k:04d}/samples", generate.make_grid(grid), step,
                             dataformats="HWC")

      for p, k in enumerate(chunk):
        n = (num_samples or {}).get(k, 0)
        if not (n > 0 or keep_states):
          continue
        state = program._local_class_state(ens, p, mesh)
        if n > 0:
          gen_key = jax.random.fold_in(chunks_lib.class_keys(seed, k)[1], chunks_lib._GENERATE_STREAM)
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
