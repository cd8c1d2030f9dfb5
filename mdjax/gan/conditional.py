"""ONE class-conditional FastGAN for all weak classes: the alternative to one GAN per class.

`gan.conditional = True` (after Abi Hana, "Enhancing Image Classification Using Conditional
GAN-Based Data Augmentation", Université Paris-Saclay): instead of K independent FastGANs
(mdjax.gan.ensemble), one FastGAN whose G embeds the label and whose D is a projection
discriminator (mdjax.gan.fastgan) learns all K weak classes together, with one-sided label
smoothing of the real side (`gan.real_label_smoothing`, mdjax.gan.losses). What the comparison is
about: K times fewer parameters to train and store and one model that can share what the weak
classes have in common (strokes, backgrounds), against each class getting a K-th of the real images
per step and a model that may mix classes up.

Batches are class-balanced: slot i of step s draws class (s * B + i) mod K, so every batch holds
the classes as evenly as B allows and over K steps each class fills exactly B slots, whatever the
classes' sizes (the per-class ensemble, too, gives every class the same number of steps; drawing
from the pooled images instead would give a class of 90 images three times the updates of a
class of 30). Within a step a class's images are drawn without replacement
(mdjax.gan.class_data.batch_indices, with its own key per class). The fakes of a step are made for
the same labels as its real batch (the paper's rule), so they are balanced too.

Labels are positions 0..K-1 in the sorted weak classes; the checkpoint's meta.json records which
classes they are. Generation asks for each weak class the count the per-class path would make,
from the same per-class keys (mdjax.gan.chunks.stream_key), and returns {class index: images}, so
the generate stage writes, filters and judges them as it does the ensemble's.

Everything else follows the per-class path: the step is pure and jitted (`fns.step` of
mdjax.gan.step, the data draw inside the program, keys `fold_in(rng, step)`, so a resumed run
replays an uninterrupted one), the state is donated, checkpoints go through
mdjax.core.checkpoint with a meta.json checked on resume (mdjax.gan.chunks.check_meta), a NaN/inf
flag folded into the state is read at log points and restores the last checkpoint with a refolded
key, and process 0 writes sample grids per class and TensorBoard scalars.

Devices: one model, so the state is replicated on a mesh of one device per process (each process
runs the same program on its own first device; orbax saves the replicated arrays once). It does not
use several devices of one process: data parallelism over a batch of 8 would split FastGAN's
BatchNorm batches. Workdir layout: `<workdir>/conditional/{meta.json, checkpoints/}`,
`<workdir>/samples/class_<k>/step_<s>.png`, `<workdir>/tensorboard/`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mdjax.core import loop, mesh as mesh_lib, process
from mdjax.core.checkpoint import Checkpoints
from mdjax.errors import DataError, NonFiniteLossError, RecoveryWarning
from mdjax.gan import chunks, class_data, generate, program
from mdjax.gan import step as step_lib

GRID_SIZE = 16
# fold_in constant of the conditional GAN's own key (the per-class GANs fold in class indices).
CONDITIONAL_STREAM = 1_000_003


@dataclasses.dataclass
class ConditionalResult:
  """What `train_conditional_gan` returns (the fields the pipeline reads match EnsembleResult's).

  Attributes:
    class_indices: the weak classes, sorted; label p of the GAN is class_indices[p].
    steps: the conditional GAN's steps.
    generated: {class index: uint8 [n, R, R, 3]} (when `num_samples` given).
    history: [{"step": s, "d_loss": ..., "g_loss": ..., ...}] at logging points of this call.
    nan_restarts: times the GAN was restored after a NaN/inf.
    acceptance: {class index: generate.Accepted} (only with a `score` filter).
    state: the final GAN state as numpy (only with `keep_state=True`).
    workdir: the GAN directory.
  """
  class_indices: tuple[int, ...]
  steps: int
  generated: dict[int, np.ndarray]
  history: list[dict]
  nan_restarts: int
  acceptance: dict[int, Any]
  state: Any
  workdir: Path
  strategy: str = "conditional"


def balanced_batch(key: jax.Array, counts: jax.Array, capacity: int, step: jax.Array,
                   batch_size: int) -> tuple[jax.Array, jax.Array]:
  """(class positions int32 [B], image indices int32 [B]) of one class-balanced batch.

  Slot i holds class (step * B + i) mod K (module docstring); its image is the (i // K)-th of a
  without-replacement draw from that class's `counts[k]` images with key `fold_in(key, k)`.
  """
  k = counts.shape[0]
  slots = jnp.arange(batch_size)
  positions = (step * batch_size + slots) % k
  per_class = -(-batch_size // k)
  table = jax.vmap(
      lambda p, c: class_data.batch_indices(jax.random.fold_in(key, p), c, capacity, per_class)
  )(jnp.arange(k), counts)  # [K, per_class]
  return positions.astype(jnp.int32), table[positions, slots // k]


def train_step(fns: step_lib.ConditionalGANFns, cgan: dict, images: jax.Array, counts: jax.Array,
               step: jax.Array, *, batch_size: int) -> tuple[dict, dict]:
  """One conditional GAN step: draw a class-balanced batch from all weak classes, then `fns.step`.

  `cgan` = {"gan": GANState, "rng": key, "ok": bool, "restarts": int32}; `images` uint8
  [K, capacity, R, R, 3] zero-padded; `counts` int32 [K]. Pure: jit it (see `make_train_step`).
  """
  data_key, gan_key = jax.random.split(jax.random.fold_in(cgan["rng"], step))
  labels, idx = balanced_batch(data_key, counts, images.shape[1], step, batch_size)
  batch = images[labels, idx].astype(jnp.float32) / 127.5 - 1.0
  new_gan, metrics = fns.step(cgan["gan"], batch, labels, gan_key)
  finite = loop.all_finite(metrics) & loop.all_finite(new_gan)
  return dict(cgan, gan=new_gan, ok=cgan["ok"] & finite), metrics


@functools.lru_cache(maxsize=8)
def make_train_step(fns: step_lib.ConditionalGANFns, batch_size: int) -> Callable:
  """`train_step` jitted with the state donated; cached so resumed runs reuse the program."""
  return jax.jit(functools.partial(train_step, fns, batch_size=batch_size), donate_argnums=0)


def _sample_class(fns: step_lib.ConditionalGANFns, state_and_label, rng: jax.Array, n: int):
  """`generate`'s sampler contract for one class: the label travels with the state, so one
  compiled program serves every class."""
  state, label = state_and_label
  return fns.sample(state, rng, jnp.full((n,), label, jnp.int32))


@functools.lru_cache(maxsize=8)
def class_sampler(fns: step_lib.ConditionalGANFns) -> Callable:
  """`((state, label), rng, n) -> images` for mdjax.gan.generate (one object per GAN, so its
  jitted program is compiled once)."""
  return functools.partial(_sample_class, fns)


def process_mesh() -> Mesh:
  """The first device of every process (module docstring: the state is replicated on it)."""
  firsts = {}
  for d in jax.devices():
    if d.process_index not in firsts or d.id < firsts[d.process_index].id:
      firsts[d.process_index] = d
  return mesh_lib.class_mesh([firsts[p] for p in sorted(firsts)])


class _Run:
  """The conditional GAN of one workdir: fresh or resumed state, checkpoints, NaN recovery."""

  def __init__(self, workdir: Path, classes: Sequence[int], images: Sequence[np.ndarray],
               fns: step_lib.ConditionalGANFns, gan_config: ml_collections.ConfigDict, seed: int,
               mesh: Mesh):
    self.mesh, self._sharding = mesh, mesh_lib.replicated(mesh)
    meta = {**chunks.checkpoint_meta(classes, images, gan_config, seed), "model": "conditional",
            "real_label_smoothing": fns.spec.real_label_smoothing}
    chunks.check_meta(workdir, meta)
    data, counts = class_data.stack_class_images(images)
    self.data, self.counts = process.put_global((data, counts), self._sharding)
    init_key, stream = conditional_keys(seed)
    cgan = {"gan": program.jit_once(fns.init)(init_key), "rng": stream, "ok": jnp.ones((), bool),
            "restarts": jnp.zeros((), jnp.int32)}
    self.cgan = process.put_global(cgan, self._sharding)
    self.checkpoints = Checkpoints(workdir / "checkpoints")
    self.step, self.cgan, _, self.fresh = self.checkpoints.resume_or_start(self.cgan)

  def advance(self, step_fn) -> dict:
    self.cgan, metrics = step_fn(self.cgan, self.data, self.counts, jnp.int32(self.step))
    self.step += 1
    return metrics

  def save(self) -> None:
    self.checkpoints.save(self.step, self.cgan)

  def state(self):
    return jax.tree.map(lambda x: x.addressable_data(0), self.cgan["gan"])

  def restarts(self) -> int:
    return int(process.fetch_replicated(self.cgan["restarts"]))

  def recover(self, max_restarts: int) -> None:
    """Restores the last checkpoint (saved only when finite) and refolds the key."""
    restarts = self.restarts() + 1
    last = self.checkpoints.latest_step()
    if restarts > max_restarts:
      raise NonFiniteLossError(
          f"The conditional GAN produced NaN/inf values again after {max_restarts} restorations "
          f"of the last good checkpoint (step {last}); stopped at step {self.step}. Lower "
          "gan.learning_rate, check the weak classes' images, or train one GAN per class "
          "(gan.conditional=false).")
    warnings.warn(
        f"conditional GAN: NaN/inf detected by step {self.step}; restored the checkpoint of step "
        f"{last} and continuing with a fresh random stream (restart {restarts} of at most "
        f"{max_restarts}).", RecoveryWarning, stacklevel=3)
    restored, _ = self.checkpoints.restore(last, self.cgan)
    rng = jax.random.fold_in(process.fetch_replicated(restored["rng"]), restarts)
    restored.update(rng=rng, restarts=jnp.int32(restarts), ok=jnp.ones((), bool))
    self.cgan = process.put_global(restored, self._sharding)
    self.step = last

  def close(self) -> None:
    self.checkpoints.close()


def conditional_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, training stream key) of the conditional GAN of `seed`."""
  return tuple(jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), CONDITIONAL_STREAM)))


