"""mdjax on a GPU in one command: does it run, does it agree with the CPU, how fast is it.

    python -m benchmarks.gpu_check                  # on a GPU machine: about 8 minutes on one H100
    python -m benchmarks.gpu_check --dry-run        # every case at tiny size, on the CPU, in CI
    python -m benchmarks.gpu_check --json out.json --budget 420

GPU time is scarce, so this is one prepared command that prints one table and writes one JSON
file (default `gpu_check.json`). Each part runs in its own process (the scripts beside this one,
or `mdjax.main`), one after the other, each within what is left of `--budget` seconds; a part that
fails or runs out of time is recorded as such and the check goes on.

  machine     the accelerator, and its measured float32 and bfloat16 matmul peaks
  pipeline    the smoke config end to end (on a GPU the class GANs are vmapped in one program),
              its results set beside the CPU run of the same config recorded in
              gpu_check_reference.json: weak classes and accuracies side by side. Accepted: test
              accuracies within PIPELINE_TOLERANCE of the CPU's. Not bit-equal: the GPU's kernels
              round differently, and two epochs on 1,146 images carry that into other weights;
              near-tied validation accuracies can then pick other weak classes
  gan         K = 1, 4, 8 class GANs at 32 px in one vmapped program against K separate programs
              (the design's central claim), and K = 2 at 256 px
  classifier  the SAM train step in float32 and bfloat16: WRN-16-4 32 px batch 128 and ResNet-50
              224 px batch 64, with FLOP/s as a fraction of the matmul peak of its dtype and the
              device's peak memory
  scaling     with several GPUs: the SAM step over 1, 2, 4, 8 devices (batch per device fixed)

`--dry-run` runs every part at tiny sizes on the CPU (2 simulated devices for scaling), so the
script cannot rot; `--pipeline-workdir` reuses a finished run of the same config instead of
running one (the test suite passes its own). `--record-reference` writes this run's pipeline
figures as the CPU reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import run as suite  # noqa: E402  pylint: disable=wrong-import-position

REFERENCE = os.path.join(HERE, "gpu_check_reference.json")
# The smoke config, as the test suite runs it (2 weak classes, 1 epoch) in --dry-run.
PIPELINE = ["--config=configs/default.py:smoke"]
DRY_PIPELINE = ["--config=configs/default.py:smoke", "--config.mistake.nwpc=2",
                "--config.train.epochs=1"]
# The largest difference of test accuracy from the CPU reference that the check accepts.
PIPELINE_TOLERANCE = 0.05

FULL = {
    "machine": ["--bf16"],
    "gan": [(1, 32, 64), (4, 32, 64), (8, 32, 64), (2, 256, 64)],  # classes, resolution, width
    "gan_steps": ["--steps", "5", "--check-steps", "1"],
    "classifier": "wrn16_4:32:128,resnet50:224:64",
    "classifier_steps": "5",
    "scaling": ("resnet50:224:32", "1,2,4,8"),
}
DRY = {
    "machine": ["--bf16", "--n", "256", "--reps", "3"],
    "gan": [(1, 32, 8), (2, 32, 8)],
    "gan_steps": ["--steps", "1", "--check-steps", "1", "--nz", "32"],
    "classifier": "wrn10_1:16:8",
    "classifier_steps": "1",
    "scaling": ("wrn10_1:16:4", "1,2"),
}


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (CI)")
  p.add_argument("--json", default="gpu_check.json", help="where the figures go")
  p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
  p.add_argument("--pipeline-workdir", default="",
                 help="a finished run of the pipeline's config to read instead of running one")
  p.add_argument("--record-reference", action="store_true",
                 help=f"write this run's pipeline figures to {os.path.basename(REFERENCE)}")
  p.add_argument("--only", default="", help="some of machine,pipeline,gan,classifier,scaling")
  return p.parse_args(argv)


class Clock:
  """What is left of the budget; each part gets at most that (and never less than a minute of
  grace for the last part to say it ran out)."""

  def __init__(self, budget: float):
    self.deadline = time.perf_counter() + budget

  def left(self) -> float:
    return self.deadline - time.perf_counter()


def pipeline_summary(workdir: str) -> dict:
  """What the check compares of a finished run: weak classes, test accuracies, GAN steps."""
  with open(os.path.join(workdir, "results.json")) as fh:
    r = json.load(fh)
  stopping = r.get("gan_stopping") or {}
  return {"weak_classes": r["worst_classes"],
          "baseline_test_accuracy": r["baseline"]["test_accuracy"],
          "final_test_accuracy": r["final"]["test_accuracy"],
          "gan_steps": {k: v["steps"] for k, v in stopping.items()},
          "judge_fraction": {k: q["judge_fraction"] for k, q in (r.get("gan_quality") or {}).items()},
          "strategy": (r.get("gan_cost") or {}).get("path"),
          "stage_seconds": r.get("stage_seconds")}


def run_pipeline(flags: list[str], workdir: str, timeout: float) -> tuple[dict, float]:
  command = [sys.executable, "-m", "mdjax.main", *flags, f"--workdir={workdir}"]
  print(f"\n### pipeline: {' '.join(command[1:])}", flush=True)
  start = time.perf_counter()
  try:
    done = subprocess.run(command, cwd=REPO, env=suite._env(), capture_output=True, text=True,  # pylint: disable=protected-access
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"killed after the {timeout:.0f} s timeout"}, time.perf_counter() - start
  seconds = time.perf_counter() - start
  sys.stdout.write(done.stdout[-3000:])
  if done.returncode != 0:
    return {"error": f"exit status {done.returncode}",
            "output_tail": (done.stdout + done.stderr)[-2000:]}, seconds
  return pipeline_summary(workdir), seconds


def compare(ours: dict, reference: dict | None) -> dict:
  """The pipeline's figures against the CPU reference (module docstring: what is accepted)."""
  if reference is None:
    return {"accepted": None, "why": "no CPU reference recorded"}
  gaps = {key: abs(ours[key] - reference[key])
          for key in ("baseline_test_accuracy", "final_test_accuracy")}
  accepted = all(gap <= PIPELINE_TOLERANCE for gap in gaps.values())
  return {"accepted": accepted, "accuracy_gaps": gaps, "tolerance": PIPELINE_TOLERANCE,
          "same_weak_classes": ours["weak_classes"] == reference["weak_classes"]}


