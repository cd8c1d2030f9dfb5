"""`mdjax.main`'s work: the stages for one seed or several, then results.json and the report.

Layout of a workdir:
    config.json             the config it was made with
    mdjax.lock              held by the run in progress (names its process)
    stages/<stage>.json     completion records (written last)
    train/, finetune/       classifier checkpoints and TensorBoard logs
    gan/                    the weak classes' GAN checkpoints, sample grids, TensorBoard logs
    generated/              generated images (PNG per class + index; COMPLETE marker)
    results.json, report.md, figures/
With several seeds (`--config.seeds=0,1,2`) each seed gets `seed_<s>/` laid out as above, and the
top level holds the aggregated results.json and report.md.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np

from mdjax.core import files, process, storage
from mdjax.data import registry
from mdjax.errors import QualityWarning
from mdjax.pipeline import plan, report, stages as stages_lib
from mdjax.pipeline import workdir as workdir_lib
from mdjax.pipeline.stages import CONTROL_STAGES, Run, say


def run(config, workdir: str) -> dict:
  # Data and config are checked before anything is written: a mistake leaves no half-made workdir.
  splits = registry.load_splits(config.data)
  plan.check_nwpc(config.mistake.nwpc, splits.num_classes)
  seeds = plan.parse_seeds(config)
  say(f"dataset {config.data.name}: {splits.summary()}")
  note = registry.imbalance(splits)
  if note and process.is_writer():
    warnings.warn(f"the training split is imbalanced: {note}.", QualityWarning, stacklevel=2)
  say(f"workdir {os.path.abspath(workdir)}")
  with workdir_lib.locked(workdir):  # one run per workdir, held until the run ends
    workdir_lib.prepare(workdir, config)
    if not str(config.seeds).strip():
      return run_seed(config, workdir, splits)
    return run_seeds(config, workdir, splits, seeds)


def run_seeds(config, workdir: str, splits, seeds) -> dict:
  per_seed = []
  for seed in seeds:
    seed_config = config.copy_and_resolve_references()
    seed_config.seed, seed_config.seeds = seed, ""
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    workdir_lib.prepare(seed_dir, seed_config)
    say(f"--- seed {seed} ---")
    per_seed.append(run_seed(seed_config, seed_dir, splits))
  results = aggregate(config, per_seed)
  if process.is_writer():
    with storage.converted(workdir):
      files.write_json_atomic(os.path.join(workdir, "results.json"), results)
      report.write_summary_report(workdir, results)
  print_summary(results)
  return results


def run_seed(config, workdir: str, splits) -> dict:
  wanted = plan.parse_stages(config)
  run_ = Run(config, workdir, splits)
  records = {}
  for name in plan.STAGES:
    if name in wanted:
      records[name] = stages_lib.run_stage(run_, name)
    elif run_.stages.done(name):
      records[name] = run_.stages.load(name)
  if config.controls and "test" in records:
    for name in CONTROL_STAGES:
      records[name] = stages_lib.run_stage(run_, name)
  if "test" not in records:
    say("stopped before the test stage (config.stages); results.json is written by a run that "
        "reaches it.")
    return {}
  results = collect(config, splits, records)
  if process.is_writer():
    with storage.converted(workdir):
      files.write_json_atomic(os.path.join(workdir, "results.json"), results)
      report.write_report(workdir, results, run_)
  print_summary(results)
  return results


def _weak_mean(summary: dict, weak) -> float | None:
  """Mean test accuracy over the weak classes (those selected on validation)."""
  return float(np.mean([summary["test_class_accuracy"][k] for k in weak])) if weak else None


def collect(config, splits, records: dict) -> dict:
  validate, generate = records["validate"], records.get("generate", {})
  distill = records.get("distill", {})
  if "rounds" in distill:  # GAN distillation replaced gan / generate / finetune
    # The last round's images are the ones the final classifier was fine-tuned on.
    generate = {key: distill[key] for key in ("generated_per_class", "dir", "quality", "judge")
                if key in distill}
  weak = validate["worst_classes"]
  controls = {n: records[n] for n in CONTROL_STAGES if n in records}
  ran = {n: r for n, r in controls.items() if "skipped" not in r}
  results = {
      "config": config.to_dict(),
      "classes": list(splits.class_names),
      "split_sizes": {n: len(getattr(splits, n)) for n in ("train", "val", "test")},
      "seed": int(config.seed),
      "mistake_driven": bool(validate["worst_classes"]),
      "baseline": validate["baseline"],
      # The classifier tested as "final": the fine-tuned one ("finetuned"; "distilled" with GAN
      # distillation), or the trained one ("trained": no fine-tune ran, or it lowered validation
      # accuracy and mistake.keep_best kept the trained one).
      "final": records["test"]["final"],
      "final_model": records["test"].get("final_model"),
      "finetune_validation": (records.get("finetune", {}).get("validation")
                              or distill.get("validation")),
      "val_class_accuracy": validate["val_class_accuracy"],
      "worst_classes": validate["worst_classes"],
      "nwpc": validate["nwpc"],
      "generated_per_class": {int(k): v for k, v in generate.get("generated_per_class", {}).items()},
      "gan_quality": generate.get("quality", {}),
      "judge": generate.get("judge"),
      "generated_dir": generate.get("dir"),  # relative to the workdir
      # GAN distillation's rounds: hard / easy counts, GAN losses, validation accuracy per round.
      "distill": ({"rounds": distill["rounds"], "gan_steps": distill["gan_steps"]}
                  if "rounds" in distill else None),
      # The weak classes' mean test accuracy, before (baseline), after, and in each control.
      "weak_class_accuracy": {"baseline": _weak_mean(validate["baseline"], weak),
                              "final": _weak_mean(records["test"]["final"], weak),
                              **{n: _weak_mean(r, weak) for n, r in ran.items()}},
      "stage_seconds": {n: r.get("seconds") for n, r in records.items()},
      # What the GAN stage cost (per-class ensemble or one conditional GAN: `gan.conditional`).
      "gan_cost": records.get("gan", {}).get("gan_cost"),
      # Per weak class: the steps its GAN trained, why it stopped, and its quality checks
      # (mdjax.gan.monitor).
      "gan_stopping": records.get("gan", {}).get("stopping"),
      "controls": controls,
      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  return results


def _stats(values) -> dict:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=0)), "values": values.tolist()}


def aggregate(config, per_seed: list[dict]) -> dict:
  """Mean and standard deviation over seeds, as the paper averages three runs."""
  per_seed = [r for r in per_seed if r]
  if not per_seed:
    return {"config": config.to_dict(), "seeds": []}
  first = per_seed[0]
  out = {"config": config.to_dict(), "classes": first["classes"],
         "seeds": [r["seed"] for r in per_seed], "per_seed": per_seed}
  for name in ("baseline", "final"):
    acc = _stats([r[name]["test_accuracy"] for r in per_seed])
    cls = np.mean([r[name]["test_class_accuracy"] for r in per_seed], axis=0)
    out[name] = {"test_accuracy": acc["mean"], "test_accuracy_std": acc["std"],
                 "test_accuracy_per_seed": acc["values"], "test_class_accuracy": cls.tolist()}
  out["val_class_accuracy"] = np.mean([r["val_class_accuracy"] for r in per_seed], axis=0).tolist()
  out["worst_classes_per_seed"] = [r["worst_classes"] for r in per_seed]
  out["worst_classes"] = first["worst_classes"]
  out["generated_per_class"] = first["generated_per_class"]
  out["stage_seconds"] = {k: float(np.sum([r["stage_seconds"].get(k) or 0 for r in per_seed]))
                          for k in first["stage_seconds"]}
  controls = {}
  for name in CONTROL_STAGES:
    vals = [r["controls"][name]["test_accuracy"] for r in per_seed
            if "test_accuracy" in r["controls"].get(name, {})]
    if vals:
      s = _stats(vals)
      controls[name] = {"test_accuracy": s["mean"], "test_accuracy_std": s["std"],
                        "test_accuracy_per_seed": s["values"]}
  out["controls"] = controls
  weak = {}
  for name in first.get("weak_class_accuracy", {}):
    vals = [r["weak_class_accuracy"].get(name) for r in per_seed]
    if all(v is not None for v in vals):
      s = _stats(vals)
      weak[name] = {"mean": s["mean"], "std": s["std"], "per_seed": s["values"]}
  out["weak_class_accuracy"] = weak
  return out


def print_summary(results: dict) -> None:
  if not results or "final" not in results:
    return
  names = results["classes"]
  b, f = results["baseline"], results["final"]
  std = lambda r: f" +- {r['test_accuracy_std']:.4f}" if "test_accuracy_std" in r else ""  # noqa: E731
  say(f"baseline (trained, no mistake-driven fine-tune) test accuracy {b['test_accuracy']:.4f}{std(b)}")
  say(f"final (mistake-driven) test accuracy {f['test_accuracy']:.4f}{std(f)}")
  for k in results.get("worst_classes", []):
    say(f"  weak class {names[k]}: {b['test_class_accuracy'][k]:.4f} -> {f['test_class_accuracy'][k]:.4f}")
  for name, r in results.get("controls", {}).items():
    if "test_accuracy" in r:
      say(f"control {name}: test accuracy {r['test_accuracy']:.4f}{std(r)}")
