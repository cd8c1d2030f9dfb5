"""Test accuracy of one classifier recipe trained by mdjax and by plain PyTorch, on the same split.

  .venv/bin/python benchmarks/classifier_accuracy.py                       # default digits, seeds 0,1,2
  .venv/bin/python benchmarks/classifier_accuracy.py --config=configs/default.py:limited
  .venv/bin/python benchmarks/classifier_accuracy.py --seeds=0 --side=torch  # one side only

What is compared: the recipe of the config's train stage (backbone, head, activation, dropout,
SAM rho over SGD with momentum and L2 decay on kernels only, learning-rate schedule per step,
augmentation policy, epochs, batch size), on the split mdjax makes of the dataset. mdjax's side is
`mdjax.train.classifier.train_classifier`, exactly as the pipeline's train stage runs it. PyTorch's
side is benchmarks/torch_reference.py (written from the papers, not from mdjax) with its own data
order (torch.randperm per epoch), its own augmentation code and its own SAM step, on
`torch.set_num_threads(2)`. Only the split and the recipe's numbers are shared.

The two must agree within 0.5 points of mean test accuracy over the seeds; a larger gap means a bug
in one of them (SAM, the SpinalNet head, BatchNorm, initialisation, augmentation), to be found,
not reported. Prints each seed, mean +- std per side, and the verdict; `--json PATH` saves them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE_POINTS = 0.5


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("mdjax_bench_config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def check_recipe(config) -> None:
  """The PyTorch side implements this subset of mdjax's options; anything else is refused."""
  t, m = config.train, config.model
  problems = []
  if m.backbone not in ("wrn10_1", "wrn10_2", "wrn16_2", "wrn16_4", "wrn28_10"):
    problems.append(f"model.backbone={m.backbone} (a CIFAR WRN is needed)")
  if t.optimizer not in ("sam", "sgd") or (t.optimizer == "sam" and t.base_optimizer != "sgd"):
    problems.append(f"train.optimizer={t.optimizer}/{t.base_optimizer} (sgd or sam over sgd)")
  if config.data.augment not in ("none", "crop", "crop_flip"):
    problems.append(f"data.augment={config.data.augment}")
  if t.sam_adaptive or m.freeze_backbone or m.backbone_lr_mult != 1.0 or m.dtype != "float32":
    problems.append("ASAM, a frozen backbone, a backbone lr multiplier or bfloat16")
  if problems:
    sys.exit("classifier_accuracy: the PyTorch reference does not implement " + "; ".join(problems))


def arrays(source, image_size: int):
  from mdjax.data import pipeline
  images = np.stack([pipeline.eval_image(source[i]["image"], image_size) for i in range(len(source))])
  return images, np.asarray(source.labels, np.int64)


# ------------------------------------------------------------------------------------------------
# mdjax


def mdjax_accuracy(config, splits, seed: int) -> tuple[float, float]:
  from mdjax import models
  from mdjax.train import classifier as clf
  config = config.copy_and_resolve_references()
  config.seed = seed
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    result = clf.train_classifier(config, splits.train, splits.val, workdir, splits.num_classes)
  seconds = time.perf_counter() - start
  model = models.build_classifier(config.model, splits.num_classes)
  return clf.evaluate(model, result.variables, splits.test, config)["accuracy"], seconds


# ------------------------------------------------------------------------------------------------
# PyTorch


