"""The benchmark suite (benchmarks/run.py) in --quick mode on a subset: its JSON has the machine,
the matmul peak, every step's FLOP fraction in (0, 1], and the input pipeline against the train
step; the classifier's scaling code path runs over two simulated CPU devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few minutes on an idle 2-core machine; far more when it is shared.
TIMEOUT_S = int(os.environ.get("MDJAX_TEST_RUN_TIMEOUT", 1800))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "quick.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
         "PYTHONPATH": os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])])}
  proc = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.run", "--quick", "--only=classifier_step,input_pipeline",
       "--scaling=1,2", f"--json={path}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    stdout, _ = proc.communicate(timeout=TIMEOUT_S)
  finally:
    # On a timeout (or Ctrl-C): SIGTERM lets run.py kill the benchmark it is running (its own
    # process group) before it exits; SIGKILL if it does not within 30 s.
    if proc.poll() is None:
      proc.terminate()
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
  assert proc.returncode == 0, stdout[-3000:]
  with open(path) as fh:
    return json.load(fh), stdout


@pytest.mark.e2e
def test_machine_and_peak(quick):
  report, _ = quick
  m = report["machine"]
  for key in ("platform", "device_kind", "device_count", "process_count", "cpu_model", "cpu_count",
              "versions", "peak"):
    assert key in m, key
  assert m["platform"] == "cpu" and m["device_count"] == 2
  assert m["versions"]["jax"] and m["versions"]["python"]
  assert m["peak"]["flops"] == pytest.approx(2 * 1024 ** 3, rel=0.01)  # XLA counts 2 n^3
  assert report["peak_flops_per_s"] == m["peak"]["flops_per_s"] > 0
  assert report["quick"] is True
  assert set(report["benchmarks"]) == {"classifier_step", "input_pipeline"}


@pytest.mark.e2e
def test_flop_fractions(quick):
  report, _ = quick
  step = report["benchmarks"]["classifier_step"]
  assert {c["optimizer"] for c in step["cases"]} == {"adam", "sam"}
  for case in step["cases"] + step["scaling"]:
    for key in ("s_per_step", "images_per_s", "flops_per_step", "flops_per_s", "compile_s"):
      assert case[key] > 0, key
    assert 0 < case["peak_fraction"] <= 1, case
  sam, adam = (next(c for c in step["cases"] if c["optimizer"] == o) for o in ("sam", "adam"))
  assert sam["flops_per_step"] > 1.8 * adam["flops_per_step"]  # two gradients per SAM step
  assert [c["devices"] for c in step["scaling"]] == [1, 2]
  assert step["scaling"][0]["efficiency"] == 1.0 and step["scaling"][1]["efficiency"] > 0
  rows = [r for r in report["table"] if r["peak_fraction"] is not None]
  assert rows and all(0 < r["peak_fraction"] <= 1 for r in rows)


@pytest.mark.e2e
def test_input_pipeline_against_the_train_step(quick):
  report, stdout = quick
  pipe = report["benchmarks"]["input_pipeline"]
  digits = pipe["consumption"]["digits_16"]
  assert digits["pipeline_images_per_s"] > 0 and digits["step"]["optimizer"] == "sam"
  assert digits["pipeline_over_step"] == pytest.approx(
      digits["pipeline_images_per_s"] / digits["step"]["images_per_s"])
  assert pipe["consumption"]["folder_64"]["pipeline_images_per_s"] > 0
  # The one table, after every benchmark's own output.
  table = stdout[stdout.index("== benchmarks (quick)"):]
  assert "classifier_step" in table and "input_pipeline" in table and "of peak" in table


def _benchmark_script(name: str):
  """benchmarks/<name>.py as a module: benchmarks/ is a folder of scripts, not an installed
  package, so each is loaded from its file."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run_module():
  return _benchmark_script("run")


