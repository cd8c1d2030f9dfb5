"""One FastGAN per weak class, all trained by ONE compiled program (Algorithm 1, line 8).

Each selected class gets an independent GAN: its own parameters, optimizer states, EMA generator
and RNG stream. The pieces:

  class_data  each class's images, stacked and padded on device, and the batches drawn from them
  program     the one jitted step that advances K classes ("vmap", "map" or "unroll" inside it), or
              the single-class program the host runs per class ("per_class", one CPU device)
  chunks      a chunk of classes on the devices: keys, initial states, checkpoints, NaN recovery
  ensemble    this module: the host loop over chunks and steps, logging, sample grids, generation

Several processes (launch/local.sh, SLURM): the class mesh spans every process's devices, so each
process steps only its own classes. Every process runs the same host loop; what the host reads
(losses, NaN flags) is gathered from all processes (mdjax.core.process.fetch_sharded), a class's
state for sample grids and generation is first replicated to every device, so each process samples
it locally, and only process 0 writes files (grids, meta.json, TensorBoard); orbax checkpoints the
sharded state collectively.

Workdir layout: `chunk_<j>/meta.json` and `chunk_<j>/checkpoints/` (see mdjax.gan.chunks),
`samples/class_<k>/step_<s>.png` grids from the EMA generator with a fixed noise per class plus
`real.png`, and `tensorboard/` with per-class scalars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from mdjax.core import loop, mesh as mesh_lib, process
from mdjax.errors import DataError, QualityWarning, UserError
from mdjax.gan import chunks as chunks_lib
from mdjax.gan import class_data, distill, generate, program
from mdjax.gan import monitor as monitor_lib

GRID_SIZE = 16
_LOSSES = (("d_loss", "D"), ("g_loss", "G"), ("triplet_loss", "T"))


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
    acceptance: {class index: generate.Accepted} (only with a `score` filter).
    workdir: where checkpoints, sample grids and TensorBoard logs are.
    strategy: "vmap", "map", "unroll" or "per_class", as resolved.
    stopping: with a `monitor`: {class index as str: {"steps": trained, "stopped": "passed" or
      "budget", "curve": its checks}} (mdjax.gan.monitor.stop_record); else None.
    class_steps: {class index: the steps its GAN trained} (fewer than `steps` where the stopping
      rule stopped it).
  """
  class_indices: tuple[int, ...]
  steps: int
  generated: dict[int, np.ndarray]
  history: dict[int, list[dict]]
  nan_restarts: dict[int, int]
  states: dict[int, Any]
  workdir: Path
  strategy: str
  acceptance: dict[int, Any] = dataclasses.field(default_factory=dict)
  stopping: dict | None = None
  class_steps: dict[int, int] = dataclasses.field(default_factory=dict)