def _table_row(part: str, case: str, result: str) -> dict:
  return {"part": part, "case": case, "result": result}


def main(argv=None) -> int:
  args = _parse(argv)
  sizes = DRY if args.dry_run else FULL
  parts = args.only.split(",") if args.only else ["machine", "pipeline", "gan", "classifier",
                                                  "scaling"]
  clock = Clock(args.budget)
  report = {"dry_run": args.dry_run, "parts": parts}
  rows = []
  failed = 0

  def script(name, script_args, part):
    nonlocal failed
    left = clock.left()
    if left < 10:
      report.setdefault("skipped", []).append(f"{part}: {name} {' '.join(script_args)}")
      return None
    figures, seconds = suite.run_script(name, script_args, timeout=left)
    if "error" in figures:
      failed += 1
      rows.append(_table_row(part, " ".join(script_args)[:60], f"FAILED: {figures['error']}"))
      report.setdefault("errors", []).append({"part": part, "args": script_args, **figures})
      return None
    return {**figures, "wall_s": round(seconds, 1)}

  peaks = {}
  if "machine" in parts:
    info = script("machine", sizes["machine"], "machine")
    if info:
      report["machine"] = info
      peaks = {"float32": info["peak"]["flops_per_s"],
               "bfloat16": info.get("peak_bfloat16", {}).get("flops_per_s")}
      rows.append(_table_row("machine", f"{info['device_kind']} x{info['device_count']}",
                             f"matmul peak {peaks['float32'] / 1e12:.2f} TFLOP/s float32"
                             + (f", {peaks['bfloat16'] / 1e12:.2f} bfloat16"
                                if peaks["bfloat16"] else "")))

  if "pipeline" in parts:
    flags = DRY_PIPELINE if args.dry_run else PIPELINE
    if args.pipeline_workdir:
      ours, seconds = pipeline_summary(args.pipeline_workdir), 0.0
    else:
      ours, seconds = run_pipeline(flags, tempfile.mkdtemp(prefix="mdjax-gpu-check-"),
                                   max(clock.left(), 60))
    reference = None
    if os.path.exists(REFERENCE):
      with open(REFERENCE) as fh:
        reference = json.load(fh).get("dry_run" if args.dry_run else "full")
    if "error" in ours:
      failed += 1
      rows.append(_table_row("pipeline", " ".join(flags), f"FAILED: {ours['error']}"))
      report["pipeline"] = ours
    else:
      verdict = compare(ours, reference)
      report["pipeline"] = {"flags": flags, "this_run": ours, "cpu_reference": reference,
                            "comparison": verdict, "wall_s": round(seconds, 1)}
      ref_text = ("" if reference is None else
                  f" | CPU: weak {reference['weak_classes']}, baseline "
                  f"{reference['baseline_test_accuracy']:.4f}, final "
                  f"{reference['final_test_accuracy']:.4f}")
      rows.append(_table_row(
          "pipeline", " ".join(flags),
          f"weak {ours['weak_classes']}, baseline {ours['baseline_test_accuracy']:.4f}, final "
          f"{ours['final_test_accuracy']:.4f}{ref_text} | accepted: {verdict['accepted']}"))
      if args.record_reference:
        recorded = {}
        if os.path.exists(REFERENCE):
          with open(REFERENCE) as fh:
            recorded = json.load(fh)
        recorded["dry_run" if args.dry_run else "full"] = {**ours, "flags": flags}
        with open(REFERENCE, "w") as fh:
          json.dump(recorded, fh, indent=1)
          fh.write("\n")

  if "gan" in parts:
    report["gan"] = []
    for classes, resolution, width in sizes["gan"]:
      figures = script("gan_ensemble", [
          "--classes", str(classes), "--resolution", str(resolution), "--strategy", "vmap",
          "--ngf", str(width), "--ndf", str(width), *sizes["gan_steps"]], "gan")
      if figures:
        report["gan"].append(figures)
        rows.append(_table_row(
            "gan", f"K={classes} {resolution}px width {width} vmap",
            f"one program {figures['one_program_s_per_step']:.4f} s/step, separate "
            f"{figures['separate_s_per_step']:.4f} s: {figures['speedup']:.2f}x; compile "
            f"{figures['compile_one_program_s']:.0f} / {figures['compile_separate_s']:.0f} s"))

  if "classifier" in parts:
    report["classifier"] = []
    for dtype in ("float32", "bfloat16"):
      figures = script("classifier_step", [
          "--sides", "mdjax", "--cases", sizes["classifier"], "--optimizers", "sam",
          "--steps", sizes["classifier_steps"], "--dtype", dtype], "classifier")
      for case in (figures or {}).get("cases", []):
        peak = peaks.get(dtype)
        fraction = case["flops_per_s"] / peak if peak else None
        case["fraction_of_peak"] = fraction
        report["classifier"].append(case)
        memory = case.get("memory_peak_bytes")
        rows.append(_table_row(
            "classifier", f"{case['backbone']} {case['size']}px b{case['batch']} SAM {dtype}",
            f"{case['s_per_step'] * 1e3:.1f} ms/step, {case['images_per_s']:.0f} img/s, "
            f"{case['flops_per_s'] / 1e12:.2f} TFLOP/s"
            + (f" ({fraction:.0%} of peak)" if fraction else "")
            + (f", memory peak {memory / 2**30:.1f} GiB" if memory else "")))

  if "scaling" in parts:
    case, counts = sizes["scaling"]
    devices = report.get("machine", {}).get("device_count", 1)
    if args.dry_run or devices > 1:
      env_devices = os.environ.get("JAX_NUM_CPU_DEVICES")
      if args.dry_run:
        os.environ["JAX_NUM_CPU_DEVICES"] = "2"
      try:
        figures = script("classifier_step", [
            "--sides", "mdjax", "--cases", case, "--optimizers", "sam", "--steps",
            sizes["classifier_steps"], "--scaling", counts, "--scaling-case", case], "scaling")
      finally:
        if args.dry_run:
          if env_devices is None:
            os.environ.pop("JAX_NUM_CPU_DEVICES", None)
          else:
            os.environ["JAX_NUM_CPU_DEVICES"] = env_devices
      report["scaling"] = (figures or {}).get("scaling", [])
      for r in report["scaling"]:
        rows.append(_table_row("scaling", f"{case} x{r['devices']} devices",
                               f"{r['images_per_s']:.0f} img/s, efficiency {r['efficiency']:.2f}"))
    else:
      rows.append(_table_row("scaling", case, "one device: nothing to scale over"))

  report["rows"] = rows
  report["seconds"] = round(args.budget - clock.left(), 1)
  print(f"\n== gpu_check ({'dry run, CPU' if args.dry_run else 'full'}): "
        f"{report['seconds']:.0f} s ==")
  width = max((len(r["part"]) + len(r["case"]) for r in rows), default=20) + 3
  for r in rows:
    print(f"{r['part']}: {r['case']}".ljust(width) + r["result"])
  for skipped in report.get("skipped", []):
    print(f"skipped (out of time): {skipped}")
  with open(args.json, "w") as fh:
    json.dump(report, fh, indent=1, default=str)
    fh.write("\n")
  print(f"figures: {os.path.abspath(args.json)}")
  return 1 if failed or report.get("skipped") else 0


if __name__ == "__main__":
  sys.exit(main())
