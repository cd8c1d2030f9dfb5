"""Runs a grid of methods x seeds and writes one comparison table: `python -m mdjax.ablate`.

    python -m mdjax.ablate --config=configs/default.py --workdir=runs/ablation \
        --methods=baseline,mdt,fullgan,hardmix,cutmix,mixup --seeds=0,1,2
    python -m mdjax.ablate --workdir=runs/ablation --table_only

Flags:
  --config, --config.KEY=VALUE   the config every method starts from, as for mdjax.main
  --workdir   the grid's folder (default: runs/ablation-<config>-<hash of the config>)
  --methods   names from METHODS below (required to run; --table_only finds them in the workdir)
  --seeds     comma-separated seeds (default: the config's seeds, else its seed)
  --table_only   rebuild the table from the cells already in the workdir; runs nothing

Each cell, `<workdir>/<method>/seed_<s>/`, is a normal mdjax workdir: its config (the user's, then
the method's overrides, then the seed) is composed and validated here for every cell before any
cell runs, written to the cell's `ablation_config.json`, and run with
`python -m mdjax.main --config=configs/from_json.py:<that file> --workdir=<cell>` (printed at the
top of the cell's `ablation.log`, so one cell can be rerun by hand). A cell whose results.json is
complete and whose config.json matches is skipped; any other cell is (re)run, and mdjax.main
resumes it from its finished stages and checkpoints. Cells run seed by seed (every method of seed
0, then seed 1, ...), so a whole comparison exists after the first seed.

Why each cell runs in its own process: a cell holds its datasets, models and compiled programs
until it ends, so one process running the grid would grow with every cell; JAX, absl flags and
mdjax.main keep process-wide state (backends, the distributed client, the lock); and a crash, an
out-of-memory kill or a bug in one method must end that cell, not the grid. The cost is JAX's
start-up per cell (seconds): compiled programs come from the persistent compilation cache, so
cells that share a program (every seed of a method) compile it once. This process never starts a
JAX backend (validating a config only imports the registries), so it holds no GPU memory.

A failing cell is recorded in its `ablation_status.json` with the last `mdjax: error:` line of
its log (else the log's last line), appears as failed in the table, and the grid goes on; the
runner then exits with status 1. Ctrl-C stops the cell (its finished stages are kept) and the
grid, exit status 130; the same command resumes both.

The table, `<workdir>/ablation.md` and `<workdir>/ablation.csv` (both written atomically, again
after every cell), has one row per method, over the seeds whose cell finished:
  - test accuracy: results.json `final.test_accuracy` (the fine-tuned model's; for a method
    without mistake-driven training, `mistake.enabled=False`, there is no fine-tune and `final`
    is the trained classifier, equal to its `baseline`);
  - weak classes' accuracy: the mean of results.json `final.test_class_accuracy` over the weak
    classes that the `mdt` cell of the same seed selected on validation (its `worst_classes`,
    the paper's nWPC worst). Every method is measured on those classes, so within a seed all
    methods are compared on the same classes: a method with mistake-driven training off selects
    none, and `fullgan` selects all. Empty where that seed's `mdt` cell has not finished (run
    `mdt` in the same workdir to fill it);
  - mean and standard deviation over seeds, the std with ddof=0 (the population std), as mdjax's
    own multi-seed results.json reports it; with one seed only the value is given;
  - wall time per cell: the mean over cells of the sum of results.json `stage_seconds`, the run's
    own timing of its stages. It leaves out process start-up, data loading and any attempt that
    was interrupted before its stage finished (a stage taken from another cell counts its time).
With the control method `realft` (the same fine-tune on real images only) in the grid, each
method's per-seed difference from it follows (mean ± std over seeds, and in how many seeds the
method was ahead), then every finished cell's weak classes: their test accuracy before -> after
and, for their generated images, the judge's fraction, diversity, near-copies and GAN steps.
`ablation.png` draws the table (mean ± std, every seed a dot).

Methods join with "+" (`mdt_refit+mdt_priors`: both treatments at once). Cells share stages: a
fresh cell takes the finished stages of an earlier cell of the same seed whose config agrees on
everything those stages read (SHARED_STAGES), so the remedies of the fine-tune (`mdt_*`) reuse
the classifier and the GANs of `mdt`: list `mdt` before them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
from absl import flags

from mdjax import config as config_lib
from mdjax import main as main_lib
from mdjax.core import files, storage
from mdjax.errors import UserError
from mdjax.pipeline import plan
from mdjax.pipeline import workdir as workdir_lib

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROM_JSON = os.path.join(_PACKAGE_ROOT, "configs", "from_json.py")

CELL_CONFIG = "ablation_config.json"
CELL_STATUS = "ablation_status.json"
CELL_LOG = "ablation.log"
LOG_HEADER = "=== mdjax.ablate"  # starts each attempt's output in the cell's log
TABLE_MD, TABLE_CSV, FIGURE = "ablation.md", "ablation.csv", "ablation.png"
# The method whose weak classes every method's weak-class accuracy is measured on.
REFERENCE = "mdt"
# The method every other one is compared with seed by seed, when it is in the grid.
CONTROL = "realft"


@dataclasses.dataclass(frozen=True)
class Method:
  description: str
  overrides: dict[str, Any]  # dotted config key -> value, set on top of the user's config
  # What the method adds when it follows another in a "+" combination (a remedy's own part).
  treatment: str = ""


def _remedy(treatment: str, overrides: dict[str, Any]) -> Method:
  """The paper's method with one treatment of its generated images or of the fine-tune."""
  return Method("the paper's method, " + treatment, overrides, treatment)