def test_a_stuck_benchmark_is_killed_with_its_children(tmp_path, monkeypatch):
  """A benchmark that hangs without printing, with a child of its own, is stopped at the timeout,
  recorded as failed, and leaves no process behind."""
  run = _run_module()
  pid_file = tmp_path / "child.pid"
  (tmp_path / "stuck.py").write_text(
      "import subprocess, sys, time\n"
      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
      f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
      "time.sleep(600)\n")
  monkeypatch.setattr(run, "HERE", str(tmp_path))
  figures, seconds = run.run_script("stuck", [], timeout=3)
  assert "timeout" in figures["error"] and 3 <= seconds < 60
  child = int(pid_file.read_text())
  import time
  for _ in range(50):  # the killed child is reaped by init; give it a moment
    try:
      os.kill(child, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    pytest.fail(f"the benchmark's child {child} outlived it")


def test_derive_rows_for_every_benchmark():
  """The table and fractions from figures shaped like each benchmark's JSON (those the quick run
  above leaves out: accuracy parity, GAN ensemble, FastGAN)."""
  run = _run_module()
  peak = 100e9
  results = {
      "classifier_accuracy": {"config": "c", "seeds": [0], "mdjax": {"mean": 0.9, "std": 0.0},
                              "torch": {"mean": 0.91, "std": 0.0}, "gap_points": -1.0,
                              "agree": False},
      "gan_ensemble": {"classes": 2, "resolution": 32, "ngf": 8, "strategy": "map",
                       "one_program_s_per_step": 0.5, "separate_s_per_step": 1.0, "speedup": 2.0,
                       "one_program_flops_per_s": 20e9, "separate_flops_per_s": 10e9},
      "fastgan_256": {"resolution": 32, "batch": 8, "ngf": 8, "step": {"median_s": 0.1},
                      "flops_per_s": 50e9},
  }
  rows = run.derive(results, peak, {})
  assert results["gan_ensemble"]["one_program_peak_fraction"] == pytest.approx(0.2)
  assert results["gan_ensemble"]["separate_peak_fraction"] == pytest.approx(0.1)
  assert results["fastgan_256"]["peak_fraction"] == pytest.approx(0.5)
  assert [r["benchmark"] for r in rows] == ["classifier_accuracy"] * 3 + ["gan_ensemble"] * 2 + [
      "fastgan_256"]
  assert "DISAGREE" in rows[2]["result"]
  json.dumps(rows)  # the rows go into the JSON file as they are


def test_conv_layers_times_each_gradient_and_checks_it():
  """benchmarks/conv_layers.py on two tiny layers (one strided): every figure is there, oneDNN's
  three passes included, and its own check (mdjax's and oneDNN's passes equal XLA's) passed, or
  the script would have failed."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "conv_layers.py"), "--batch", "2",
       "--layers", "4:8:8:1,8:4:8:2", "--steps", "1", "--no-torch"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [(r["c"], r["o"], r["stride"]) for r in report["rows"]] == [(4, 8, 1), (8, 4, 2)]
  for row in report["rows"]:
    assert set(row["mdjax"]) == {"fwd", "dX xla", "dX mdjax", "dW xla", "dW mdjax",
                                 "fwd onednn", "dX onednn", "dW onednn"}
    assert all(v > 0 for v in row["mdjax"].values())


def test_flops_are_counted_on_the_loop_free_twin(monkeypatch):
  """XLA's cost analysis counts a loop's body once, so a step whose conv weight gradients loop over
  chunks of the batch (mdjax.core.cpu_conv) reads too few FLOPs; machine.loop_free_flops counts
  the same step with XLA's own gradients, which do the same multiply-adds with no loop."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from mdjax.core import cpu_conv  # pylint: disable=import-outside-toplevel

  machine = _benchmark_script("machine")
  monkeypatch.setattr(cpu_conv, "_DW_CHUNK_ROWS", 16)  # 8 images of 4x4 outputs: 8 chunks
  # Stride 2 and 16 input channels: the per-tap matmul weight gradient, which chunks.
  conv = nn.Conv(8, (3, 3), strides=2, padding=1, use_bias=False)
  fast = nn.Conv(8, (3, 3), strides=2, padding=1, use_bias=False,
                 conv_general_dilated=cpu_conv.Rules())
  x = jnp.ones((8, 8, 8, 16))
  params = conv.init(jax.random.key(0), x)

  def grad(params, x):
    return jax.grad(lambda p: fast.apply(p, x).sum())(params)

  def twin(params, x):  # the same program with XLA's own convolution gradients
    return jax.grad(lambda p: conv.apply(p, x).sum())(params)

  looped = machine.lowered_flops(jax.jit(grad).lower(params, x))
  assert "while" in jax.jit(grad).lower(params, x).as_text()  # the loop is there
  assert machine.loop_free_flops(twin, params, x) > looped


def _classifier_step_module(monkeypatch):
  # It imports its neighbour `machine` from its own folder.
  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
  return _benchmark_script("classifier_step")


def test_the_two_sides_take_turns_and_are_compared_round_by_round(monkeypatch):
  """classifier_step.interleaved: warm-up steps untimed, the order reversed every round, a pause
  before each turn; paired_ratio compares the sides within each round, so a machine that slows
  down for a round moves both sides' times, not their ratio. A fake clock stands in for the
  machine: the 'torch' side's step takes 2.2 s in even rounds and 1.8 s in odd ones, mdjax's 2 s."""
  cs = _classifier_step_module(monkeypatch)

  class Clock:
    now = 0.0

    def perf_counter(self):
      return self.now

    def sleep(self, seconds):
      self.now += seconds

  clock, calls = Clock(), []
  monkeypatch.setattr(cs, "time", clock)

  def side(name):
    def step():
      calls.append(name)
      warm = len(calls) <= 4  # two warm-up steps each, before any round
      slow = name == "torch" and not warm and (len(calls) - 5) // 4 % 2 == 0
      clock.now += 2.0 if name == "mdjax" else (2.2 if slow else 1.8)
    return step

  times = cs.interleaved({"mdjax": side("mdjax"), "torch": side("torch")}, rounds=4,
                         steps_per_round=2, warmup=2, pause_s=0.25)
  m, t = "mdjax", "torch"
  assert calls == [m, m, t, t] + [m, m, t, t] + [t, t, m, m] + [m, m, t, t] + [t, t, m, m]
  np.testing.assert_allclose(times["mdjax"], [[2.0, 2.0]] * 4)  # the pauses are not counted
  np.testing.assert_allclose(times["torch"], [[2.2, 2.2], [1.8, 1.8], [2.2, 2.2], [1.8, 1.8]])
  ratio = cs.paired_ratio(times, "torch", "mdjax")
  assert ratio["per_round"] == pytest.approx([1.1, 0.9, 1.1, 0.9])
  assert (ratio["median"], ratio["min"], ratio["max"], ratio["rounds"]) == pytest.approx(
      (1.0, 0.9, 1.1, 4))
  # Warm-up (2 x 2.0 + 2 x 1.8), the rounds (4 x 2 x 2.0 and 2 x 2 x (2.2 + 1.8)), 8 pauses.
  assert clock.now == pytest.approx(7.6 + 16.0 + 16.0 + 8 * 0.25)

  # The suite's table states the paired ratio and how many rounds mdjax won.
  run = _run_module()
  step = {"cases": [], "torch": [{"backbone": "wrn16_4", "size": 32, "batch": 128,
                                  "optimizer": "adam", "s_per_step": 2.0, "images_per_s": 64.0,
                                  "torch_over_mdjax": ratio}]}
  rows = run.derive({"classifier_step": step}, 100e9, {})
  assert rows[0]["result"] == ("2.000 s/step, 64.0 img/s (mdjax at 1.00x, rounds 0.90-1.10, "
                               "ahead in 2 of 4)")


def test_pytorch_sides_differ_only_in_memory_format(monkeypatch):
  """classifier_step's two PyTorch sides run the same network on the same batch: NCHW and
  channels_last give the same first loss; the channels_last side's tensors are really in that
  format (its convolutions would otherwise run NCHW kernels); an unknown format is refused."""
  torch = pytest.importorskip("torch")
  cs = _classifier_step_module(monkeypatch)
  losses = {}
  for fmt in ("nchw", "channels_last"):
    step, model, x, _, _ = cs.torch_runner("wrn10_1", 8, 4, "adam", memory_format=fmt)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    in_cl = (fmt == "channels_last")
    assert x.is_contiguous(memory_format=torch.channels_last) == in_cl
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == in_cl
    losses[fmt] = step()
  assert losses["channels_last"] == pytest.approx(losses["nchw"], rel=1e-5)
  with pytest.raises(ValueError, match="memory_format 'nhwc'"):
    cs.torch_runner("wrn10_1", 8, 4, "adam", memory_format="nhwc")


def test_gpu_check_dry_run_runs_every_part_on_the_cpu(smoke_reference, tmp_path):
  """`python -m benchmarks.gpu_check --dry-run`: every part of the GPU check at tiny sizes on the
  CPU, so the one command prepared for a GPU cannot rot. The pipeline part reads the suite's
  shared smoke run (the same config) instead of running another."""
  workdir, _ = smoke_reference
  out = tmp_path / "gpu_check.json"
  env = dict(os.environ)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", f"--json={out}",
       f"--pipeline-workdir={workdir}", "--budget=300"], cwd=REPO, capture_output=True,
      text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
  report = json.loads(out.read_text())
  parts = {row["part"] for row in report["rows"]}
  assert parts == {"machine", "pipeline", "gan", "classifier", "scaling"}, report["rows"]
  assert report["machine"]["peak_bfloat16"]["flops_per_s"] > 0
  pipeline = report["pipeline"]
  assert pipeline["this_run"]["weak_classes"] and pipeline["comparison"]["accepted"] is not None
  assert [g["classes"] for g in report["gan"]] == [1, 2]
  assert all(g["strategy"] == "vmap" and g["max_abs_diff"] < 1e-3 for g in report["gan"])
  assert sorted(c["dtype"] for c in report["classifier"]) == ["bfloat16", "float32"]
  assert [s["devices"] for s in report["scaling"]] == [1, 2]
  assert "== gpu_check (dry run, CPU)" in result.stdout