def _augment(x, policy: str, generator):
  """The training policies crop / crop_flip / none on an NCHW batch, with torch's own RNG."""
  import torch
  from torch.nn import functional as F
  if policy == "none":
    return x
  n, _, s, _ = x.shape
  pad = max(1, s // 8)
  padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
  offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
  out = torch.stack([padded[i, :, int(dy):int(dy) + s, int(dx):int(dx) + s]
                     for i, (dy, dx) in enumerate(offsets)])
  if policy == "crop_flip":
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
  return out


def torch_accuracy(config, data, seed: int) -> tuple[float, float]:
  import torch
  import torch_reference as ref
  torch.set_num_threads(2)
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed)
  (x_train, y_train), (x_test, y_test) = data
  t, m = config.train, config.model
  model = ref.build_classifier(m.backbone, m.head, len(np.unique(y_train)), width=m.head_width,
                               dropout=m.dropout, activation=m.activation)
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  optimizer = torch.optim.SGD([{"params": decay, "weight_decay": t.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=t.learning_rate, momentum=t.momentum)
  batch = int(t.batch_size)
  steps_per_epoch = len(x_train) // batch
  total = int(t.epochs) * steps_per_epoch
  schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, ref.lr_lambda(
      t.schedule, total, int(round(t.warmup_epochs * steps_per_epoch)),
      step_every=int(round(t.step_epochs * steps_per_epoch)), gamma=t.step_gamma))
  loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(t.label_smoothing))
  to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
  xs, ys = to_nchw(x_train), torch.from_numpy(y_train)
  start = time.perf_counter()
  model.train()
  for _ in range(int(t.epochs)):
    order = torch.randperm(len(xs), generator=generator)
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      x = _augment(xs[idx], config.data.augment, generator)
      if t.optimizer == "sam":
        ref.sam_step(model, loss_fn, x, ys[idx], optimizer, rho=float(t.sam_rho))
      else:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), ys[idx]).backward()
        optimizer.step()
      schedule.step()
  seconds = time.perf_counter() - start
  model.eval()
  with torch.no_grad():
    pred = torch.cat([model(to_nchw(x_test[i:i + 256])).argmax(1) for i in range(0, len(x_test), 256)])
  return float((pred.numpy() == y_test).mean()), seconds


# ------------------------------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/default.py", help="config file[:arg]")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--side", choices=("both", "mdjax", "torch"), default="both")
  parser.add_argument("--json", default="", help="also write the figures to this file")
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from mdjax.data import registry

  config = load_config(args.config)
  check_recipe(config)
  seeds = [int(s) for s in args.seeds.split(",")]
  splits = registry.load_splits(config.data)
  size = int(config.data.image_size)
  data = (arrays(splits.train, size), arrays(splits.test, size))
  t = config.train
  print(f"{args.config}: {len(splits.train)} train / {len(splits.test)} test images; "
        f"{config.model.backbone} + {config.model.head} ({config.model.activation}), "
        f"{t.optimizer} (rho {t.sam_rho}) over {t.base_optimizer} lr {t.learning_rate} "
        f"{t.schedule}, {t.epochs} epochs of batch {t.batch_size}, augment {config.data.augment}",
        flush=True)
  results = {"config": args.config, "seeds": seeds}
  sides = ("mdjax", "torch") if args.side == "both" else (args.side,)
  for side in sides:
    accs, secs = [], []
    for seed in seeds:
      acc, sec = (mdjax_accuracy(config, splits, seed) if side == "mdjax"
                  else torch_accuracy(config, data, seed))
      accs.append(acc)
      secs.append(sec)
      print(f"{side:5s} seed {seed}: test accuracy {acc:.4f} ({sec:.0f} s)", flush=True)
    results[side] = {"accuracy": accs, "seconds": secs, "mean": statistics.mean(accs),
                     "std": statistics.pstdev(accs)}
    print(f"{side:5s} mean {results[side]['mean']:.4f} +- {results[side]['std']:.4f}", flush=True)
  if len(sides) == 2:
    gap = 100 * (results["mdjax"]["mean"] - results["torch"]["mean"])
    results["gap_points"] = gap
    results["agree"] = abs(gap) <= TOLERANCE_POINTS
    print(f"mdjax - torch: {gap:+.2f} points: "
          + ("AGREE" if results["agree"] else f"DISAGREE (tolerance {TOLERANCE_POINTS} points)"))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  main()