METHODS = {
    "baseline": Method("the classifier alone: trained, no mistake-driven fine-tune",
                       {"mistake.enabled": False}),
    "mdt": Method("mistake-driven training, the paper: GANs for the weak classes, then fine-tune", {}),
    "fullgan": Method("full GAN augmentation: a GAN for every class, then fine-tune",
                      {"mistake.nwpc": 1.0}),
    "distill": Method("mistake-driven training with distillation", {"distill.enabled": True}),
    "hardmix": Method("the classifier trained with HardMix, no GANs",
                      {"train.mix": "hardmix", "mistake.enabled": False}),
    "cutmix": Method("the classifier trained with CutMix, no GANs",
                     {"train.mix": "cutmix", "mistake.enabled": False}),
    "mixup": Method("the classifier trained with mixup, no GANs",
                    {"train.mix": "mixup", "mistake.enabled": False}),
    "randaugment": Method("the classifier trained with RandAugment (2 layers), no GANs",
                          {"data.randaugment_layers": 2, "mistake.enabled": False}),
    "pgd": Method("the classifier trained adversarially (PGD, eps 2/255), no GANs",
                  {"train.pgd_eps": 2 / 255, "mistake.enabled": False}),
    "cgan": Method("mistake-driven training with one class-conditional GAN", {"gan.conditional": True}),
    # The compute-matched control: the same fine-tune, on real images only.
    "realft": Method("the real-only control: the trained classifier fine-tuned as long, on real "
                     "images only", {"mistake.nsamples_ratio": 0.0}),
    # The paper's method with one treatment of the generated images each (config.finetune,
    # config.mistake); combine them with "+": --methods=mdt_refit+mdt_priors.
    "mdt_filter": _remedy("generated images kept only if the classifier gives their class "
                          "p > 1/n (He et al.)", {"mistake.filter": "1/n"}),
    "mdt_hard": _remedy("keeping the generated images the classifier finds hardest among those "
                        "with p > 1/n (classifier feedback)",
                        {"mistake.filter": "1/n", "mistake.select": "hardest"}),
    "mdt_weight": _remedy("generated images at half the loss weight of real ones",
                          {"finetune.generated_weight": 0.5}),
    "mdt_priors": _remedy("each class keeping its real image count per epoch (generated images "
                          "take part of it)", {"finetune.sampler": "keep_priors"}),
    "mdt_bn": _remedy("generated images with BatchNorm statistics of their own (Diversify)",
                      {"finetune.separate_bn": True}),
    "mdt_refit": _remedy("then the output layer re-fit on real images, class-balanced (SYNAuG)",
                         {"finetune.refit_last_layer": True}),
}
# A method name may join several with "+" (their overrides together, left to right).
COMBINE = "+"

_METHODS = flags.DEFINE_list("methods", None, "Methods to compare: " + ", ".join(METHODS))
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds, e.g. 0,1,2 (default: the config's seeds or seed).")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Rebuild the table from the cells; run nothing.")


def say(message: str) -> None:
  print(f"mdjax: {message}", flush=True)


def cell_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, method, f"seed_{seed}")


# --- the grid's configs, all checked before any cell runs ----------------------------------------

def method_spec(name: str) -> Method:
  """The method `name`: one of METHODS, or several joined by "+" (their overrides together)."""
  parts = name.split(COMBINE)
  if len(parts) == 1:
    return METHODS[name]
  overrides = {}
  for part in parts:
    overrides.update(METHODS[part].overrides)
  # The first part says what is run; each later one adds its treatment ("realft+mdt_refit": the
  # real-only control, then the re-fit), or its description where it has none.
  later = [METHODS[p].treatment or METHODS[p].description for p in parts[1:]]
  return Method("; ".join([METHODS[parts[0]].description] + later), overrides)


