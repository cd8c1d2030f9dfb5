"""Runs `mdjax.main` in this process, optionally killing itself (SIGKILL, like `kill -9`) at a
chosen point of a stage; used by tests/test_run_pipeline.py.

    python tests/pipeline_worker.py STAGE:N -- <mdjax.main flags>

STAGE:N is one of train:N / finetune:N (after classifier step N of that stage), gan:N (after N
calls of the one-program GAN step), generate:N (after N generated PNG files), or none.
"""

import os
import signal
import sys


def die():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def install(stage: str, n: int) -> None:
  if stage in ("train", "finetune"):
    from mdjax.train import classifier as clf
    original = clf.train_classifier

    def patched(*args, **kwargs):
      if kwargs.get("tag") == stage:
        kwargs["step_callback"] = lambda step, state: die() if step >= n else None
      return original(*args, **kwargs)

    clf.train_classifier = patched
  elif stage == "gan":
    from mdjax.gan import program
    original = program.make_ensemble_step
    calls = [0]

    def patched(*args, **kwargs):
      step_fn = original(*args, **kwargs)

      def counted(*a, **k):
        calls[0] += 1
        if calls[0] > n:
          die()
        return step_fn(*a, **k)
      return counted

    program.make_ensemble_step = patched
  elif stage == "generate":
    from mdjax.gan import generate
    original = generate._write_png  # pylint: disable=protected-access
    calls = [0]

    def patched(*args, **kwargs):
      calls[0] += 1
      if calls[0] > n:
        die()
      return original(*args, **kwargs)

    generate._write_png = patched  # pylint: disable=protected-access
  elif stage != "none":
    raise SystemExit(f"unknown kill point {stage}")


if __name__ == "__main__":
  spec, sep, *flags = sys.argv[1:]
  assert sep == "--"
  stage, _, n = spec.partition(":")
  install(stage, int(n or 0))
  from mdjax import main
  sys.argv = ["mdjax.main", *flags]
  main.main()
