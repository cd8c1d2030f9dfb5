"""How many GAN steps, and which EMA decay, make a class's generated images recognisable?

    python benchmarks/gan_schedule.py --config=configs/default.py --classes 1,2,4,6 \
        --steps 200,300,400 --decays 0.9,0.95,0.98,0.99 [--seed 0] [--samples 200]

For each class: one single-class FastGAN with the config's `gan` settings (the step the per-class
ensemble runs for each class, `mdjax.gan.step.make_gan_fns`; batches drawn as the ensemble draws
them, `class_data.batch_indices`), trained once for the largest step count. Beside the run's own
EMA, one bias-corrected EMA per `--decays` value is kept from the same G trajectory
(`step.ema_update`), so every decay is judged on the same run. At each `--steps` count,
`--samples` images from each EMA and from the raw G are judged by the pipeline's independent
judge (`gan.judge`, fit on the real training images as the generate stage fits it): the share it
assigns to the class, and the diversity ratio against the class's real images.

This is the measurement behind `configs/default.py`'s `gan.steps` (see its docstring). Single-class
steps cost about what a K-class ensemble step costs per class, so K x steps x the printed
s/step is a fair estimate of the GAN stage's training time. The last line printed is JSON:
{"classes": {k: {"steps": {t: {decay | "raw": [judge_fraction, diversity_ratio]}}}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from classifier_accuracy import load_config  # benchmarks/ is on sys.path when a script in it runs


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--classes", default="1,2,4,6")
  parser.add_argument("--steps", default="200,300,400")
  parser.add_argument("--decays", default="0.9,0.95,0.98,0.99")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--samples", type=int, default=200)
  args = parser.parse_args()

  # pylint: disable=import-outside-toplevel
  from mdjax.data import pipeline, registry
  from mdjax.gan import class_data
  from mdjax.gan import judge as judge_lib
  from mdjax.gan import step as step_lib
  from mdjax.pipeline import stages
  # pylint: enable=import-outside-toplevel

  config = load_config(args.config)
  g = config.gan
  splits = registry.load_splits(config.data)
  r, augment = int(g.resolution), str(config.data.augment)
  view = lambda src: np.stack([pipeline.whole_image(src[i]["image"], r, augment)  # noqa: E731
                               for i in range(len(src))])
  judge = judge_lib.fit_judge(view(splits.train), splits.train.labels, view(splits.val),
                              splits.val.labels, splits.num_classes, kind=str(g.judge),
                              resolution=int(g.judge_resolution))
  print(f"judge: {judge.kind}, held-out accuracy {judge.heldout_accuracy:.3f}, per class "
        + " ".join(f"{a:.2f}" for a in judge.heldout_class_accuracy), flush=True)

  fns = step_lib.make_gan_fns(g)
  decays = [float(d) for d in args.decays.split(",")]
  counts = sorted({int(s) for s in args.steps.split(",")})
  step = jax.jit(fns.step, donate_argnums=0)

  @jax.jit
  def update_emas(emas, g_params, t):
    return [step_lib.ema_update(e, g_params, t, d) for e, d in zip(emas, decays)]

  @jax.jit
  def draw(state, params, key):
    return fns.sample(state.replace(ema_params=params), key, args.samples)

  def to_uint8(x):
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)

  out = {"config": args.config, "seed": args.seed, "samples": args.samples,
         "judge_heldout_accuracy": judge.heldout_accuracy, "classes": {}}
  for k in (int(c) for c in args.classes.split(",")):
    real = stages.class_images(splits.train, splits.train.labels, k, r, augment)
    data, count = jnp.asarray(real), jnp.int32(len(real))
    key = jax.random.PRNGKey(args.seed * 1000 + k)
    key, init_key = jax.random.split(key)
    state = fns.init(init_key)
    # Copies: the step donates its state, g_params included.
    emas = [jax.tree.map(jnp.copy, state.g_params) for _ in decays]
    rows, start = {}, time.perf_counter()
    for t in range(1, counts[-1] + 1):
      key, batch_key, step_key = jax.random.split(key, 3)
      idx = class_data.batch_indices(batch_key, count, len(real), int(g.batch_size))
      state, _ = step(state, data[idx].astype(jnp.float32) / 127.5 - 1.0, step_key)
      emas = update_emas(emas, state.g_params, jnp.int32(t))
      if t in counts:
        row = {}
        for name, params in zip([str(d) for d in decays] + ["raw"], emas + [state.g_params]):
          images = to_uint8(draw(state, params, jax.random.PRNGKey(7)))
          fractions, spread = judge.assess({k: real}, {k: images})
          row[name] = [round(fractions[k], 3), round(spread[k], 3)]
        rows[t] = row
        seconds = time.perf_counter() - start
        print(f"class {k} step {t} ({seconds:.0f} s, {seconds / t:.3f} s/step incl. compile): "
              + ", ".join(f"{n} {v[0]:.3f}/{v[1]:.2f}" for n, v in row.items())
              + "  (judge fraction / diversity)", flush=True)
    out["classes"][k] = {"images": len(real), "steps": rows}
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