def check_methods(names: list[str], config) -> None:
  """A UserError naming every unknown method, or every method whose keys this mdjax lacks."""
  unknown = [n for n in names if any(p not in METHODS for p in n.split(COMBINE))]
  if unknown:
    raise UserError(f"unknown method {', '.join(map(repr, unknown))} in --methods; the methods are "
                    + "; ".join(f"{n} ({m.description})" for n, m in METHODS.items())
                    + f" (several join with {COMBINE!r}).")
  keys = set(config_lib.config_keys(config))
  missing = [f"{n} sets config.{k}" for n in names for k in method_spec(n).overrides if k not in keys]
  if missing:
    what = "a key" if len(missing) == 1 else "keys"
    raise UserError(f"this mdjax cannot run every method asked for: {'; '.join(missing)}, {what} that "
                    "mdjax/config.py:base_config() does not define. Leave these methods out of "
                    "--methods, or use an mdjax that defines them.")


def _description(name: str) -> str:
  try:
    return method_spec(name).description
  except KeyError:
    return "(not a method of this mdjax)"


def cell_config(config, method: str, seed: int):
  """The user's config with `method`'s overrides and `seed`: what the cell runs, validated."""
  cell = config.copy_and_resolve_references()
  for key, value in method_spec(method).overrides.items():
    config_lib.set_key(cell, key, value)
  cell.seed, cell.seeds = seed, ""
  try:
    config_lib.validate(cell)
  except UserError as e:
    raise UserError(f"method {method}, seed {seed}: {e}") from None
  return cell


def parse_seeds(values: list[str] | None, config) -> list[int]:
  if values is None:
    return plan.parse_seeds(config)
  try:
    seeds = [int(v) for v in values if v.strip()]
  except ValueError:
    seeds = []
  if not seeds:
    raise UserError(f"--seeds={','.join(values)} is not valid: expected comma-separated integers "
                    "such as 0,1,2.")
  return list(dict.fromkeys(seeds))


# --- reading a cell ------------------------------------------------------------------------------

def read_results(directory: str) -> dict | None:
  """The cell's results.json if the run finished (it is written atomically, last), else None."""
  try:
    results = files.read_json(os.path.join(directory, "results.json"))
  except (OSError, ValueError):
    return None
  final = results.get("final") if isinstance(results, dict) else None
  if not isinstance(final, dict) or "test_accuracy" not in final or "finished" not in results:
    return None
  return results


def read_status(directory: str) -> dict:
  try:
    return files.read_json(os.path.join(directory, CELL_STATUS))
  except (OSError, ValueError):
    return {}


