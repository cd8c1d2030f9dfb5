"""Algorithm 1 of the paper, one function per stage, each resumable.

    train     train the classifier m on D_train (checkpointed; resumes mid-epoch)
    validate  class-wise accuracy on D_val; the nWPC worst classes; the baseline's test accuracy
    gan       one FastGAN per weak class, all in one compiled program (checkpointed); or, with
              gan.conditional, one class-conditional FastGAN for all weak classes
              (mdjax.gan.conditional); its record says what either cost (`gan_cost`)
    generate  ceil(ratio x |C|) images per weak class from its EMA generator (optionally only those
              the classifier finds confident, `mistake.filter`), stored atomically, with their
              quality: the classifier's target-class fraction and Frechet distance, and the share
              an independent judge assigns to the class (mdjax.gan.judge)
    finetune  fine-tune the trained m (not a fresh one) on D_train + generated images
    distill   GAN distillation (`config.distill`, mdjax.gan.distill), in place of gan, generate and
              finetune: rounds of relabel hard / easy -> class GANs with the triplet loss ->
              generate -> fine-tune m on D_train + generated; each round recorded, resumable
    test      test the final m (fine-tuned, or distilled) on D_test

A stage's outputs live in the workdir; its record in `stages/<name>.json` is written last. Each
stage finds what it needs from earlier stages through their records and checkpoints, so
`--config.stages=gan` can run on a classifier trained by an earlier command.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdjax import models
from mdjax.core import mesh as mesh_lib
from mdjax.core import files, process, storage
from mdjax.data import pipeline
from mdjax.data.sources import ArraySource, Concat, Splits, real_and_generated
from mdjax.errors import QualityWarning, UserError
from mdjax.gan import conditional
from mdjax.gan import distill as distill_lib
from mdjax.gan import ensemble, generate, judge as judge_lib, program, quality
from mdjax.gan import monitor as monitor_lib
from mdjax.gan import step as gan_step
from mdjax.pipeline import plan
from mdjax.pipeline import workdir as workdir_lib
from mdjax.train import classifier as clf
from mdjax.train import refit as refit_lib
from mdjax.train import steps as steps_lib


def say(message: str) -> None:
  if process.is_writer():
    print(f"mdjax: {message}", flush=True)


def worst_classes(class_accuracy: np.ndarray, count: int,
                  class_loss: np.ndarray | None = None) -> list[int]:
  """The `count` classes with the lowest accuracy; ties go to the class with the higher
  validation loss (the one the classifier is less sure of), then to the lower class index."""
  loss = np.zeros(len(class_accuracy)) if class_loss is None else np.nan_to_num(class_loss)
  order = sorted(range(len(class_accuracy)),
                 key=lambda k: (float(class_accuracy[k]), -float(loss[k]), k))
  return sorted(order[:count])


def validation_change(before: dict, after: dict) -> list[str]:
  """Which of the validation accuracies {"overall", "weak"} the fine-tune lowered."""
  return [name for name in ("overall", "weak") if after[name] < before[name]]


def num_generated(class_size: int, ratio: float) -> int:
  """nSamples = ceil(ratio x |C|) (the paper: half the class size by default)."""
  return int(math.ceil(ratio * class_size - 1e-9))


def gan_cost(gan_config, num_classes: int, seconds: float,
             class_steps: dict | None = None, steps: int | None = None) -> dict:
  """What training the GANs of `num_classes` weak classes costs, in the same terms for both paths
  (one GAN per class, or one conditional GAN): models, steps (each class's, where the stopping
  rule ended them at different steps: `class_steps`), real images each class contributes to
  training, parameters, and `seconds`, the wall time of the training call (compilation included;
  on a resumed run only what was left)."""
  steps, batch = int(gan_config.steps if steps is None else steps), int(gan_config.batch_size)
  if gan_config.conditional:
    models, fns = 1, gan_step.make_conditional_gan_fns(gan_config, num_classes)
  else:
    models, fns = num_classes, program.default_gan_fns(gan_config)
  size = gan_step.parameter_counts(fns)
  g, d = models * size["g_parameters"], models * size["d_parameters"]
  model_steps = sum(class_steps.values()) if class_steps else models * steps
  return {"path": "conditional" if gan_config.conditional else "per_class", "models": models,
          "steps": steps, "model_steps": model_steps,
          "real_images_per_class": model_steps * batch // num_classes,
          "g_parameters": g, "d_parameters": d, "parameters": g + d,
          "train_seconds": round(seconds, 3)}


def class_images(source, labels: np.ndarray, k: int, size: int, augment: str = "none") -> np.ndarray:
  """All training images of class k as uint8 [N, size, size, 3] (`pipeline.whole_image`)."""
  idx = np.flatnonzero(labels == k)
  return np.stack([pipeline.whole_image(source[int(i)]["image"], size, augment) for i in idx])


def _summary(result: dict) -> dict:
  return {"test_accuracy": result["accuracy"],
          "test_class_accuracy": [float(a) for a in result["class_wise_accuracy"]]}


class Run:
  """One seed's run of Algorithm 1 in `workdir`."""

  def __init__(self, config, workdir: str, splits: Splits):
    self.config, self.workdir, self.splits = config, workdir, splits
    self.stages = workdir_lib.Stages(workdir)
    self.mesh = mesh_lib.data_mesh()
    self.num_classes = splits.num_classes
    self.model = models.build_classifier(config.model, self.num_classes)
    self.nwpc = (plan.nwpc_count(config.mistake.nwpc, self.num_classes)
                 if config.mistake.enabled else 0)
    self._variables: dict[str, Any] = {}
    self._eval_step = None
    self._judge = None
    self._triplet = None
    self._refits: dict[str, dict] = {}  # fine-tune tag -> its last-layer re-fit's record

  # --- helpers ---------------------------------------------------------------------------------

  def require(self, stage: str, by: str) -> dict:
    if not self.stages.done(stage):
      raise UserError(f"stage {by!r} needs the outputs of stage {stage!r}, which has not finished "
                      f"in {self.workdir}; add {stage} to --config.stages (or run all stages).")
    return self.stages.load(stage)

  def classifier(self, tag: str, train_source=None, *, init_from: str | None = None,
                 epochs: int | None = None, learning_rate: float | None = None,
                 **generated_treatment) -> dict:
    """Trains (or restores the finished training of) the classifier stage `tag`;
    `generated_treatment` as clf.train_classifier's sampler / generated_weight / separate_norms."""
    if tag in self._variables:
      return self._variables[tag]
    init = self.classifier("train") if init_from else None
    result = clf.train_classifier(
        self.config, train_source if train_source is not None else self.splits.train,
        self.splits.val, self.workdir, self.num_classes, init_variables=init, epochs=epochs,
        learning_rate=learning_rate, tag=tag, model=self.model, mesh=self.mesh,
        **generated_treatment)
    self._variables[tag] = result.variables
    self._history = result.history
    return result.variables

  def evaluate(self, variables: dict, source) -> dict:
    if self._eval_step is None:
      # One jitted eval step for every evaluation of the run (val, test, each control), so each
      # input shape compiles once instead of once per call.
      self._eval_step = steps_lib.make_eval_step(self.model, self.num_classes, self.mesh)
    return clf.evaluate(self.model, variables, source, self.config, self.mesh,
                        eval_step=self._eval_step)

  def image_fn(self, variables: dict, method: str):
    """A jitted images-in-[0,1] -> logits / features function at the classifier's input size."""
    size = int(self.config.data.image_size)
    model = self.model

    @jax.jit
    def fn(images):
      images = jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear")
      if method == "features":
        return model.apply(variables, images, train=False, method=model.features)
      return model.apply(variables, images, train=False)

    return fn

  def weak_images(self, classes) -> dict[int, np.ndarray]:
    r = int(self.config.gan.resolution)
    augment = str(self.config.data.augment)
    return {k: class_images(self.splits.train, self.splits.train.labels, k, r, augment)
            for k in classes}

  def train_gans(self, images_by_class: dict[int, np.ndarray], gan_dir: str, monitor=None,
                 **kwargs):
    """The GANs of these classes, trained or restored: one per class (the paper), judged and
    stopped by `monitor`, or one class-conditional GAN (`gan.conditional`); `kwargs` as
    train_class_gans'."""
    if self.config.gan.conditional:
      return conditional.train_conditional_gan(images_by_class, self.config.gan, gan_dir,
                                               int(self.config.seed), **kwargs)
    return ensemble.train_class_gans(images_by_class, self.config.gan, gan_dir,
                                     int(self.config.seed), monitor=monitor,
                                     steps=self.gan_budget(), **kwargs)

  def gan_budget(self) -> int:
    """The most steps a class GAN trains: gan.max_steps when the stopping rule judges them
    (mdjax.gan.monitor), else the fixed schedule gan.steps."""
    g = self.config.gan
    stopping = monitor_lib.StopRule.from_config(g).enabled and int(g.max_steps) > 0
    return int(g.max_steps) if stopping else int(g.steps)

  def judge(self):
    """The independent judge of generated images, fit once per run on the real training images."""
    if self._judge is None:
      r, augment = int(self.config.gan.resolution), str(self.config.data.augment)
      view = lambda src: np.stack([pipeline.whole_image(src[i]["image"], r, augment)  # noqa: E731
                                   for i in range(len(src))])
      self._judge = judge_lib.fit_judge(
          view(self.splits.train), self.splits.train.labels, view(self.splits.val),
          self.splits.val.labels, self.num_classes, seed=int(self.config.seed),
          kind=str(self.config.gan.judge), resolution=self.judge_resolution())
    return self._judge

  def judge_resolution(self) -> int:
    """gan.judge_resolution, or with 0 the training images' own size (the first image's shorter
    side) at most gan.resolution: a pixel judge sees what the images hold, 8x8 digits or 28x28
    clothes, whichever config runs them."""
    if int(self.config.gan.judge_resolution):
      return int(self.config.gan.judge_resolution)
    return min(min(self.splits.train[0]["image"].shape[:2]), int(self.config.gan.resolution))

  def class_probability_fn(self):
    """`score(class, uint8 images) -> float`: the trained classifier's probability of the class
    (what mistake.filter thresholds and mistake.select ranks)."""
    logits_fn = self.image_fn(self.classifier("train"), "logits")

    def score(k: int, images: np.ndarray) -> np.ndarray:
      logits = quality.apply_in_batches(logits_fn, images, batch_size=256)
      return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1)[:, k])

    return score

  def generated_source(self, gen_dir: str) -> ArraySource:
    """The generated set in `gen_dir` (absolute, or relative to the workdir as records keep it)."""
    images, labels = generate.load_generated(os.path.join(self.workdir, gen_dir))
    return ArraySource(images, labels)

  # --- stages ----------------------------------------------------------------------------------

  def train(self) -> dict:
    self.classifier("train")
    return {"history": _jsonable(self._history)}

  def validate(self) -> dict:
    self.require("train", "validate")
    variables = self.classifier("train")
    val = self.evaluate(variables, self.splits.val)
    test = self.evaluate(variables, self.splits.test)
    cwa = np.nan_to_num(val["class_wise_accuracy"], nan=1.0)  # a class absent from val is not weak
    weak = worst_classes(cwa, self.nwpc, val["class_loss"])
    names = self.splits.class_names
    say("worst classes on validation: " + ", ".join(
        f"{names[k]} ({cwa[k]:.3f}, loss {val['class_loss'][k]:.3f})" for k in weak) if weak else
        "mistake-driven training is off (nWPC = 0): no GAN stages")
    flawless = [k for k in weak if cwa[k] >= 1.0]
    if flawless:
      say(f"nWPC = {self.nwpc} takes {len(flawless)} class(es) with no validation error "
          f"({', '.join(names[k] for k in flawless)}), chosen by their validation loss: they are "
          "not weak; a smaller mistake.nwpc picks only classes the classifier gets wrong")
    return {"val_accuracy": val["accuracy"],
            "val_class_accuracy": [float(a) for a in val["class_wise_accuracy"]],
            "val_class_loss": [float(a) for a in val["class_loss"]],
            "val_confusion": val["confusion"].tolist(),
            "worst_classes": weak, "nwpc": self.nwpc, "forced_flawless": flawless,
            "baseline": _summary(test), "baseline_confusion": test["confusion"].tolist()}

  def gan(self) -> dict:
    if self.config.distill.enabled:
      return {"skipped": _DISTILLING}
    weak = self.require("validate", "gan")["worst_classes"]
    if not weak:
      return {"skipped": "nWPC = 0"}
    if float(self.config.mistake.nsamples_ratio) == 0:
      return {"skipped": "mistake.nsamples_ratio = 0: no images to generate (the fine-tune sees "
                         "real images only)"}
    start = time.perf_counter()
    real = self.weak_images(weak)
    result = self.train_gans(real, os.path.join(self.workdir, "gan"), monitor=self.monitor(real))
    stopping = getattr(result, "stopping", None)
    class_steps = {k: v["steps"] for k, v in stopping.items()} if stopping else None
    record = {"classes": weak, "strategy": result.strategy, "steps": result.steps,
              "gan_cost": gan_cost(self.config.gan, len(weak), time.perf_counter() - start,
                                   class_steps, result.steps)}
    if isinstance(result, conditional.ConditionalResult):
      return {**record, "nan_restarts": result.nan_restarts,
              "final_losses": result.history[-1] if result.history else {}}
    return {**record, "nan_restarts": {str(k): v for k, v in result.nan_restarts.items()},
            "final_losses": {str(k): h[-1] for k, h in result.history.items() if h},
            "stopping": stopping}

  def monitor(self, real: dict) -> monitor_lib.Monitor | None:
    """The judge of the class GANs while they train, and their stopping rule (mdjax.gan.monitor);
    None for the conditional GAN, which trains all weak classes as one model for gan.steps."""
    if self.config.gan.conditional:
      return None
    judge = self.judge()
    weak = [self.splits.class_names[k] for k in sorted(real) if k in judge.weak_classes()]
    if weak:
      say(f"the independent judge recognises few real images of {', '.join(weak)} (held-out "
          f"recall below {monitor_lib.WEAK_JUDGE:.0%}): its verdicts on their generated images say "
          "little" + (" (a photo dataset? try gan.judge=lite0)" if judge.kind == "pixels" else ""))
    return monitor_lib.Monitor(judge, real, monitor_lib.StopRule.from_config(self.config.gan),
                               self.splits.class_names)

  def generate(self) -> dict:
    if self.config.distill.enabled:
      return {"skipped": _DISTILLING, "generated_per_class": {}}
    weak = self.require("validate", "generate")["worst_classes"]
    if not weak:
      return {"skipped": "nWPC = 0", "generated_per_class": {}}
    self.require("gan", "generate")
    threshold = plan.filter_threshold(self.config.mistake.filter, self.num_classes)
    return self._generate(weak, os.path.join(self.workdir, "gan"),
                          os.path.join(self.workdir, "generated"), threshold,
                          str(self.config.mistake.select))

  def _generate(self, classes, gan_dir: str, out_dir: str, threshold: float | None = None,
                select: str = "first") -> dict:
    counts = {k: int((self.splits.train.labels == k).sum()) for k in classes}
    wanted = {k: num_generated(counts[k], float(self.config.mistake.nsamples_ratio)) for k in classes}
    real = self.weak_images(classes)
    acceptance = {}
    if any(wanted.values()):
      # Finished GANs are restored, not retrained: this only samples their EMA generators.
      result = self.train_gans(
          real, gan_dir, num_samples=wanted,
          score=None if threshold is None else self.class_probability_fn(),
          threshold=threshold or 0.0, select=select,
          max_draws=int(self.config.mistake.filter_max_draws), progress=False)
      images = {k: v for k, v in result.generated.items() if len(v)}
      acceptance = result.acceptance
      # Each class's images come from the step its GAN ended at (the conditional GAN's: one).
      source_step = getattr(result, "class_steps", None) or int(self.config.gan.steps)
    else:
      source_step = None
      images = {}
    if process.is_writer():
      generate.write_generated(out_dir, images, class_names=self.splits.class_names,
                               source_step=source_step)
    process.barrier(f"generated {out_dir}")
    record = {"generated_per_class": {str(k): len(images.get(k, ())) for k in classes},
              "class_sizes": {str(k): counts[k] for k in classes},
              # Relative to the workdir: a workdir that is moved or copied keeps its own images.
              "dir": os.path.relpath(out_dir, self.workdir)}
    if threshold is not None:
      record["filter"] = {"threshold": threshold, "select": select,
                          "wanted": {str(k): wanted[k] for k in classes},
                          "acceptance": {str(k): {"drawn": a.drawn, "passed": a.passed,
                                                  "rate": a.acceptance_rate}
                                         for k, a in acceptance.items()}}
      short = {k: wanted[k] - len(images.get(k, ())) for k in classes}
      if any(short.values()):
        say("filter: the draw cap left classes short of nSamples: " + ", ".join(
            f"{self.splits.class_names[k]} {len(images.get(k, ()))}/{wanted[k]}"
            for k in classes if short[k]))
    if images:
      record.update(self.judge_generated(images, real))
    return record

  def judge_generated(self, images: dict, real: dict) -> dict:
    """{"judge": the judge's record, "quality": per class {target_class_fraction (the trained
    classifier's), frechet_distance, judge_fraction, diversity_ratio}} of generated `images`
    against the `real` training images of their classes; prints the verdicts and warns
    (QualityWarning) about classes whose images barely vary."""
    variables = self.classifier("train")
    fractions = quality.target_class_fraction(self.image_fn(variables, "logits"), images)
    fd = quality.class_frechet_distances(self.image_fn(variables, "features"), real, images) \
        if all(len(v) >= 2 for v in images.values()) and all(len(real[k]) >= 2 for k in images) else {}
    judge = self.judge()
    measured = judge.measure(real, images)
    verdicts = {k: m["judge_fraction"] for k, m in measured.items()}
    spread = {k: m["diversity_ratio"] for k, m in measured.items()
              if m["diversity_ratio"] is not None}
    copies = {k: m["memorisation"] for k, m in measured.items() if m["memorisation"] is not None}
    names = self.splits.class_names
    say("generated images judged their class (independent judge, held-out accuracy "
        f"{judge.heldout_accuracy:.3f}): " + ", ".join(
            f"{names[k]} {verdicts[k]:.2f} (its real images {judge.heldout_class_accuracy[k]:.2f})"
            for k in sorted(images)))
    say("their spread against the real images' (diversity ratio, 1 = as varied as the class): "
        + ", ".join(f"{names[k]} {spread[k]:.2f}" for k in sorted(spread)))
    say("near-copies of a training image (memorisation; fresh real images score about 0.05): "
        + ", ".join(f"{names[k]} {copies[k]:.2f}" for k in sorted(copies)))
    memorised = [names[k] for k in sorted(copies) if copies[k] > MEMORISED]
    if memorised:
      warnings.warn(
          f"more than {MEMORISED:.0%} of the generated images of {', '.join(memorised)} are "
          "near-copies of a training image: the GAN redraws its training set (too few images for "
          "it, or trained too long), and fine-tuning on copies adds little. Look at the sample "
          "grids beside real.png; fewer gan.steps, or more images of the class.",
          QualityWarning, stacklevel=1)
    collapsed = [self.splits.class_names[k] for k in sorted(spread) if spread[k] < COLLAPSED]
    if collapsed:
      warnings.warn(
          f"the generated images of {', '.join(collapsed)} vary less than {COLLAPSED:.0%} as much "
          "as the real ones (diversity ratio): the GAN draws nearly the same image again and "
          "again (mode collapse, or too few steps to learn the class's variety), and fine-tuning "
          "on them adds little. Look at the sample grids; train longer (gan.max_steps) or lower "
          "gan.learning_rate.",
          QualityWarning, stacklevel=1)
    return {"judge": judge.record(),
            "quality": {str(k): {"target_class_fraction": fractions[k],
                                 "frechet_distance": fd.get(k),
                                 "judge_fraction": verdicts[k],
                                 "diversity_ratio": spread.get(k),
                                 "judge_frechet_distance": measured[k]["frechet_distance"],
                                 "memorisation": copies.get(k)} for k in images}}

  def finetune(self) -> dict:
    if self.config.distill.enabled:
      return {"skipped": _DISTILLING}
    weak = self.require("validate", "finetune")["worst_classes"]
    if not weak:
      return {"skipped": "nWPC = 0: the trained classifier is the final one"}
    variables = self._finetuned("finetune")
    val = self.evaluate(variables, self.splits.val)  # after the re-fit, where there is one
    return {"history": _jsonable(self._history), "refit": self._refits.get("finetune"),
            "validation": self.compare_validation(val["accuracy"],
                                                  val["class_wise_accuracy"].tolist())}

  def compare_validation(self, accuracy: float, class_accuracy) -> dict:
    """The fine-tuned classifier's validation accuracy against the trained one's, overall and on
    the weak classes; one warning line when either fell (the run never reports a worse model
    silently)."""
    val = self.require("validate", "finetune")
    weak = val["worst_classes"]
    before = {"overall": val["val_accuracy"],
              "weak": float(np.mean([val["val_class_accuracy"][k] for k in weak]))}
    after = {"overall": float(accuracy),
             "weak": float(np.mean([class_accuracy[k] for k in weak]))}
    lowered = validation_change(before, after)
    if lowered:
      keep = bool(self.config.mistake.keep_best)
      warnings.warn(
          "the mistake-driven fine-tune lowered validation accuracy: overall "
          f"{before['overall']:.4f} -> {after['overall']:.4f}, weak classes "
          f"{before['weak']:.4f} -> {after['weak']:.4f}; " + (
              "the trained classifier stays the final model (mistake.keep_best)" if keep else
              "the fine-tuned one is still the final model (mistake.keep_best=true keeps the "
              "trained one in this case)"), QualityWarning, stacklevel=2)
    return {"before": before, "after": after, "lowered": lowered}

  def final_variables(self) -> tuple[dict, str]:
    """(variables, which): the final classifier and which it is: "finetuned" (or "distilled"),
    or "trained" when no fine-tune ran, or when it lowered validation accuracy and
    mistake.keep_best is set."""
    if self.config.distill.enabled:
      record = self.require("distill", "test")
      if "skipped" in record:
        return self.classifier("train"), "trained"
      if self.config.mistake.keep_best and record["validation"]["lowered"]:
        return self.classifier("train"), "trained"
      return self._distilled(len(record["rounds"]) - 1), "distilled"
    ft = self.require("finetune", "test")
    if "skipped" in ft:
      return self.classifier("train"), "trained"
    if self.config.mistake.keep_best and ft["validation"]["lowered"]:
      return self.classifier("train"), "trained"
    return self._finetuned("finetune"), "finetuned"

  def _finetuned(self, tag: str, data=None) -> dict:
    """The trained classifier fine-tuned as stage `tag` on `data` (default: real + generated, as
    `real_and_generated` tags them). Where `data` holds generated images the fine-tune treats
    them as `config.finetune` says: their loss weight, BatchNorm statistics of their own, the
    real class priors kept (PriorSampler). The output layer's re-fit on real images
    (mdjax.train.refit) follows every fine-tune, the real-only ones too, so that the real-only
    control measures what the re-fit does without generated images. Deterministic, so a resumed
    run re-fits to the same layer."""
    final = f"{tag}/final"
    if final in self._variables:
      return self._variables[final]
    if data is None:
      gen = self.require("generate", tag)
      data = real_and_generated(self.splits.train, self.generated_source(gen["dir"]))
    f = self.config.finetune
    generated = getattr(data, "generated", None)
    mixed = generated is not None and bool(generated.any())
    treatment = {}
    if mixed:
      treatment = {"generated_weight": float(f.generated_weight),
                   "separate_norms": bool(f.separate_bn),
                   "sampler": (pipeline.PriorSampler(data.labels, generated, int(self.config.seed))
                               if f.sampler == "keep_priors" else None)}
    variables = self.classifier(tag, data, init_from="train", epochs=int(f.epochs),
                                learning_rate=float(f.learning_rate), **treatment)
    if f.refit_last_layer:
      refit = refit_lib.refit_last_layer(self.model, variables, self.splits.train,
                                         self.splits.val, self.config, self.num_classes)
      self._refits[tag] = refit.record()
      variables = refit.variables
    self._variables[final] = variables
    return variables

  # --- GAN distillation ------------------------------------------------------------------------

  def distill(self) -> dict:
    """GAN distillation's rounds (mdjax.gan.distill). Round r: label the weak classes' training
    images hard / easy with the classifier of round r - 1 (round -1: the trained one); advance
    their GANs, with the triplet term, to gan.steps + r x distill.round_gan_steps (one program,
    `distill/gan/`, resumed round after round); generate nSamples per class; fine-tune round
    r - 1's classifier on real + generated images for distill.epochs (`distill/round_<r>/`).

    Resumable: a finished round has `distill/round_<r>/round.json` (written last) and is not
    redone; in an unfinished one, finished GANs are restored (and generate the same images again)
    and the fine-tune resumes from its checkpoint.
    """
    ds = self.config.distill
    if not ds.enabled:
      return {"skipped": "distill.enabled is false"}
    weak = self.require("validate", "distill")["worst_classes"]
    if not weak:
      return {"skipped": "nWPC = 0"}
    real = self.weak_images(weak)
    rounds = [self._distill_round(r, weak, real) for r in range(int(ds.rounds))]
    last = rounds[-1]
    return {"classes": weak, "rounds": rounds, "gan_steps": last["gan_steps"],
            "validation": self.compare_validation(last["val_accuracy"],
                                                  last["val_class_accuracy"]),
            "generated_per_class": last["generated_per_class"], "dir": last["dir"],
            "quality": last.get("quality", {}), "judge": last.get("judge")}

  def _round_dir(self, r: int) -> str:
    return os.path.join(self.workdir, "distill", f"round_{r}")

  def triplet(self) -> distill_lib.Triplet:
    if self._triplet is None:  # one object per run: the key of the one compiled GAN program
      ds = self.config.distill
      self._triplet = distill_lib.Triplet(self.model, int(self.config.data.image_size),
                                          float(ds.margin), float(ds.weight), bool(ds.normalize))
    return self._triplet

  def _distilled(self, r: int, init: dict | None = None) -> dict:
    """Round r's fine-tuned classifier (r = -1: the trained one): trained from `init` (round
    r - 1's), or restored from its finished checkpoint (then `init` only gives the shapes)."""
    if r < 0:
      return self.classifier("train")
    tag = f"distill/round_{r}"
    if tag not in self._variables:
      data = Concat([self.splits.train,
                     self.generated_source(os.path.join(self._round_dir(r), "generated"))])
      result = clf.train_classifier(
          self.config, data, self.splits.val, self.workdir, self.num_classes,
          init_variables=init if init is not None else self.classifier("train"),
          epochs=int(self.config.distill.epochs),
          learning_rate=float(self.config.finetune.learning_rate), tag=tag, model=self.model,
          mesh=self.mesh)
      self._variables[tag] = result.variables
    return self._variables[tag]

  def _distill_round(self, r: int, weak, real: dict) -> dict:
    ds, rdir = self.config.distill, self._round_dir(r)
    record_path = os.path.join(rdir, "round.json")
    # Process 0's answers, as in Stages.done: process 0 writes these files.
    if process.from_writer(os.path.exists(record_path)):
      return files.read_json(record_path)
    gen_dir, gan_path = os.path.join(rdir, "generated"), os.path.join(rdir, "gan.json")
    previous = self._distilled(r - 1)
    labels = distill_lib.label_classes(
        self.triplet(), previous, real, rule=str(ds.hard_rule),
        threshold=float(ds.hard_threshold), min_fraction=float(ds.min_fraction))
    steps = int(self.config.gan.steps) + r * int(ds.round_gan_steps)
    if process.from_writer(os.path.exists(gan_path)):  # this round's GANs and images are done
      gan = files.read_json(gan_path)
    else:
      counts = {k: len(real[k]) for k in weak}
      wanted = {k: num_generated(counts[k], float(self.config.mistake.nsamples_ratio)) for k in weak}
      say(f"distill round {r + 1}/{ds.rounds}: hard / easy images per weak class: " + ", ".join(
          f"{self.splits.class_names[k]} {labels[k].hard.sum()}/{labels[k].easy.sum()}"
          for k in weak))
      result = ensemble.train_class_gans(
          real, self.config.gan, os.path.join(self.workdir, "distill", "gan"),
          int(self.config.seed), num_samples=wanted, steps=steps,
          teacher=distill_lib.Teacher(self.triplet(), previous, labels))
      images = {k: v for k, v in result.generated.items() if len(v)}
      if process.is_writer():
        generate.write_generated(gen_dir, images, class_names=self.splits.class_names,
                                 source_step=steps)
      process.barrier(f"generated {gen_dir}")
      gan = {"generated_per_class": {str(k): len(images.get(k, ())) for k in weak},
             # The last logged losses of the steps this run took (empty if all were restored).
             "final_losses": {str(k): h[-1] for k, h in result.history.items() if h},
             # The generate stage's measures of this round's images: judge, spread, FD.
             **(self.judge_generated(images, real) if images else {})}
      if process.is_writer():
        files.write_json_atomic(gan_path, gan)
      process.barrier(f"distill round {r} gan")
    variables = self._distilled(r, init=previous)
    val = self.evaluate(variables, self.splits.val)
    record = {"round": r, "gan_steps": steps, "dir": os.path.relpath(gen_dir, self.workdir),
              "labels": {str(k): labels[k].record() for k in weak}, **gan,
              "val_accuracy": val["accuracy"],
              "val_class_accuracy": [float(a) for a in val["class_wise_accuracy"]]}
    if process.is_writer():
      files.write_json_atomic(record_path, record)
    process.barrier(f"distill round {r}")
    say(f"distill round {r + 1}/{ds.rounds} done: val accuracy {val['accuracy']:.4f}")
    return record

  def test(self) -> dict:
    variables, which = self.final_variables()
    result = self.evaluate(variables, self.splits.test)
    return {"final": _summary(result), "final_confusion": result["confusion"].tolist(),
            "final_model": which}

  # --- controls --------------------------------------------------------------------------------

  def control_real_finetune(self) -> dict:
    """A fine-tune of the same length on real data only: separates extra epochs from the GANs."""
    self.require("train", "control_real_finetune")
    variables = self._finetuned("control_real", self.splits.train)
    return _summary(self.evaluate(variables, self.splits.test))

  def control_full_gan(self) -> dict:
    """Full GAN augmentation (nWPC = n): every class gets generated images."""
    if self.config.distill.enabled:
      return {"skipped": "compares with the gan / generate stages, which distillation replaces"}
    weak = self.require("validate", "control_full_gan")["worst_classes"]
    others = [k for k in range(self.num_classes) if k not in weak]
    parts = [self.splits.train]
    if weak:
      self.require("generate", "control_full_gan")
      parts.append(self.generated_source(os.path.join(self.workdir, "generated")))
    if others:
      # A class's GAN depends only on (seed, class, images), so the weak classes' GANs are reused
      # and only the others are trained here (with gan.conditional: one conditional GAN for them).
      gan_dir = os.path.join(self.workdir, "control_full_gan", "gan")
      real = self.weak_images(others)
      self.train_gans(real, gan_dir, monitor=self.monitor(real))
      out = os.path.join(self.workdir, "control_full_gan", "generated")
      self._generate(others, gan_dir, out)
      parts.append(self.generated_source(out))
    variables = self._finetuned("control_full_gan",
                                real_and_generated(self.splits.train, Concat(parts[1:])))
    return _summary(self.evaluate(variables, self.splits.test))

  def control_filtered(self) -> dict:
    """Mistake-driven training with generated images filtered by the classifier's confidence
    (He et al., ICLR 2023: its class probability above 1/n), against the paper's unfiltered set."""
    weak = self.require("validate", "control_filtered")["worst_classes"]
    if not weak:
      return {"skipped": "nWPC = 0"}
    if self.config.distill.enabled:
      return {"skipped": "compares with the gan / generate stages, which distillation replaces"}
    if self.config.mistake.filter != "none":
      return {"skipped": "the main run already filters (mistake.filter)"}
    self.require("gan", "control_filtered")
    out = os.path.join(self.workdir, "control_filtered", "generated")
    record = self._generate(weak, os.path.join(self.workdir, "gan"), out,
                            plan.filter_threshold("1/n", self.num_classes))
    variables = self._finetuned("control_filtered",
                                real_and_generated(self.splits.train, self.generated_source(out)))
    return {**_summary(self.evaluate(variables, self.splits.test)), "generate": record}


