"""The whole mistake-driven pipeline, `python -m mdjax.main`, on a small smoke config.

One uninterrupted run is the reference (shared with tests/test_faults.py: `smoke_reference` in
tests/conftest.py); a second run is killed (SIGKILL, as `kill -9`) in the middle of training and
resumed, and must reach the same results. tests/test_faults.py kills and faults the other stages.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_runs import SMOKE_RUN, log, run_worker


@pytest.fixture
def reference(smoke_reference):
  workdir, stdout = smoke_reference
  return Path(workdir), stdout


def load_results(workdir):
  with open(os.path.join(workdir, "results.json")) as fh:
    return json.load(fh)


def test_results_schema_and_consistency(reference):
  workdir, stdout = reference
  r = load_results(workdir)
  for key in ("config", "classes", "baseline", "final", "val_class_accuracy", "worst_classes",
              "generated_per_class", "stage_seconds", "gan_quality", "controls"):
    assert key in r, key
  n = len(r["classes"])
  assert n == 10
  for name in ("baseline", "final"):
    assert 0 <= r[name]["test_accuracy"] <= 1 and len(r[name]["test_class_accuracy"]) == n
  # The weak classes are the nWPC lowest validation accuracies (SMOKE_RUN sets nWPC = 2).
  assert "--config.mistake.nwpc=2" in SMOKE_RUN and len(r["worst_classes"]) == 2
  val = np.asarray(r["val_class_accuracy"])
  assert max(val[r["worst_classes"]]) <= min(np.delete(val, r["worst_classes"]))
  # ceil(ratio x |C|) images per weak class, |C| its training images; and they were written.
  sizes = r["split_sizes"]
  from mdjax.gan import generate
  per_class = {}
  for entry in generate.read_index(os.path.join(workdir, "generated"))["images"]:
    per_class[entry["class_index"]] = per_class.get(entry["class_index"], 0) + 1
  stages = json.load(open(os.path.join(workdir, "stages", "generate.json")))
  for k in r["worst_classes"]:
    size = stages["class_sizes"][str(k)]
    assert r["generated_per_class"][str(k)] == math.ceil(0.5 * size) == per_class[k]
  assert sum(stages["class_sizes"].values()) < sizes["train"]
  assert set(r["stage_seconds"]) >= {"train", "validate", "gan", "generate", "finetune", "test"}
  for k in r["worst_classes"]:
    q = r["gan_quality"][str(k)]
    assert 0 <= q["target_class_fraction"] <= 1 and q["frechet_distance"] >= 0
    assert q["diversity_ratio"] > 0  # every image the same would be 0
  # The report a person reads, with its figures.
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| diversity |" in report
  assert "per-class test accuracy" in report and "real (left) and generated (right)" in report
  assert os.path.getsize(os.path.join(workdir, "figures", "class_accuracy.png")) > 1000
  # One summary line per stage, and the baseline vs final figures at the end.
  for stage in ("train", "validate", "gan", "generate", "finetune", "test"):
    assert f"mdjax: [{stage}] done" in stdout
  assert "baseline (trained, no mistake-driven fine-tune) test accuracy" in stdout


def test_kill_during_training_then_resume_gives_the_same_results(reference, tmp_path):
  # kill -9 in the later stages (the GAN stage, also during a background checkpoint save; the
  # generated set; the fine-tune) is injected by tests/test_faults.py's chains on the same config.
  workdir = tmp_path / "run"
  for kill in ("train:25",):
    result = run_worker(kill, workdir)
    assert result.returncode == -9, (kill, log(result))
    stage = kill.split(":")[0]
    assert not os.path.exists(workdir / "stages" / f"{stage}.json"), kill  # never marked complete
  assert not os.path.exists(workdir / "results.json")
  result = run_worker("none", workdir)
  assert result.returncode == 0, log(result)
  expected, got = load_results(reference[0]), load_results(workdir)
  assert got["worst_classes"] == expected["worst_classes"]
  assert got["generated_per_class"] == expected["generated_per_class"]
  for name in ("baseline", "final"):
    assert got[name]["test_accuracy"] == pytest.approx(expected[name]["test_accuracy"], abs=1e-9)
    np.testing.assert_allclose(got[name]["test_class_accuracy"], expected[name]["test_class_accuracy"])
  np.testing.assert_allclose(got["val_class_accuracy"], expected["val_class_accuracy"])


def copy_trained(reference, tmp_path):
  """A workdir holding the reference run's trained classifier only."""
  src, dst = reference[0], tmp_path / "copy"
  dst.mkdir()
  shutil.copytree(src / "train", dst / "train")
  (dst / "stages").mkdir()
  shutil.copy(src / "stages" / "train.json", dst / "stages" / "train.json")
  shutil.copy(src / "config.json", dst / "config.json")
  return dst


def test_nwpc_zero_skips_the_gan_stages(reference, tmp_path):
  workdir = copy_trained(reference, tmp_path)
  result = run_worker("none", workdir, "--config.mistake.nwpc=0", "--config.resume=force")
  assert result.returncode == 0, log(result)
  r = load_results(workdir)
  assert r["worst_classes"] == [] and r["generated_per_class"] == {}
  assert r["final"] == r["baseline"]
  assert not os.path.exists(workdir / "gan") and not os.path.exists(workdir / "generated")
  for stage in ("gan", "generate", "finetune"):
    assert "skipped" in json.load(open(workdir / "stages" / f"{stage}.json"))


def test_a_workdir_from_another_config_is_refused(reference, tmp_path):
  workdir = shutil.copytree(reference[0], tmp_path / "copy")  # the shared reference stays as is
  result = run_worker("none", workdir, "--config.train.learning_rate=0.5")
  assert result.returncode == 2
  assert "different config" in result.stderr and "train.learning_rate" in result.stderr
  assert "Traceback" not in result.stderr


def test_a_subset_of_stages_needs_its_inputs(tmp_path):
  result = run_worker("none", tmp_path / "fresh", "--config.stages=gan")
  assert result.returncode == 2
  assert "needs the outputs of stage 'validate'" in result.stderr


_CACHE_PROBE = """
import os, sys, jax, jax.numpy as jnp
from mdjax import main
main.enable_compilation_cache()
print(jax.config.jax_persistent_cache_min_compile_time_secs)
jax.jit(lambda x: x * 3 + 1)(jnp.ones(4)).block_until_ready()  # compiles in milliseconds
print(len(os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"])))
"""


@pytest.mark.parametrize("threshold", [None, "60"])
def test_the_compilation_cache_keeps_small_programs_unless_told_otherwise(tmp_path, threshold):
  # A resumed run loads every program from the cache, the ~75 small ones included (main.py).
  env = {k: v for k, v in os.environ.items() if k != "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"}
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  if threshold is not None:
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = threshold
  out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True,
                       env=env, check=True).stdout.split()
  assert float(out[0]) == (0.0 if threshold is None else 60.0)
  if threshold is None:
    assert int(out[1]) >= 1, out  # the lambda's program (and jnp.ones'), each a few ms to compile
  else:
    assert int(out[1]) == 0, out