def write_status(directory: str, status: dict) -> None:
  with storage.converted(directory):
    files.write_json_atomic(os.path.join(directory, CELL_STATUS),
                            {**status, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _jsonable(tree: dict) -> dict:
  return json.loads(json.dumps(tree, default=str))


def made_by(results: dict, config: dict) -> bool:
  """Whether `results` (a results.json) were computed with `config` (a config as a dict); keys
  that change only how a run executes are ignored, as mdjax.main does when it resumes."""
  return not workdir_lib.config_differences(_jsonable(results["config"]), _jsonable(config))


def cell_results(directory: str, config: dict | None = None) -> dict | None:
  """The cell's complete results.json if it belongs to `config`: by default the config the
  runner last asked of the cell (its ablation_config.json; a cell without one is taken as it is).
  A cell rerun with a changed config keeps its old results.json until the new run replaces it,
  and those old results are not this grid's."""
  results = read_results(directory)
  if results is None:
    return None
  if config is None:
    try:
      config = files.read_json(os.path.join(directory, CELL_CONFIG))
    except (OSError, ValueError):
      return results
  return results if made_by(results, config) else None


def error_line(log_path: str) -> str:
  """The last attempt's last `mdjax: error:` line, else the last line of its output."""
  try:
    with open(log_path, errors="replace") as fh:
      lines = [part.strip() for line in fh for part in line.split("\r")]  # tqdm redraws with \r
  except OSError:
    return "(no log)"
  starts = [i for i, line in enumerate(lines) if line.startswith(LOG_HEADER)]
  lines = [line for line in lines[starts[-1] + 1 if starts else 0:] if line]
  errors = [line for line in lines if line.startswith("mdjax: error:")]
  line = errors[-1] if errors else (lines[-1] if lines else "(empty log)")
  return line if len(line) <= 400 else line[:397] + "..."


# --- stages shared between cells ------------------------------------------------------------------
#
# Cells of one seed often differ only downstream: the remedies of the fine-tune leave the trained
# classifier, its weak classes, their GANs and (most) their images as they are. A fresh cell takes
# over the finished stages of an earlier cell of the same seed whose config agrees on every key
# those stages read, so a grid trains each classifier and each set of GANs once. The stages, in
# order, with their folders and the keys each reads beyond those of the stages before it:

def _upstream(key: str) -> bool:
  # The classifier's training reads data, model, train and the seed: everything but these.
  return not key.startswith(("finetune.", "mistake.", "gan.", "distill.")) and key not in (
      "controls", "stages", "resume", "seeds")


SHARED_STAGES = (
    ("train", ("train",), _upstream),
    ("validate", (), lambda key: key in ("mistake.enabled", "mistake.nwpc")),
    ("gan", ("gan",), lambda key: key.startswith("gan.") or key in (
        "distill.enabled", "mistake.nsamples_ratio")),
    ("generate", ("generated",), lambda key: key in (
        "mistake.filter", "mistake.filter_max_draws", "mistake.select")),
)


def shared_prefix(mine: dict, theirs: dict) -> list[str]:
  """The stages (in order) a cell of config `mine` can take from a cell of config `theirs`."""
  a, b = workdir_lib.flatten(mine), workdir_lib.flatten(theirs)
  differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
  out = []
  for name, _, reads in SHARED_STAGES:
    if any(reads(k) for k in differ):
      break
    out.append(name)
  return out


def _link_or_copy(src: str, dst: str) -> None:
  # Hard links: the cells never rewrite these files (a finished stage's outputs are only read).
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def take_shared_stages(workdir: str, directory: str, config: dict, seed: int,
                       methods: list[str]) -> tuple[str, list[str]] | None:
  """Seeds the fresh cell `directory` with the finished stages of the earlier cell of `seed`
  that shares the most with it; returns (that cell's method, the stages) or None."""
  if os.path.isdir(os.path.join(directory, "stages")):
    return None  # not fresh: it resumes its own stages
  best = None
  for other in methods:
    donor = cell_dir(workdir, other, seed)
    if donor == directory or not os.path.isdir(os.path.join(donor, "stages")):
      continue
    try:
      theirs = files.read_json(os.path.join(donor, "config.json"))
    except (OSError, ValueError):
      continue
    stages = []
    for name in shared_prefix(config, theirs):  # as far as the other cell has finished them
      if not os.path.isfile(os.path.join(donor, "stages", f"{name}.json")):
        break
      stages.append(name)
    if stages and (best is None or len(stages) > len(best[1])):
      best = (other, stages)
  if best is None:
    return None
  donor = cell_dir(workdir, best[0], seed)
  with storage.converted(directory):
    os.makedirs(os.path.join(directory, "stages"), exist_ok=True)
    for name, folders, _ in SHARED_STAGES:
      if name not in best[1]:
        continue
      for folder in folders:
        if os.path.isdir(os.path.join(donor, folder)):
          shutil.copytree(os.path.join(donor, folder), os.path.join(directory, folder),
                          copy_function=_link_or_copy, dirs_exist_ok=True)
      shutil.copy2(os.path.join(donor, "stages", f"{name}.json"),
                   os.path.join(directory, "stages", f"{name}.json"))
  return best


# --- running a cell ------------------------------------------------------------------------------

class Interrupted(Exception):
  """Ctrl-C during a cell: the grid stops."""


def _count(items, noun: str) -> str:
  return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds} s"
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes} min {seconds:02d} s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours} h {minutes:02d} min"


def cell_command(directory: str) -> list[str]:
  return [sys.executable, "-m", "mdjax.main",
          f"--config={FROM_JSON}:{os.path.abspath(os.path.join(directory, CELL_CONFIG))}",
          f"--workdir={os.path.abspath(directory)}"]