# Generated images that vary less than this share of the real ones' spread get a QualityWarning
# (quality.diversity_ratio). Measured on digits in the pixel judge's space: the per-class GANs of
# the default config 0.67-0.97 (3 seeds x 5 weak classes, 22-23 images each); a collapsed
# conditional GAN (ngf 8, 600 steps: every sample nearly one image) 0.16 on its 16-sample grids.
COLLAPSED = 0.5
# Generated images that are near-copies of training images more often than this get a
# QualityWarning (quality.memorisation): fresh real images of a class score about 0.05 (the
# percentile it is defined by), so 0.25 is five times what new images of the class would show.
MEMORISED = 0.25
CONTROL_STAGES = ("control_real_finetune", "control_full_gan", "control_filtered")
_DISTILLING = "distill.enabled: the distill stage trains the GANs and fine-tunes instead"


def run_stage(run: Run, name: str) -> dict:
  """Runs stage `name` unless its record exists; returns the record (with its wall time)."""
  if run.stages.done(name):
    return run.stages.load(name)
  start = time.perf_counter()
  with storage.converted(run.workdir):
    record = getattr(run, name)()
    record["seconds"] = time.perf_counter() - start
    run.stages.complete(name, record)
  say(f"[{name}] done in {record['seconds']:.1f} s" + _one_line(name, record, run.splits.class_names))
  return record


