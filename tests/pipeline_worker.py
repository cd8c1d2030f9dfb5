"""Runs `mdjax.main` in this process with faults injected at chosen points; used by
tests/test_run_pipeline.py and tests/test_faults.py.

    python tests/pipeline_worker.py FAULT[+FAULT...] -- <mdjax.main flags>

Kills (SIGKILL, like `kill -9`):
  train:N / finetune:N   after classifier step N of that stage
  gan:N                  after N calls of the one-program GAN step
  generate:N             after N generated PNG files
  ckptkill:WHERE:S       right after the asynchronous save of checkpoint S under a folder named
                         WHERE ("gan", "finetune", ...) was started: its write is in flight
Other faults:
  hold:TAG:N             after classifier step N of stage TAG, create the file named by
                         $MDJAX_TEST_HOLD_MARKER and wait until killed (a run that keeps going)
  nan:P:S                from GAN step S on, a NaN in a generator parameter of the class at
                         position P of the chunk, before every step (a GAN that keeps diverging)
  enospc:ckpt:WHERE:S    the asynchronous write of checkpoint S under WHERE fails with ENOSPC in
                         orbax's background thread (its metadata file write)
  enospc:png:N           the (N+1)-th generated PNG file fails with ENOSPC
  enospc:record:STAGE    writing stages/STAGE.json fails with ENOSPC
  enospc:report          writing report.md fails with ENOSPC
  none                   no fault
"""

import errno
import os
import signal
import sys
import time


def die():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def full(path) -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def hold():
  with open(os.environ["MDJAX_TEST_HOLD_MARKER"], "w") as fh:
    fh.write(str(os.getpid()))
  while True:
    time.sleep(1)


def _on_classifier_step(stage: str, n: int, action) -> None:
  from mdjax.train import classifier as clf
  original = clf.train_classifier

  def patched(*args, **kwargs):
    if kwargs.get("tag") == stage:
      kwargs["step_callback"] = lambda step, state: action() if step >= n else None
    return original(*args, **kwargs)

  clf.train_classifier = patched


def _wrap_ensemble_step(wrap) -> None:
  from mdjax.gan import program
  original = program.make_ensemble_step

  def patched(*args, **kwargs):
    return wrap(original(*args, **kwargs))

  program.make_ensemble_step = patched


def install(stage: str, arg: str) -> None:
  if stage in ("train", "finetune"):
    _on_classifier_step(stage, int(arg), die)
  elif stage == "hold":
    tag, n = arg.split(":")
    _on_classifier_step(tag, int(n), hold)
  elif stage == "gan":
    calls = [0]

    def wrap(step_fn):
      def counted(*a, **k):
        calls[0] += 1
        if calls[0] > int(arg):
          die()
        return step_fn(*a, **k)
      return counted

    _wrap_ensemble_step(wrap)
  elif stage == "nan":
    import jax
    import jax.numpy as jnp
    position, first = (int(x) for x in arg.split(":"))

    def poison(ens):
      flat, tree = jax.tree_util.tree_flatten_with_path(ens["gan"])
      i = next(i for i, (path, leaf) in enumerate(flat)
               if "g_params" in jax.tree_util.keystr(path) and jnp.issubdtype(leaf.dtype, jnp.floating))
      leaves = [leaf for _, leaf in flat]
      leaves[i] = leaves[i].at[position].set(jnp.nan)
      return dict(ens, gan=jax.tree_util.tree_unflatten(tree, leaves))

    def wrap(step_fn):
      def poisoned(ens, images, counts, step):
        if int(step) >= first:
          ens = poison(ens)
        return step_fn(ens, images, counts, step)
      return poisoned

    _wrap_ensemble_step(wrap)
  elif stage == "generate":
    from mdjax.gan import generate
    original = generate._write_png  # pylint: disable=protected-access
    calls = [0]

    def patched(*args, **kwargs):
      calls[0] += 1
      if calls[0] > int(arg):
        die()
      return original(*args, **kwargs)

    generate._write_png = patched  # pylint: disable=protected-access
  elif stage == "ckptkill":
    from mdjax.core import checkpoint
    where, step = arg.split(":")
    original = checkpoint.Checkpoints.save

    def patched(self, s, *args, **kwargs):
      original(self, s, *args, **kwargs)
      if s == int(step) and f"{os.sep}{where}{os.sep}" in self.directory + os.sep:
        die()  # orbax's background thread is still writing this checkpoint

    checkpoint.Checkpoints.save = patched
  elif stage == "enospc":
    kind, _, rest = arg.partition(":")
    if kind == "ckpt":
      # orbax writes each checkpoint's metadata from its background thread through this function.
      from orbax.checkpoint._src.path import async_path
      where, step = rest.split(":")
      original = async_path.write_text

      async def patched(path, text):
        p = str(path)
        if f"{os.sep}{where}{os.sep}" in p and f"{os.sep}{step}.orbax-checkpoint-tmp" in p:
          raise full(path)
        return await original(path, text)

      async_path.write_text = patched
    elif kind == "png":
      from mdjax.gan import generate
      original = generate._write_png  # pylint: disable=protected-access
      calls = [0]

      def patched(path, image):
        calls[0] += 1
        if calls[0] > int(rest):
          raise full(path)
        return original(path, image)

      generate._write_png = patched  # pylint: disable=protected-access
    elif kind in ("record", "report"):
      from mdjax.core import files
      suffix = os.path.join("stages", f"{rest}.json") if kind == "record" else "report.md"
      original = files.write_atomic

      def patched(path, data):
        if str(path).endswith(suffix):
          raise full(path)
        return original(path, data)

      files.write_atomic = patched
    else:
      raise SystemExit(f"unknown enospc point {arg}")
  elif stage != "none":
    raise SystemExit(f"unknown fault {stage}")


if __name__ == "__main__":
  spec, sep, *flags = sys.argv[1:]
  assert sep == "--"
  for fault in spec.split("+"):
    stage, _, arg = fault.partition(":")
    install(stage, arg or "0")
  from mdjax import main
  sys.argv = ["mdjax.main", *flags]
  main.main()