def run_cell(directory: str, config) -> dict:
  """Runs one cell's mdjax.main to its end; returns its status ("done" or "failed")."""
  command = cell_command(directory)
  env = dict(os.environ)
  # The cells run the mdjax this runner imported, wherever the command was started.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
  write_status(directory, {"state": "running", "pid": os.getpid()})
  start = time.perf_counter()
  log_path = os.path.join(directory, CELL_LOG)
  with storage.converted(directory), open(log_path, "a", encoding="utf-8") as log:
    log.write(f"{LOG_HEADER} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      code = proc.wait()
    except KeyboardInterrupt:
      # The terminal's Ctrl-C reached the cell too: let it keep its finished stages and stop.
      try:
        code = proc.wait(timeout=120)
      except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()
      write_status(directory, {"state": "interrupted", "seconds": time.perf_counter() - start})
      raise Interrupted() from None
  seconds = time.perf_counter() - start
  if code in (130, -2):
    write_status(directory, {"state": "interrupted", "seconds": seconds})
    raise Interrupted()
  if code == 0 and cell_results(directory) is None:
    error = ("mdjax.main finished without a complete results.json: the cell's config.stages must "
             "include every stage up to test")
  elif code != 0:
    error = (f"killed by signal {-code}" if code < 0 else f"exit status {code}") + ": " + error_line(log_path)
  else:
    error = None
  status = {"state": "failed" if error else "done", "exit_status": code, "seconds": seconds}
  if error:
    status["error"] = error
  write_status(directory, status)
  return status


def run_grid(workdir: str, cells: dict[tuple[str, int], Any], methods: list[str], seeds: list[int]) -> int:
  """Runs every unfinished cell; returns the number of failed cells."""
  grid_start = time.perf_counter()
  failed = 0
  for i, ((method, seed), config) in enumerate(cells.items(), 1):
    directory = cell_dir(workdir, method, seed)
    name = f"ablate [{i}/{len(cells)}] {method} seed {seed}"
    results = cell_results(directory, config.to_dict())
    # What this grid asks of the cell, also of a finished one: the table reads it (cell_results).
    with storage.converted(directory):
      os.makedirs(directory, exist_ok=True)
      files.write_json_atomic(os.path.join(directory, CELL_CONFIG), _jsonable(config.to_dict()))
    if results is not None:
      say(f"{name}: skipped, finished earlier (test accuracy {results['final']['test_accuracy']:.4f})")
      continue
    taken = take_shared_stages(workdir, directory, _jsonable(config.to_dict()), seed, methods)
    if taken:
      say(f"{name}: takes the finished stages {', '.join(taken[1])} of {taken[0]} seed {seed} "
          "(same config up to there)")
    say(f"{name}: running in {directory} (log: {os.path.join(directory, CELL_LOG)})")
    try:
      status = run_cell(directory, config)
    finally:
      write_table(workdir, methods, seeds)
    took = f"{_duration(status['seconds'])}, grid {_duration(time.perf_counter() - grid_start)} so far"
    if status["state"] == "done":
      say(f"{name}: done in {took} (test accuracy "
          f"{cell_results(directory)['final']['test_accuracy']:.4f})")
    else:
      failed += 1
      say(f"{name}: FAILED after {took}: {status['error']}")
  return failed


# --- the table -----------------------------------------------------------------------------------

@dataclasses.dataclass
class CellResult:
  method: str
  seed: int
  state: str  # done, failed, interrupted, running, unfinished, not started
  test_accuracy: float | None = None
  weak_classes: list[int] | None = None
  weak_accuracy: float | None = None
  seconds: float | None = None
  error: str | None = None
  results: dict | None = None  # the cell's results.json, when done


def read_cell(workdir: str, method: str, seed: int) -> CellResult:
  directory = cell_dir(workdir, method, seed)
  results = cell_results(directory)
  if results is None:
    status = read_status(directory)
    state = status.get("state") or ("unfinished" if os.path.isdir(directory) else "not started")
    # A "running" status whose runner is gone (killed) is an unfinished cell.
    state = "unfinished" if state in ("done", "running") else state
    return CellResult(method, seed, state, error=status.get("error"))
  seconds = sum(s or 0.0 for s in results.get("stage_seconds", {}).values())
  return CellResult(method, seed, "done", test_accuracy=float(results["final"]["test_accuracy"]),
                    seconds=float(seconds), results=results)


def add_weak_accuracy(workdir: str, cell: CellResult) -> None:
  """The cell's mean test accuracy over the weak classes of the same seed's `mdt` cell."""
  if cell.state != "done":
    return
  reference = cell_results(cell_dir(workdir, REFERENCE, cell.seed))
  if reference is None or not reference.get("worst_classes"):
    return
  results = cell_results(cell_dir(workdir, cell.method, cell.seed))
  per_class = results["final"]["test_class_accuracy"]
  cell.weak_classes = [int(k) for k in reference["worst_classes"]]
  cell.weak_accuracy = float(np.mean([per_class[k] for k in cell.weak_classes]))


def _stats(values: list[float]) -> tuple[float | None, float | None]:
  """Mean and std (ddof=0) of `values`; the std only from two values on."""
  if not values:
    return None, None
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=0)) if len(values) > 1 else None)


def paired(cells: list[CellResult], control: list[CellResult], attribute: str
           ) -> tuple[float | None, float | None, int]:
  """Mean and std over seeds of a method's `attribute` minus the control's in the same seed (the
  seeds both finished); and how many of those seeds the method was ahead."""
  theirs = {c.seed: getattr(c, attribute) for c in control if getattr(c, attribute) is not None}
  diffs = [getattr(c, attribute) - theirs[c.seed] for c in cells
           if getattr(c, attribute) is not None and c.seed in theirs]
  mean, std = _stats(diffs)
  return mean, std, sum(d > 0 for d in diffs)