def train_conditional_gan(images_by_class: Mapping[int, np.ndarray],
                          gan_config: ml_collections.ConfigDict, workdir: str, seed: int, *,
                          num_samples: int | Mapping[int, int] | None = None,
                          score: Callable[[int, np.ndarray], np.ndarray] | None = None,
                          threshold: float = 0.0, select: str = "first",
                          max_draws: int = 10, max_nan_restarts: int = 3,
                          keep_state: bool = False, progress: bool = True) -> ConditionalResult:
  """Trains one class-conditional FastGAN on all classes of `images_by_class`; resumable.

  The arguments mean what they mean for mdjax.gan.ensemble.train_class_gans: `images_by_class`
  {class index: uint8 [N, H, W, 3]} (resized to `gan_config.resolution`), `workdir` (rerunning
  with it resumes, and returns at once when training finished), `num_samples` per class (int or
  {class: n}) drawn from the EMA generator with the class's GENERATE_STREAM key, `score`,
  `threshold`, `select` and `max_draws` the optional filter (as train_class_gans'). `keep_state` also returns the final state (numpy).
  """
  g = gan_config
  if not images_by_class:
    raise DataError("train_conditional_gan got no classes; select at least one weak class.")
  classes = sorted(int(k) for k in images_by_class)
  fns = step_lib.make_conditional_gan_fns(g, len(classes))
  images = [class_data.prepare_class_images(images_by_class[k], g.resolution, class_index=k)
            for k in classes]
  workdir = Path(workdir)
  if isinstance(num_samples, int):
    num_samples = {k: num_samples for k in classes}
  run = _Run(workdir / "conditional", classes, images, fns, g, seed, process_mesh())
  result = ConditionalResult(tuple(classes), int(g.steps), {}, [], run.restarts(), {}, None,
                             workdir)
  writer = process.metric_writer(str(workdir / "tensorboard"))
  show = progress and process.is_writer()
  sample = program.jit_once(fns.sample)
  step_fn = make_train_step(fns, int(g.batch_size))
  try:
    if run.fresh and process.is_writer():
      for k, x in zip(classes, images):
        generate.save_grid(x[:GRID_SIZE], workdir / "samples" / f"class_{k:04d}" / "real.png")
    while run.step < g.steps:
      metrics = run.advance(step_fn)
      step = run.step
      save_now = loop.itstime(step, g.checkpoint_every, g.steps)
      sample_now = loop.itstime(step, g.sample_every, g.steps)
      if not (save_now or sample_now or loop.itstime(step, g.log_every)):
        continue
      if not bool(process.fetch_replicated(run.cgan["ok"])):
        run.recover(max_nan_restarts)
        result.nan_restarts = run.restarts()
        result.history = [h for h in result.history if h["step"] <= run.step]
        continue
      host = {n: float(v) for n, v in process.fetch_replicated(metrics).items()}
      result.history.append({"step": step, **host})
      for n, v in host.items():
        writer.add_scalar(f"conditional/{n}", v, step)
      if save_now:
        run.save()
      if sample_now:
        if show:
          print(f"conditional GAN step {step}/{g.steps}: D {host['d_loss']:.3f} "
                f"G {host['g_loss']:.3f}", flush=True)
        _sample_grids(sample, run.state(), classes, seed, step, workdir, writer)
    state = run.state()
    sampler = class_sampler(fns)
    for p, k in enumerate(classes):
      n = (num_samples or {}).get(k, 0)
      if n <= 0:
        continue
      key = chunks.stream_key(seed, k, chunks.GENERATE_STREAM)
      with_label = (state, jnp.int32(p))
      batch_size = 4 * int(g.batch_size)
      result.generated[k], counts = generate.draw_class(
          sampler, with_label, n, key, score=score and functools.partial(score, k),
          threshold=threshold, select=select, max_draws=max_draws, batch_size=batch_size)
      if counts is not None:
        result.acceptance[k] = counts
    if keep_state:
      result.state = jax.device_get(state)
  finally:
    run.close()
    writer.close()
  return result


def _sample_grids(sample, state, classes: Sequence[int], seed: int, step: int, workdir: Path,
                  writer) -> None:
  """A grid per class from the EMA generator, with that class's fixed grid key (as the ensemble)."""
  if not process.is_writer():
    return
  for p, k in enumerate(classes):
    key = chunks.stream_key(seed, k, chunks.GRID_STREAM)
    grid = generate.to_uint8(sample(state, key, jnp.full((GRID_SIZE,), p, jnp.int32)))
    generate.save_grid(grid, workdir / "samples" / f"class_{k:04d}" / f"step_{step:07d}.png")
    writer.add_image(f"class_{k:04d}/samples", generate.make_grid(grid), step, dataformats="HWC")