def train_class_gans(images_by_class: Mapping[int, np.ndarray], gan_config: ml_collections.ConfigDict,
                     workdir: str, seed: int, *, step_fns: program.GANFns | None = None,
                     num_samples: int | Mapping[int, int] | None = None,
                     score: Callable[[int, np.ndarray], np.ndarray] | None = None,
                     threshold: float = 0.0, select: str = "first",
                     max_draws: int = 10, mesh: jax.sharding.Mesh | None = None,
                     max_nan_restarts: int = 3, keep_states: bool = False,
                     progress: bool = True, steps: int | None = None,
                     teacher: distill.Teacher | None = None,
                     monitor: monitor_lib.Monitor | None = None) -> EnsembleResult:
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
    score: filters the generated images: `score(class index, uint8 [B, R, R, 3]) -> float [B]`,
      the classifier's probability of the class; an image passes above `threshold`. With
      `select="first"` each class draws until `num_samples` images pass or `max_draws` x
      `num_samples` were drawn (`generate.generate_accepted`); with "hardest" it draws all of
      those and keeps the passing ones of lowest score (`generate.generate_hardest`).
      `result.acceptance` holds the counts.
    max_draws: the draw cap with `score`, as a multiple of the class's `num_samples`.
    mesh: 1-D mesh with axis "class" (default: all devices).
    max_nan_restarts: restorations after NaN/inf allowed per class before giving up.
    keep_states: also return every class's final state (numpy; large for full-width FastGANs).
    progress: show a tqdm bar (mean / worst D and G loss over the chunk's classes) and, at every
      sample point, a line with each class's D and G loss.
    steps: train every class up to this step (default `gan_config.steps`); GAN distillation
      raises it round by round in the same workdir, each round resuming from the last.
    teacher: GAN distillation (mdjax.gan.distill): the triplet term, classifier and hard / easy
      features of every class; the step is then the distilling program (a `guided_step` is
      needed: mdjax.gan.step's FastGAN has one).
    monitor: judges each class's images at every sample point, and stops a class once they pass
      (mdjax.gan.monitor); `steps` is then each class's budget. None: every class trains `steps`.
  """
  g = gan_config
  steps = int(g.steps if steps is None else steps)
  if not images_by_class:
    raise DataError("train_class_gans got no classes; select at least one weak class.")
  mesh = mesh or mesh_lib.class_mesh()
  strategy = program.resolve_strategy(g.ensemble, mesh.devices.flat[0].platform, mesh.size)
  workdir = Path(workdir)
  classes = sorted(int(k) for k in images_by_class)
  images = {k: class_data.prepare_class_images(images_by_class[k], g.resolution, class_index=k)
            for k in classes}
  fns = step_fns or program.default_gan_fns(
      g, grey_data=all(class_data.is_grey(x) for x in images.values()))
  capacity = max(len(x) for x in images.values())
  groups = class_data.balanced_chunks(classes, g.chunk_size)
  if isinstance(num_samples, int):
    num_samples = {k: num_samples for k in classes}
  result = EnsembleResult(tuple(classes), steps, {}, {k: [] for k in classes},
                          {k: 0 for k in classes}, {}, workdir, strategy)
  if teacher is not None and getattr(fns, "guided_step", None) is None:
    raise UserError("GAN distillation needs a GAN step with an extra generator loss term "
                    "(`guided_step`, as mdjax.gan.step's FastGAN has); the given step_fns lack it.")
  stopping = monitor is not None and monitor.rule.enabled
  step_fn = program.make_ensemble_step(fns, batch_size=g.batch_size, strategy=strategy, mesh=mesh,
                                       triplet=None if teacher is None else teacher.triplet,
                                       masked=stopping)
  class_steps, curves, reasons = {}, {}, {}

  with _Progress(workdir, fns, seed, steps, len(groups), progress) as report, \
      contextlib.ExitStack() as open_chunks:  # every chunk's last save completes, also on errors
    for j, group in enumerate(groups):
      chunk = chunks_lib.Chunk(workdir / f"chunk_{j:03d}", group, images, capacity, fns, g, seed,
                               mesh, per_class=strategy == program.PER_CLASS)
      open_chunks.callback(chunk.close)
      if chunk.fresh:
        report.real_grids({k: images[k] for k in group})
      result.nan_restarts.update(chunk.restarts())
      report.start_chunk(j, group, chunk.step)
      advance = step_fn
      if teacher is not None:  # this chunk's hard / easy features, inputs of the one program
        advance = functools.partial(step_fn, teacher=teacher.stacked(chunk.padded, capacity, mesh))

      while chunk.step < steps and chunk.any_active:
        active = [k for k in group if chunk.is_active(k)]
        metrics = chunk.advance(advance)
        report.bar.update(1)
        step = chunk.step
        sample_now = loop.itstime(step, g.sample_every, steps)
        save_now = loop.itstime(step, g.checkpoint_every, steps)
        if not (save_now or sample_now or loop.itstime(step, g.log_every)):
          continue
        ok = chunk.all_finite()
        if not ok.all():
          chunk.recover(ok, max_nan_restarts)
          result.nan_restarts.update(chunk.restarts())
          for k in group:
            result.history[k] = [h for h in result.history[k] if h["step"] <= chunk.step]
          report.seek(j, chunk.step)
          continue
        host = {name: np.asarray(v, np.float64)[:len(group)]
                for name, v in process.fetch_sharded(metrics).items()}
        for p, k in enumerate(group):
          if k in active:
            result.history[k].append({"step": step, **{n: float(v[p]) for n, v in host.items()}})
        report.log(group, step, host)
        if sample_now:
          report.sample_grids(chunk, step, host, active)
          if monitor is not None:
            _check_classes(chunk, monitor, fns, seed, active, step, steps, report)
        if save_now or (sample_now and stopping):  # a decision is saved with the state it froze
          chunk.save()
      report.finish_chunk(j)

      for k in group:
        class_steps[k] = chunk.class_steps(k)
        curves[k] = chunk.curves.get(k, [])
        reasons[k] = "passed" if k in chunk.stopped else "budget"
      _final_outputs(result, chunk, fns, seed, num_samples or {}, keep_states, 4 * g.batch_size,
                     score, threshold, select, max_draws)
      report.writer.flush()
  result.class_steps = class_steps
  if monitor is not None:
    result.stopping = monitor_lib.stop_record(curves, class_steps, reasons)
  return result


def _check_classes(chunk: chunks_lib.Chunk, monitor: monitor_lib.Monitor, fns: program.GANFns,
                   seed: int, active: Sequence[int], step: int, steps: int,
                   report: _Progress) -> None:
  """Judges the still-training classes' images at `step` and stops those that pass
  (mdjax.gan.monitor); each class's check is added to its curve and, when it ends, one line says
  how it did. Every process runs this (class_state is a collective) and decides the same."""
  for k in active:
    state = chunk.class_state(chunk.classes.index(k))
    key = jax.random.fold_in(chunks_lib.stream_key(seed, k, chunks_lib.CHECK_STREAM), step)
    images = generate.generate_images(fns.sample, state, monitor_lib.CHECK_SAMPLES, key,
                                      batch_size=monitor_lib.CHECK_SAMPLES)
    curve = chunk.curves.setdefault(k, [])
    curve.append(monitor.check(k, step, images))
    report.writer.add_scalar(f"class_{k:04d}/judge_fraction", curve[-1]["judge_fraction"], step)
    if curve[-1]["frechet_distance"] is not None:
      report.writer.add_scalar(f"class_{k:04d}/frechet_distance", curve[-1]["frechet_distance"],
                               step)
    if monitor.rule.should_stop(curve):
      chunk.stop(k)
      report.say(monitor.describe(k, curve, "passed"))
    elif step >= steps:
      report.say(monitor.describe(k, curve, "budget"))
      if monitor.rule.enabled and not curve[-1]["passed"]:
        warnings.warn(
            f"the GAN of {monitor.name(k)} trained its whole budget ({steps} steps, "
            f"gan.max_steps) and its images still do not pass "
            f"({', '.join(monitor.rule.shortfalls(curve[-1]))}): raise gan.max_steps, or look at "
            "its sample grids.", QualityWarning, stacklevel=2)


def _final_outputs(result: EnsembleResult, chunk: chunks_lib.Chunk, fns: program.GANFns,
                   seed: int, num_samples: Mapping[int, int], keep_states: bool,
                   batch_size: int, score=None, threshold: float = 0.0, select: str = "first",
                   max_draws: int = 10) -> None:
  """Generated images (filtered by `score` if given) and (with `keep_states`) final states of a
  trained chunk's classes."""
  for p, k in enumerate(chunk.classes):
    n = num_samples.get(k, 0)
    if not (n > 0 or keep_states):
      continue
    state = chunk.class_state(p)
    if n > 0:
      key = chunks_lib.stream_key(seed, k, chunks_lib.GENERATE_STREAM)
      result.generated[k], counts = generate.draw_class(
          fns.sample, state, n, key, score=score and functools.partial(score, k),
          threshold=threshold, select=select, max_draws=max_draws, batch_size=batch_size)
      if counts is not None:
        result.acceptance[k] = counts
    if keep_states:
      result.states[k] = jax.device_get(state)


class _Progress:
  """What a person watches: the tqdm bar, TensorBoard scalars, sample grids (process 0 writes)."""

  def __init__(self, workdir: Path, fns: program.GANFns, seed: int, steps: int, num_chunks: int,
               show: bool):
    self.workdir, self.seed, self.steps, self.num_chunks = workdir, seed, steps, num_chunks
    self.show = show and process.is_writer()
    self.writer = process.metric_writer(str(workdir / "tensorboard"))
    # disable=None: no bar where stderr is not a terminal (a log file would get one line of
    # thousands of characters); the per-check lines still come.
    self.bar = tqdm(total=steps * num_chunks, disable=None if self.show else True,
                    desc="class GANs",
                    unit="step", dynamic_ncols=True)
    self.sample = program.jit_once(fns.sample, (2,))

  def __enter__(self) -> _Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.bar.close()
    self.writer.close()

  def say(self, line: str) -> None:
    """One line of its own under the bar (process 0)."""
    if process.is_writer():
      tqdm.write(f"mdjax: {line}")

  def finish_chunk(self, j: int) -> None:
    """Classes that stopped early end their chunk before the budget: the bar moves on."""
    self.seek(j + 1, 0)

  def start_chunk(self, j: int, classes: Sequence[int], step: int) -> None:
    self.bar.set_description(
        f"class GANs (chunk {j + 1}/{self.num_chunks}: {len(classes)} classes)")
    self.seek(j, step)

  def seek(self, j: int, step: int) -> None:
    self.bar.n = j * self.steps + step
    self.bar.refresh()

  def real_grids(self, images: Mapping[int, np.ndarray]) -> None:
    for k, x in images.items() if process.is_writer() else ():
      generate.save_grid(x[:GRID_SIZE], self._grid_dir(k) / "real.png")

  def log(self, classes: Sequence[int], step: int, host: dict[str, np.ndarray]) -> None:
    for p, k in enumerate(classes):
      for n, v in host.items():
        if np.isfinite(v[p]):  # NaN: a stopped class
          self.writer.add_scalar(f"class_{k:04d}/{n}", float(v[p]), step)
    # The bar shows the mean and worst (largest) D and G loss over the chunk's training classes
    # (a stopped class's losses are NaN).
    self.bar.set_postfix({short: f"{np.nanmean(host[name]):.3f}/{np.nanmax(host[name]):.3f}"
                          for name, short in _LOSSES if name in host and
                          np.isfinite(host[name]).any()}, refresh=False)

  def sample_grids(self, chunk: chunks_lib.Chunk, step: int, host: dict[str, np.ndarray],
                   active: Sequence[int]) -> None:
    """A grid of each training class's EMA generator at `step` (a stopped class's last grid
    stays the one of its last step)."""
    if self.show:  # the bar shows mean/worst; this line every class's own losses
      self.bar.write(f"GAN step {step}/{self.steps}: {_class_losses(host, chunk.classes, active)}")
    for p, k in enumerate(chunk.classes):
      if k not in active:
        continue
      state = chunk.class_state(p)  # a collective: every process runs it
      if not process.is_writer():
        continue
      key = chunks_lib.stream_key(self.seed, k, chunks_lib.GRID_STREAM)
      grid = generate.to_uint8(self.sample(state, key, GRID_SIZE))
      generate.save_grid(grid, self._grid_dir(k) / f"step_{step:07d}.png")
      self.writer.add_image(f"class_{k:04d}/samples", generate.make_grid(grid), step,
                            dataformats="HWC")

  def _grid_dir(self, k: int) -> Path:
    return self.workdir / "samples" / f"class_{k:04d}"


def _class_losses(host: dict[str, np.ndarray], classes: Sequence[int],
                  active: Sequence[int]) -> str:
  """Every training class's D and G loss on one line: "class 2 D 1.408 G 0.431 | class 3 ..."."""
  return " | ".join(
      " ".join([f"class {k}"] + [f"{short} {host[name][p]:.3f}" for name, short in _LOSSES
                                 if name in host])
      for p, k in enumerate(classes) if k in active)