def summarize(workdir: str, methods: list[str], seeds: list[int], control: str | None = None
              ) -> tuple[list[dict], list[CellResult]]:
  """One row per method (see the module docstring) and every cell; with a `control` method, each
  row also holds its per-seed differences from the control."""
  rows, cells = [], []
  by_method = {}
  for method in methods:
    mine = [read_cell(workdir, method, seed) for seed in seeds]
    for cell in mine:
      add_weak_accuracy(workdir, cell)
    by_method[method] = mine
  for method in methods:
    mine = by_method[method]
    cells += mine
    done = [c for c in mine if c.state == "done"]
    weak = [c.weak_accuracy for c in done if c.weak_accuracy is not None]
    test_mean, test_std = _stats([c.test_accuracy for c in done])
    weak_mean, weak_std = _stats(weak)
    rows.append({
        "method": method,
        "description": _description(method),
        "seeds": len(seeds), "done": len(done), "failed": sum(c.state == "failed" for c in mine),
        "test_accuracy_mean": test_mean, "test_accuracy_std": test_std,
        "weak_class_accuracy_mean": weak_mean, "weak_class_accuracy_std": weak_std,
        "weak_class_seeds": len(weak),
        "wall_seconds_mean": _stats([c.seconds for c in done])[0],
        "errors": "; ".join(f"seed {c.seed}: {c.error}" for c in mine if c.state == "failed"),
    })
    if control in by_method and method != control:
      for attribute, name in (("test_accuracy", "test"), ("weak_accuracy", "weak")):
        mean, std, ahead = paired(done, by_method[control], attribute)
        rows[-1].update({f"vs_control_{name}_mean": mean, f"vs_control_{name}_std": std,
                         f"vs_control_{name}_ahead": ahead})
  return rows, cells


def _mean_std(mean: float | None, std: float | None, n: int, of: int | None = None) -> str:
  if mean is None:
    return "n/a"
  text = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else " (1 seed)")
  return text + (f" ({n} seeds)" if of is not None and n != of and n > 1 else "")


def _cell_text(text: str | None) -> str:
  return (text or "").replace("|", "\\|")


def markdown(workdir: str, rows: list[dict], cells: list[CellResult], seeds: list[int],
             control: str | None = None) -> str:
  lines = [f"# mdjax ablation: {os.path.abspath(workdir)}", "",
           f"Seeds {', '.join(map(str, seeds))}. Each cell is the mdjax workdir `<method>/seed_<s>/` "
           f"(its config: `{CELL_CONFIG}`, its output: `{CELL_LOG}`).", "",
           "| method | what it is | seeds done | test accuracy | weak classes' accuracy | "
           "wall time per cell |", "|---|---|---|---|---|---|"]
  for r in rows:
    done = f"{r['done']} of {r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
    wall = "n/a" if r["wall_seconds_mean"] is None else _duration(r["wall_seconds_mean"])
    lines.append(f"| {r['method']} | {r['description']} | {done} | "
                 f"{_mean_std(r['test_accuracy_mean'], r['test_accuracy_std'], r['done'])} | "
                 f"{_mean_std(r['weak_class_accuracy_mean'], r['weak_class_accuracy_std'], r['weak_class_seeds'], r['done'])} | "
                 f"{wall} |")
  if control is not None and any("vs_control_test_mean" in r for r in rows):
    lines += ["", f"### Against the control `{control}`, seed by seed", "",
              f"Each method's accuracy minus `{control}`'s in the same seed, mean ± std over the "
              "seeds both finished, and in how many of them the method was ahead.", "",
              "| method | test accuracy difference | ahead | weak classes' difference | ahead |",
              "|---|---|---|---|---|"]
    signed = lambda m, sd: "n/a" if m is None else (  # noqa: E731
        f"{m:+.4f}" + (f" ± {sd:.4f}" if sd is not None else ""))
    for r in rows:
      if "vs_control_test_mean" in r:
        lines.append(f"| {r['method']} | {signed(r['vs_control_test_mean'], r['vs_control_test_std'])}"
                     f" | {r['vs_control_test_ahead']} | "
                     f"{signed(r['vs_control_weak_mean'], r['vs_control_weak_std'])} | "
                     f"{r['vs_control_weak_ahead']} |")
  lines += ["", "Mean ± standard deviation over the seeds whose cell finished (std with ddof=0, "
            "as mdjax's multi-seed results.json). Test accuracy: results.json `final.test_accuracy`. "
            f"Weak classes' accuracy: the mean test accuracy over the weak classes that the `{REFERENCE}` "
            "cell of the same seed selected on validation, for every method, so each seed's methods "
            f"are compared on the same classes (n/a until that `{REFERENCE}` cell has finished). Wall "
            "time: the sum of the cell's stage times (results.json `stage_seconds`), without process "
            "start-up, data loading or interrupted attempts.", "", "## Cells", "",
            "| method | seed | state | test accuracy | weak classes | weak classes' accuracy | "
            "stage time | error |", "|---|---|---|---|---|---|---|---|"]
  fmt = lambda x: "" if x is None else f"{x:.4f}"  # noqa: E731
  for c in cells:
    weak = "" if c.weak_classes is None else ", ".join(map(str, c.weak_classes))
    wall = "" if c.seconds is None else _duration(c.seconds)
    lines.append(f"| {c.method} | {c.seed} | {c.state} | {fmt(c.test_accuracy)} | {weak} | "
                 f"{fmt(c.weak_accuracy)} | {wall} | {_cell_text(c.error)} |")
  details = [c for c in cells if c.results is not None and c.weak_classes]
  if details:
    lines += ["", "## Weak classes per cell", "",
              "Test accuracy of each weak class, trained classifier -> final; for classes that got "
              "generated images, the independent judge's fraction, their diversity ratio, their "
              "share of near-copies of training images, and the steps their GAN trained.", "",
              "| method | seed | weak classes |", "|---|---|---|"]
    for c in details:
      lines.append(f"| {c.method} | {c.seed} | {weak_class_details(c.results, c.weak_classes)} |")
  return "\n".join(lines) + "\n"


