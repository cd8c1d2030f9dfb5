"""mdjax.ablate: a grid of methods x seeds, each cell a real mdjax.main run, and its table.

One tiny grid runs for real (about a minute on 2 cores): `baseline` for seeds 0 and 1 on the smoke
config cut to one epoch on 10 images per class, beside `broken` (tests/ablate_worker.py), whose
cells fail once their data is loaded. The GAN methods are left out: compiling the class GANs alone
takes minutes here.
"""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mdjax import ablate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "ablate_worker.py")
TINY = ["--config=configs/default.py:smoke", "--config.train.epochs=1",
        "--config.data.max_train_per_class=10"]


def run_ablate(workdir, *flags):
  env = dict(os.environ)  # conftest's JAX_COMPILATION_CACHE_DIR: the second seed compiles nothing
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return subprocess.run([sys.executable, WORKER, *TINY, f"--workdir={workdir}", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=600, env=env)


def load(path):
  with open(path) as fh:
    return json.load(fh)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ablation") / "grid"
  result = run_ablate(workdir, "--methods=broken,baseline", "--seeds=0,1")
  return workdir, result


def test_a_failing_cell_is_reported_and_the_others_complete(grid):
  workdir, result = grid
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
  for seed in (0, 1):
    assert os.path.exists(workdir / "baseline" / f"seed_{seed}" / "results.json")
    assert f"broken seed {seed}: FAILED" in result.stdout
    assert f"baseline seed {seed}: done in" in result.stdout
    status = load(workdir / "broken" / f"seed_{seed}" / "ablation_status.json")
    assert status["state"] == "failed" and "mistake.nwpc=50" in status["error"]
  rows = {r["method"]: r for r in csv.DictReader(open(workdir / "ablation.csv"))}
  assert rows["broken"]["done"] == "0" and rows["broken"]["failed"] == "2"
  assert "mistake.nwpc=50 is not valid" in rows["broken"]["errors"]
  table = open(workdir / "ablation.md").read()
  assert "| broken | 0 | failed |" in table and "0 of 2 (2 failed)" in table


def test_the_table_holds_the_runs_own_numbers(grid):
  workdir, _ = grid
  runs = [load(workdir / "baseline" / f"seed_{s}" / "results.json") for s in (0, 1)]
  for r in runs:  # mistake-driven training off: no weak classes, no fine-tune
    assert r["worst_classes"] == [] and r["final"] == r["baseline"]
  acc = [r["final"]["test_accuracy"] for r in runs]
  wall = [sum(r["stage_seconds"].values()) for r in runs]
  row = {r["method"]: r for r in csv.DictReader(open(workdir / "ablation.csv"))}["baseline"]
  assert row["done"] == "2" and row["failed"] == "0"
  assert float(row["test_accuracy_mean"]) == pytest.approx((acc[0] + acc[1]) / 2, abs=1e-12)
  assert float(row["test_accuracy_std"]) == pytest.approx(abs(acc[0] - acc[1]) / 2, abs=1e-12)  # ddof=0
  assert float(row["wall_seconds_mean"]) == pytest.approx((wall[0] + wall[1]) / 2, abs=1e-9)
  assert row["weak_class_accuracy_mean"] == ""  # no mdt cell to take the weak classes from
  mean, std = (acc[0] + acc[1]) / 2, abs(acc[0] - acc[1]) / 2
  assert f"| 2 of 2 | {mean:.4f} ± {std:.4f} | n/a |" in open(workdir / "ablation.md").read()


def test_weak_classes_come_from_the_mdt_cell_of_the_same_seed(grid, tmp_path):
  # An mdt cell made from the real baseline results, with chosen weak classes per seed.
  workdir = tmp_path / "grid"
  shutil.copytree(grid[0], workdir)
  weak = {0: [1, 3], 1: [0, 2, 7]}
  for seed, classes in weak.items():
    results = load(workdir / "baseline" / f"seed_{seed}" / "results.json")
    results["worst_classes"] = classes
    (workdir / "mdt" / f"seed_{seed}").mkdir(parents=True)
    with open(workdir / "mdt" / f"seed_{seed}" / "results.json", "w") as fh:
      json.dump(results, fh)
  assert ablate.find_grid(str(workdir)) == (["baseline", "mdt", "broken"], [0, 1])
  rows = {r["method"]: r for r in ablate.write_table(str(workdir), ["baseline", "mdt"], [0, 1])}
  per_seed = [np.mean([load(workdir / "baseline" / f"seed_{s}" / "results.json")["final"]
                       ["test_class_accuracy"][k] for k in weak[s]]) for s in (0, 1)]
  for method in ("baseline", "mdt"):
    assert rows[method]["weak_class_accuracy_mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert rows[method]["weak_class_accuracy_std"] == pytest.approx(np.std(per_seed), abs=1e-12)
  assert "| baseline | 1 | done |" in open(workdir / "ablation.md").read()
  assert "| 0, 2, 7 |" in open(workdir / "ablation.md").read()


def test_a_rerun_skips_finished_cells(grid):
  workdir, _ = grid
  paths = [workdir / "baseline" / f"seed_{s}" / "results.json" for s in (0, 1)]
  before = [os.stat(p).st_mtime_ns for p in paths]
  result = run_ablate(workdir, "--methods=baseline", "--seeds=0,1")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert result.stdout.count("skipped, finished earlier") == 2
  assert [os.stat(p).st_mtime_ns for p in paths] == before


@pytest.mark.parametrize("methods, expected", [
    ("baseline,nosuch", "mdjax: error: unknown method 'nosuch' in --methods"),
    ("baseline,needs_key", "mdjax: error: this mdjax cannot run every method asked for: "
                           "needs_key sets config.train.no_such_key"),
])
def test_a_method_that_cannot_run_stops_the_grid_before_any_cell(tmp_path, methods, expected):
  result = run_ablate(tmp_path / "grid", f"--methods={methods}", "--seeds=0")
  assert result.returncode == 2
  assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
  assert not os.path.exists(tmp_path / "grid")


def default_config():
  spec = importlib.util.spec_from_file_location("cfg_default", os.path.join(REPO, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_every_method_gives_a_valid_config_or_names_its_missing_key():
  config = default_config()
  keys = ablate.config_lib.config_keys(config)
  for name, method in ablate.METHODS.items():
    missing = [k for k in method.overrides if k not in keys]
    if missing:  # a method whose keys another change adds
      with pytest.raises(ablate.UserError, match=f"{name} sets config.{missing[0]}"):
        ablate.check_methods(["mdt", name], config)
      continue
    ablate.check_methods([name], config)
    cell = ablate.cell_config(config, name, seed=3)
    assert cell.seed == 3 and cell.seeds == "" and config.seed == 0
    flat = dict(_leaves(cell.to_dict()))
    for key, value in method.overrides.items():
      assert flat[key] == value, (name, key)


def _leaves(tree, prefix=""):
  for name, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{name}.")
    else:
      yield prefix + name, value


def test_results_from_another_config_are_not_counted(grid, tmp_path):
  # The runner asked the cell for another config (its ablation_config.json) and that run has not
  # replaced results.json: the old results are not this grid's.
  workdir = tmp_path / "grid"
  shutil.copytree(grid[0], workdir)
  path = workdir / "baseline" / "seed_0" / "ablation_config.json"
  config = load(path)
  config["train"]["epochs"] += 1
  path.write_text(json.dumps(config))
  rows = {r["method"]: r for r in ablate.write_table(str(workdir), ["baseline"], [0, 1])}
  assert rows["baseline"]["done"] == 1
  seed_1 = load(workdir / "baseline" / "seed_1" / "results.json")["final"]["test_accuracy"]
  assert rows["baseline"]["test_accuracy_mean"] == seed_1


def test_the_error_line_is_the_last_attempts(tmp_path):
  log = tmp_path / "ablation.log"
  log.write_text(f"{ablate.LOG_HEADER} 1: cmd\nmdjax: error: an old mistake\n"
                 f"{ablate.LOG_HEADER} 2: cmd\ntrain: 10%\rtrain: 20%\nTraceback (most recent call last):\n"
                 "  File ...\nValueError: a bug\n")
  assert ablate.error_line(str(log)) == "ValueError: a bug"
  log.write_text(log.read_text() + f"{ablate.LOG_HEADER} 3: cmd\nmdjax: error: the disk is full\nmore\n")
  assert ablate.error_line(str(log)) == "mdjax: error: the disk is full"


def test_methods_combine_with_a_plus():
  combined = ablate.method_spec("mdt_refit+mdt_priors")
  assert combined.overrides == {"finetune.refit_last_layer": True,
                                "finetune.sampler": "keep_priors"}
  # A combination reads as one method: the first part, then what each later part adds.
  control = ablate.method_spec("realft+mdt_refit").description
  assert control.startswith(ablate.METHODS["realft"].description)
  assert "re-fit" in control and "the paper's method" not in control
  config = default_config()
  ablate.check_methods(["mdt", "mdt_refit+mdt_priors"], config)
  cell = ablate.cell_config(config, "mdt_refit+mdt_hard", seed=1)
  assert cell.finetune.refit_last_layer and cell.mistake.select == "hardest"
  with pytest.raises(ablate.UserError, match="unknown method 'mdt_refit\\+nosuch'"):
    ablate.check_methods(["mdt_refit+nosuch"], config)


def _fake_cell(workdir, method, seed, config, stages):
  cell = workdir / method / f"seed_{seed}"
  (cell / "stages").mkdir(parents=True)
  (cell / "config.json").write_text(json.dumps(config))
  for name in stages:
    (cell / "stages" / f"{name}.json").write_text(json.dumps({"stage": name, "by": method}))
  for folder in ("train", "gan", "generated"):
    (cell / folder / "sub").mkdir(parents=True)
    (cell / folder / "sub" / "file").write_text(f"{method} {folder}")
  return cell


def test_a_fresh_cell_takes_the_stages_it_shares_with_an_earlier_one(tmp_path):
  config = default_config()
  mdt = ablate.cell_config(config, "mdt", 0).to_dict()
  _fake_cell(tmp_path, "mdt", 0, ablate._jsonable(mdt), ["train", "validate", "gan", "generate"])
  methods = ["mdt", "mdt_refit", "mdt_hard", "randaugment", "realft"]

  def take(method):
    cell = ablate._jsonable(ablate.cell_config(config, method, 0).to_dict())
    return ablate.take_shared_stages(str(tmp_path), str(tmp_path / method / "seed_0"), cell, 0,
                                     methods)

  # Only the fine-tune differs: every stage up to it is taken, files hard-linked.
  assert take("mdt_refit") == ("mdt", ["train", "validate", "gan", "generate"])
  refit = tmp_path / "mdt_refit" / "seed_0"
  assert (refit / "gan" / "sub" / "file").read_text() == "mdt gan"
  assert os.path.samefile(refit / "train" / "sub" / "file", tmp_path / "mdt" / "seed_0" / "train"
                          / "sub" / "file")
  assert json.loads((refit / "stages" / "generate.json").read_text())["by"] == "mdt"
  assert not (refit / "stages" / "finetune.json").exists() and not (refit / "config.json").exists()
  # The filter changes which images are kept: the GANs are shared, the generated set is not.
  assert take("mdt_hard") == ("mdt", ["train", "validate", "gan"])
  assert not (tmp_path / "mdt_hard" / "seed_0" / "generated").exists()
  # No images to generate: its GAN stage differs (skipped), the classifier is shared.
  assert take("realft") == ("mdt", ["train", "validate"])
  # Another classifier recipe shares nothing; a cell with stages of its own takes nothing.
  assert take("randaugment") is None
  assert take("mdt_refit") is None


def test_differences_from_the_control_seed_by_seed_and_the_figure(grid, tmp_path):
  workdir = tmp_path / "grid"
  shutil.copytree(grid[0], workdir)
  base = [load(workdir / "baseline" / f"seed_{s}" / "results.json") for s in (0, 1)]
  shift = {"realft": (0.010, 0.020), "mdt": (0.015, 0.005)}  # test accuracy added per seed
  for method, deltas in shift.items():
    for seed, delta in zip((0, 1), deltas):
      results = json.loads(json.dumps(base[seed]))
      results["final"]["test_accuracy"] += delta
      results["worst_classes"] = [1, 2]
      (workdir / method / f"seed_{seed}").mkdir(parents=True)
      (workdir / method / f"seed_{seed}" / "results.json").write_text(json.dumps(results))
  rows = {r["method"]: r for r in ablate.write_table(str(workdir), ["realft", "mdt"], [0, 1])}
  diffs = [0.015 - 0.010, 0.005 - 0.020]
  assert rows["mdt"]["vs_control_test_mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
  assert rows["mdt"]["vs_control_test_std"] == pytest.approx(np.std(diffs), abs=1e-12)
  assert rows["mdt"]["vs_control_test_ahead"] == 1
  assert rows["mdt"]["vs_control_weak_mean"] == pytest.approx(0.0, abs=1e-12)  # same classes
  assert "vs_control_test_mean" not in rows["realft"]
  table = (workdir / "ablation.md").read_text()
  assert "Against the control `realft`" in table and f"| mdt | {np.mean(diffs):+.4f}" in table
  assert "## Weak classes per cell" in table
  png = (workdir / "ablation.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