def _one_line(name: str, record: dict, class_names) -> str:
  if "skipped" in record:
    return f": skipped ({record['skipped']})"
  if name in ("train", "finetune") and record.get("history", {}).get("val_accuracy"):
    return f": val accuracy {record['history']['val_accuracy'][-1]:.4f}"
  if name == "validate":
    weak = ", ".join(class_names[k] for k in record["worst_classes"]) or "none"
    forced = record.get("forced_flawless")
    note = (f" ({len(forced)} of them without a validation error, forced in by nWPC)"
            if forced else "")
    return (f": val accuracy {record['val_accuracy']:.4f}, baseline test accuracy "
            f"{record['baseline']['test_accuracy']:.4f}, weak classes: {weak}{note}")
  if name == "distill":
    last = record["rounds"][-1]
    return (f": {len(record['rounds'])} rounds, {sum(last['generated_per_class'].values())} images "
            f"in the last, val accuracy {last['val_accuracy']:.4f}")
  if name == "generate":
    return f": {sum(record['generated_per_class'].values())} images for {len(record['generated_per_class'])} classes"
  if name == "test":
    return f": final test accuracy {record['final']['test_accuracy']:.4f}"
  if name.startswith("control"):
    return f": test accuracy {record['test_accuracy']:.4f}"
  return ""


def _jsonable(tree):
  if isinstance(tree, dict):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, (np.ndarray, jnp.ndarray)):
    return np.asarray(tree).tolist()
  if isinstance(tree, np.generic):
    return tree.item()
  return tree