def weak_class_details(results: dict, weak: list[int]) -> str:
  """"Shirt 0.612 -> 0.640 (judge 0.55, diversity 0.91, copies 0.02, 400 steps) · ..."."""
  names, quality = results["classes"], results.get("gan_quality") or {}
  stopping = results.get("gan_stopping") or {}
  parts = []
  for k in weak:
    text = (f"{names[k]} {results['baseline']['test_class_accuracy'][k]:.3f} -> "
            f"{results['final']['test_class_accuracy'][k]:.3f}")
    q, stop = quality.get(str(k)), stopping.get(str(k))
    facts = []
    if q:
      facts.append(f"judge {q['judge_fraction']:.2f}")
      if q.get("diversity_ratio") is not None:
        facts.append(f"diversity {q['diversity_ratio']:.2f}")
      if q.get("memorisation") is not None:
        facts.append(f"copies {q['memorisation']:.2f}")
    if stop:
      facts.append(f"{stop['steps']} steps")
    parts.append(text + (f" ({', '.join(facts)})" if facts else ""))
  return " · ".join(parts)


CSV_COLUMNS = ("method", "description", "seeds", "done", "failed", "test_accuracy_mean",
               "test_accuracy_std", "weak_class_accuracy_mean", "weak_class_accuracy_std",
               "weak_class_seeds", "wall_seconds_mean", "errors")


def write_table(workdir: str, methods: list[str], seeds: list[int],
                control: str | None = None) -> list[dict]:
  """Writes ablation.md, ablation.csv and ablation.png (atomically) from the cells on disk;
  returns the rows."""
  control = control if control is not None else (CONTROL if CONTROL in methods else None)
  rows, cells = summarize(workdir, methods, seeds, control)
  out = io.StringIO()
  writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
  writer.writeheader()
  writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
  with storage.converted(workdir):
    files.write_atomic(os.path.join(workdir, TABLE_MD),
                       markdown(workdir, rows, cells, seeds, control))
    files.write_atomic(os.path.join(workdir, TABLE_CSV), out.getvalue())
    if any(r["done"] for r in rows):
      files.write_atomic(os.path.join(workdir, FIGURE), figure(rows, cells))
  return rows