def _pattern(rng, top: bool, size: int = 8) -> np.ndarray:
  """A grey image bright in its top (or bottom) half, with noise."""
  image = rng.uniform(0, 60, (size, size))
  image[: size // 2] += 180 if top else 0
  image[size // 2:] += 0 if top else 180
  return np.clip(image, 0, 255).astype(np.uint8)


def test_external_judge_recognises_the_right_class_and_not_the_wrong(tmp_path):
  """benchmarks/external_judge.py: an SVC fit on a real folder of two classes assigns generated
  images of the right pattern to their class and of the wrong pattern to the other one."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  judge = _benchmark_script("external_judge")
  rng = np.random.default_rng(0)
  for name, top in (("up", True), ("down", False)):
    (tmp_path / "real" / name).mkdir(parents=True)
    for i in range(20):
      Image.fromarray(_pattern(rng, top)).save(tmp_path / "real" / name / f"{i}.png")
  gen = tmp_path / "generated"
  images = []
  # "up" generated as up-patterns (right), "down" generated as up-patterns too (wrong), both at
  # 16 px in RGB as the pipeline writes them: the judge resizes and reads them as grey.
  for k, name in enumerate(("up", "down")):
    (gen / f"class_{k:04d}").mkdir(parents=True)
    for i in range(10):
      grey = np.kron(_pattern(rng, True), np.ones((2, 2), np.uint8))
      Image.fromarray(np.stack([grey] * 3, -1)).save(gen / f"class_{k:04d}" / f"{i}.png")
      images.append({"file": f"class_{k:04d}/{i}.png", "class_index": k, "class_name": name})
  (gen / "index.json").write_text(json.dumps({"version": 1, "images": images}))
  result = judge.judge(str(gen), str(tmp_path / "real"))
  assert result["heldout_accuracy"] == 1.0 and result["heldout_images"] == 8
  assert "L pixels at 8x8" in result["judge"]
  assert result["classes"]["up"] == {"images": 10, "judge_fraction": 1.0, "real_recall": 1.0}
  assert result["classes"]["down"]["judge_fraction"] == 0.0
  with pytest.raises(SystemExit, match="generated class 'cat' is not a folder"):
    images[0]["class_name"] = "cat"
    (gen / "index.json").write_text(json.dumps({"version": 1, "images": images}))
    judge.judge(str(gen), str(tmp_path / "real"))
