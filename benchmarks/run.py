"""The benchmark suite: every benchmark in this folder, one table, one JSON file.

    python -m benchmarks.run                        # the full suite (tens of minutes on a 2-core CPU)
    python -m benchmarks.run --quick                # tiny sizes: a minute or two
    python -m benchmarks.run --only classifier_step,input_pipeline --json /tmp/bench.json
    python benchmarks/run.py ...                    # the same

Each benchmark runs in its own Python process (the scripts in this folder, unchanged in what they
measure), one after the other, with this checkout's `mdjax` first on PYTHONPATH; each prints its
own lines, and the suite reads the JSON each ends with. First `machine.py` records the machine (CPU
model, accelerator kind and count, versions) and measures the device's float32 matmul peak
(the best of several large `jnp.matmul`s, FLOPs from XLA's cost analysis). Then:

  classifier_step      mdjax's jitted train step (Adam, SAM) per backbone:size:batch case, with
                       PyTorch's on CPU unless --no-torch; on GPUs also the SAM step's scaling over
                       1, 2, 4, 8 devices (--scaling forces it, e.g. over simulated CPU devices)
  classifier_accuracy  the same recipe trained by mdjax and by PyTorch: test accuracy over seeds
  gan_ensemble         one program for K class GANs against K separate programs (gan.ensemble=auto:
                       "vmap" on GPUs, "per_class" on one CPU device)
  fastgan_256          one FastGAN iteration at 256x256 (tiny sizes with --quick)
  input_pipeline       images/s of the training streams, against the train step's consumption

Every step timed reports its FLOPs (XLA's cost analysis of the compiled step) and the fraction of
the matmul peak its FLOP/s reach. The input pipeline's images/s are set against the SAM train
step's images/s on the same images (`pipeline_over_step` > 1: the pipeline keeps up; both measured
alone, so on a CPU they would share the cores while training).

The table goes to stdout; the JSON (default benchmarks/results/<time>.json) holds the machine,
the flags, every benchmark's own figures, the derived fractions and the table's rows. A benchmark
that fails is recorded with its error and the suite goes on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BENCHMARKS = ("classifier_step", "classifier_accuracy", "gan_ensemble", "fastgan_256",
              "input_pipeline")

# The cases of each mode. A "consumer" is the classifier_step case whose SAM step eats the images
# an input pipeline case produces (same image size; the default run's recipe for digits).
FULL = {
    "machine": [],
    "classifier_step": ["--cases", "wrn16_4:32:128,resnet50:224:8,wrn10_2:16:32", "--steps", "5"],
    "classifier_accuracy": ["--config=configs/default.py", "--seeds=0,1,2"],
    "gan_ensemble": ["--classes", "5", "--resolution", "32", "--ngf", "16", "--ndf", "16",
                     "--nz", "64", "--steps", "5"],
    "fastgan_256": ["--iters", "3"],
    "input_pipeline": ["--images", "512", "--batch", "8", "--steps", "20", "--digits-size", "16",
                       "--digits-batch", "32", "--folder-size", "224"],
    "consumers": {"digits_16": ("wrn10_2", 16, 32), "folder_224": ("resnet50", 224, 8)},
    "scaling_case": "resnet50:224:32",
}
QUICK = {
    "machine": ["--n", "1024", "--reps", "5"],
    "classifier_step": ["--cases", "wrn10_1:16:16", "--steps", "2"],
    "classifier_accuracy": ["--config=configs/default.py:smoke,train.epochs=1,"
                            "data.max_train_per_class=20", "--seeds=0"],
    "gan_ensemble": ["--classes", "2", "--resolution", "32", "--ngf", "8", "--ndf", "8",
                     "--nz", "32", "--steps", "2", "--check-steps", "1"],
    "fastgan_256": ["--resolution", "32", "--width", "8", "--iters", "2"],
    "input_pipeline": ["--images", "64", "--batch", "8", "--steps", "3", "--digits-size", "16",
                       "--digits-batch", "16", "--folder-size", "64"],
    "consumers": {"digits_16": ("wrn10_1", 16, 16)},
    "scaling_case": "wrn10_1:16:16",
}
SCALING_DEVICES = "1,2,4,8"


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes: a minute or two on a CPU")
  p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(BENCHMARKS))
  p.add_argument("--json", default="", help="where to write the JSON (default benchmarks/results/)")
  p.add_argument("--no-torch", action="store_true", help="leave PyTorch's classifier step out")
  p.add_argument("--scaling", default=None, metavar="COUNTS",
                 help=f"device counts of the classifier's scaling (default {SCALING_DEVICES} on "
                 "GPUs, none on CPUs)")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
  args = p.parse_args(argv)
  only = [b for b in args.only.split(",") if b]
  unknown = sorted(set(only) - set(BENCHMARKS))
  if unknown:
    p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
  args.selected = [b for b in BENCHMARKS if not only or b in only]
  return args


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
  return env


def _last_json(text: str):
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run_script(name: str, args: list[str], timeout: float) -> tuple[dict, float]:
  """Runs benchmarks/<name>.py with `args` in its own process, its output streamed through; returns
  its figures (the JSON it ends with, or `--json`'s file) and the seconds it took."""
  json_file = None
  if name == "classifier_accuracy":
    json_file = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    args = [*args, f"--json={json_file}"]
  command = [sys.executable, os.path.join(HERE, f"{name}.py"), *args]
  print(f"\n### {name}: {' '.join(command[1:])}", flush=True)
  start = time.perf_counter()
  lines = []
  # Its own process group, killed by a timer at the deadline (a benchmark stuck without printing
  # is stopped too) and in `finally` (Ctrl-C, an error here): no benchmark outlives the suite.
  proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
  timer = threading.Timer(timeout, _kill_group, (proc,))
  timer.start()
  try:
    for line in proc.stdout:
      lines.append(line)
      sys.stdout.write(line)
    status = proc.wait()
  finally:
    timer.cancel()
    _kill_group(proc)
    proc.wait()
    seconds = time.perf_counter() - start
  if seconds >= timeout:
    status = f"killed after the {timeout:.0f} s timeout"
  out = "".join(lines)
  if status != 0:
    if json_file and os.path.exists(json_file):
      os.unlink(json_file)
    return {"error": f"exit status {status}" if isinstance(status, int) else status,
            "output_tail": out[-2000:]}, seconds
  if json_file:
    with open(json_file) as fh:
      figures = json.load(fh)
    os.unlink(json_file)
  else:
    figures = _last_json(out)
  if figures is None:
    return {"error": "no JSON line in its output", "output_tail": out[-2000:]}, seconds
  return figures, seconds


def _fraction(flops_per_s: float | None, peak: float) -> float | None:
  return flops_per_s / peak if flops_per_s and peak else None


def derive(results: dict, peak: float, consumers: dict) -> list[dict]:
  """Adds the FLOP fractions and the pipeline/step ratios to `results`; returns the table's rows."""
  rows = []

  def row(benchmark, case, result, flops_per_s=None, fraction=None):
    rows.append({"benchmark": benchmark, "case": case, "result": result,
                 "gflops_per_s": None if flops_per_s is None else flops_per_s / 1e9,
                 "peak_fraction": fraction})

  step = results.get("classifier_step", {})
  for c in step.get("cases", []):
    c["peak_fraction"] = _fraction(c.get("flops_per_s"), peak)
    row("classifier_step", f"mdjax {c['backbone']} {c['size']}px b{c['batch']} {c['optimizer']}",
        f"{c['s_per_step']:.3f} s/step, {c['images_per_s']:.1f} img/s", c["flops_per_s"],
        c["peak_fraction"])
  for c in step.get("torch", []):
    result = f"{c['s_per_step']:.3f} s/step, {c['images_per_s']:.1f} img/s"
    if "torch_over_mdjax" in c:  # the two sides took turns: the per-round ratio
      q = c["torch_over_mdjax"]
      result += (f" (mdjax at {q['median']:.2f}x, rounds {q['min']:.2f}-{q['max']:.2f}, "
                 f"ahead in {sum(x > 1 for x in q['per_round'])} of {q['rounds']})")
    row("classifier_step", f"torch {c.get('memory_format', 'nchw')} {c['backbone']} {c['size']}px "
        f"b{c['batch']} {c['optimizer']}", result)
  for c in step.get("scaling", []):
    c["peak_fraction"] = _fraction(c.get("flops_per_s"), peak * c["devices"])
    row("classifier_step", f"scaling {c['backbone']} {c['size']}px x{c['devices']} devices",
        f"{c['images_per_s']:.1f} img/s, efficiency {c['efficiency']:.2f}", c["flops_per_s"],
        c["peak_fraction"])

  acc = results.get("classifier_accuracy", {})
  for side in ("mdjax", "torch"):
    if side in acc:
      row("classifier_accuracy", f"{side} {acc.get('config', '')} seeds {acc.get('seeds')}",
          f"test accuracy {acc[side]['mean']:.4f} +- {acc[side]['std']:.4f}")
  if "gap_points" in acc:
    row("classifier_accuracy", "mdjax - torch",
        f"{acc['gap_points']:+.2f} points ({'agree' if acc['agree'] else 'DISAGREE'})")

  gan = results.get("gan_ensemble", {})
  if "one_program_s_per_step" in gan:
    gan["one_program_peak_fraction"] = _fraction(gan["one_program_flops_per_s"], peak)
    gan["separate_peak_fraction"] = _fraction(gan["separate_flops_per_s"], peak)
    case = (f"K={gan['classes']} {gan['resolution']}px ngf {gan['ngf']}")
    row("gan_ensemble", f"one program ({gan['strategy']}) {case}",
        f"{gan['one_program_s_per_step']:.3f} s/step, {gan['speedup']:.2f}x separate",
        gan["one_program_flops_per_s"], gan["one_program_peak_fraction"])
    row("gan_ensemble", f"separate programs {case}", f"{gan['separate_s_per_step']:.3f} s/step",
        gan["separate_flops_per_s"], gan["separate_peak_fraction"])

  fg = results.get("fastgan_256", {})
  if "flops_per_s" in fg:
    fg["peak_fraction"] = _fraction(fg["flops_per_s"], peak)
    row("fastgan_256", f"{fg['resolution']}px b{fg['batch']} ngf {fg['ngf']}",
        f"{fg['step']['median_s']:.3f} s/iteration", fg["flops_per_s"], fg["peak_fraction"])

  pipe = results.get("input_pipeline", {})
  if "batch" in pipe:
    sam = {(c["backbone"], c["size"], c["batch"]): c["images_per_s"]
           for c in step.get("cases", []) if c["optimizer"] == "sam"}
    consumption = {}
    for key, value in pipe.items():
      if not key.endswith("_train_images_per_s"):
        continue
      name = key[:-len("_train_images_per_s")]
      consumer = consumers.get(name)
      step_rate = sam.get(tuple(consumer)) if consumer else None
      consumption[name] = {"pipeline_images_per_s": value,
                           "step": None if step_rate is None else
                           {"backbone": consumer[0], "size": consumer[1], "batch": consumer[2],
                            "optimizer": "sam", "images_per_s": step_rate},
                           "pipeline_over_step": None if step_rate is None else value / step_rate}
      against = (f", {value / step_rate:.1f}x the {consumer[0]} SAM step's {step_rate:.1f}"
                 if step_rate else "")
      row("input_pipeline", name, f"{value:.0f} img/s{against}")
    pipe["consumption"] = consumption
  return rows


def print_table(rows: list[dict]) -> None:
  head = ("benchmark", "case", "result", "GFLOP/s", "of peak")
  body = [(r["benchmark"], r["case"], r["result"],
           "" if r["gflops_per_s"] is None else f"{r['gflops_per_s']:.1f}",
           "" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}%") for r in rows]
  widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
  print(line(head))
  print(line(["-" * w for w in widths]))
  for cells in body:
    print(line(cells))


def main(argv=None) -> int:
  args = _parse(argv)
  # SIGTERM (a CI timeout, `timeout`, a scheduler) exits through the `finally` of run_script,
  # which kills the running benchmark's process group: otherwise it would outlive the suite.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  mode = QUICK if args.quick else FULL
  started = time.strftime("%Y-%m-%dT%H:%M:%S")
  machine, seconds = run_script("machine", mode["machine"], args.timeout)
  if "error" in machine:
    print(f"benchmarks/run.py: machine.py failed: {machine['error']}", file=sys.stderr)
    return 1
  peak = machine["peak"]["flops_per_s"]
  on_gpu = machine["platform"] != "cpu"
  scaling = args.scaling if args.scaling is not None else (SCALING_DEVICES if on_gpu else "")
  report = {"started": started, "quick": args.quick, "argv": sys.argv[1:], "machine": machine,
            "peak_flops_per_s": peak, "seconds": {"machine": seconds}, "benchmarks": {},
            "commands": {}}
  for name in args.selected:
    flags = list(mode[name])
    if name == "classifier_step":
      if args.no_torch or args.quick or on_gpu:  # PyTorch's side is the CPU build
        flags += ["--sides", "mdjax"]
      if scaling:
        flags += ["--scaling", scaling, "--scaling-case", mode["scaling_case"]]
    if name == "gan_ensemble" and on_gpu:
      flags += ["--strategy", "vmap"]
    report["commands"][name] = f"python benchmarks/{name}.py {' '.join(flags)}"
    report["benchmarks"][name], report["seconds"][name] = run_script(name, flags, args.timeout)
  ok = {k: v for k, v in report["benchmarks"].items() if "error" not in v}
  report["table"] = derive(ok, peak, mode["consumers"])
  report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
  report["load_avg_1m_end"] = os.getloadavg()[0]

  m = machine
  print(f"\n== benchmarks ({'quick' if args.quick else 'full'}) on {m['device_kind']} "
        f"x{m['device_count']} ({m['cpu_model']}, {m['cpu_count']} CPUs), jax "
        f"{m['versions'].get('jax')}; float32 matmul peak {peak / 1e9:.1f} GFLOP/s ==")
  print_table(report["table"])
  failed = [k for k, v in report["benchmarks"].items() if "error" in v]
  for name in failed:
    print(f"{name}: FAILED ({report['benchmarks'][name]['error']})")
  path = args.json or os.path.join(HERE, "results", time.strftime("%Y%m%d-%H%M%S") + ".json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(report, fh, indent=1)
  print(f"JSON: {path}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