def figure(rows: list[dict], cells: list[CellResult]) -> bytes:
  """A PNG of the table: per method, test accuracy and the weak classes' accuracy, every seed as
  a dot and the mean as a bar with the seeds' std. A researcher would rather look than read."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  methods = [r["method"] for r in rows]
  panels = (("test_accuracy", "test_accuracy_mean", "test_accuracy_std", "test accuracy"),
            ("weak_accuracy", "weak_class_accuracy_mean", "weak_class_accuracy_std",
             "weak classes' accuracy"))
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(methods) + 4), 4.5))
  for ax, (attribute, mean_key, std_key, title) in zip(axes, panels):
    x = np.arange(len(methods))
    means = [r[mean_key] if r[mean_key] is not None else np.nan for r in rows]
    stds = [r[std_key] if r[std_key] is not None else 0.0 for r in rows]
    ax.bar(x, means, yerr=stds, color="#9ecae1", edgecolor="#3182bd", capsize=4)
    for i, method in enumerate(methods):
      values = [getattr(c, attribute) for c in cells
                if c.method == method and getattr(c, attribute) is not None]
      ax.plot(np.full(len(values), i), values, "o", color="#08519c", markersize=4)
    values = [getattr(c, attribute) for c in cells if getattr(c, attribute) is not None]
    if values:  # the axis spans the seeds' values with a margin: differences of tenths show
      margin = max(max(values) - min(values), 0.005) * 0.3
      ax.set_ylim(min(values) - margin, max(values) + margin)
    ax.set_xticks(x, methods, rotation=35, ha="right", fontsize=8)
    ax.set_title(f"{title} (mean ± std, dots: seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  out = io.BytesIO()
  fig.savefig(out, format="png", dpi=110)
  plt.close(fig)
  return out.getvalue()


def find_grid(workdir: str) -> tuple[list[str], list[int]]:
  """The methods (registry order first) and seeds of the cells already in `workdir`."""
  methods, seeds = [], set()
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    path = os.path.join(workdir, name)
    found = [e for e in os.listdir(path) if e.startswith("seed_") and e[5:].lstrip("-").isdigit()
             ] if os.path.isdir(path) else []
    if found:
      methods.append(name)
      seeds.update(int(e[5:]) for e in found)
  order = {name: i for i, name in enumerate(METHODS)}
  methods.sort(key=lambda n: (order.get(n, len(order)), n))
  return methods, sorted(seeds)


# --- the command ---------------------------------------------------------------------------------

def default_workdir(config, argv: list[str]) -> str:
  digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join("runs", f"ablation-{main_lib.config_name(argv)}-{digest[:8]}")


def table_only(workdir: str) -> int:
  methods, seeds = find_grid(workdir)
  methods = _METHODS.value or methods
  seeds = [int(s) for s in _SEEDS.value] if _SEEDS.value else seeds
  if not methods or not seeds:
    raise UserError(f"no ablation cells (<method>/seed_<s>/) in {workdir}; run the grid first, or "
                    "pass the --workdir it ran in.")
  write_table(workdir, methods, seeds)
  say(f"ablate: table of {_count(methods, 'method')} x {_count(seeds, 'seed')} written to "
      f"{os.path.join(workdir, TABLE_MD)} and {TABLE_CSV}")
  return 0


def ablate(config, workdir: str) -> int:
  """Runs the grid; returns the exit status (0, or 1 if a cell failed)."""
  if not _METHODS.value:
    raise UserError("--methods is required: a comma-separated list of " + ", ".join(METHODS)
                    + " (--table_only rebuilds the table of an existing grid).")
  methods = list(dict.fromkeys(m.strip() for m in _METHODS.value if m.strip()))
  seeds = parse_seeds(_SEEDS.value, config)
  check_methods(methods, config)
  if not os.path.exists(FROM_JSON):
    raise UserError(f"{FROM_JSON} is missing: mdjax.ablate runs its cells with the configs/ folder "
                    "of an mdjax source checkout.")
  # Every cell's config is checked before the first cell runs (seed-major order, see docstring).
  cells = {(m, s): cell_config(config, m, s) for s in seeds for m in methods}
  with storage.converted(workdir):
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_lib.acquire_lock(os.path.join(workdir, workdir_lib.LOCK_FILE))
  with lock:
    say(f"ablate: {_count(methods, 'method')} x {_count(seeds, 'seed')} = {_count(cells, 'cell')} in "
        f"{os.path.abspath(workdir)}")
    if REFERENCE not in methods:
      say(f"ablate: note: the weak classes' accuracy is measured on the weak classes of the "
          f"{REFERENCE} cells; without {REFERENCE} in --methods (or in this workdir) it stays n/a.")
    try:
      failed = run_grid(workdir, cells, methods, seeds)
    except (Interrupted, KeyboardInterrupt):
      print(f"\nmdjax: ablate: interrupted; finished cells and stages are kept, the table "
            f"({os.path.join(workdir, TABLE_MD)}) shows the grid so far. Run the same command again "
            "to resume.", file=sys.stderr)
      return 130
  rows = write_table(workdir, methods, seeds)
  done = sum(r["done"] for r in rows)
  say(f"ablate: {done} of {len(cells)} cells done" + (f", {failed} failed" if failed else "")
      + f"; table: {os.path.join(workdir, TABLE_MD)}, {os.path.join(workdir, TABLE_CSV)}")
  return 1 if failed else 0


def main() -> None:
  argv, config = main_lib.parse_flags(sys.argv)
  if len(argv) > 1:
    main_lib.fail(f"unexpected arguments {argv[1:]}; use --config=..., --workdir=..., --methods=...")
  if flags.FLAGS.num_processes and flags.FLAGS.num_processes > 1:
    main_lib.fail("mdjax.ablate runs its cells one after another in this process's machine; run a "
                  "multi-process cell with launch/ and mdjax.main.")
  try:
    workdir = flags.FLAGS.workdir or default_workdir(config, sys.argv)
    code = table_only(workdir) if _TABLE_ONLY.value else ablate(config, workdir)
  except UserError as e:
    main_lib.fail(str(e), e.exit_code)
  sys.exit(code)


if __name__ == "__main__":
  main()
