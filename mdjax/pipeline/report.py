"""The human report beside results.json: report.md with a per-class accuracy plot, each weak
class's generated images next to its real ones, and the GAN quality figures."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from mdjax.core import files
from mdjax.gan import generate

GRID = 16  # images per grid
CONTROL_LABELS = {"control_real_finetune": "control: same fine-tune on real data only",
                  "control_full_gan": "control: full GAN augmentation (nWPC = n)",
                  "control_filtered": "control: mistake-driven, generated images filtered (p > 1/n)"}


def _plot_class_accuracy(path: str, names, before, after, weak, title: str) -> None:
  # Imported here: matplotlib takes about a second to import and only the report plots; the
  # backend must be chosen before pyplot is imported.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  n = len(names)
  x = np.arange(n)
  fig, ax = plt.subplots(figsize=(max(7, 0.45 * n + 4), 4))
  ax.bar(x - 0.2, before, 0.4, label="baseline (before)", color="#9bb7d4")
  ax.bar(x + 0.2, after, 0.4, label="mistake-driven (after)", color="#1f5f9e")
  for k in weak:
    ax.axvspan(k - 0.5, k + 0.5, color="#f4c7c3", alpha=0.5, zorder=0)
  ax.set_xticks(x, [str(c) for c in names], rotation=90 if n > 12 else 0, fontsize=7 if n > 30 else 9)
  low = min(np.nanmin(before), np.nanmin(after))
  ax.set_ylim(max(0.0, low - 0.05), 1.0)
  ax.set_ylabel("test accuracy")
  ax.set_title(title + "  (shaded: weak classes)")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _side_by_side(path: str, real: np.ndarray, generated: np.ndarray) -> None:
  left, right = generate.make_grid(real[:GRID]), generate.make_grid(generated[:GRID])
  h = max(left.shape[0], right.shape[0])
  gap = np.full((h, 8, 3), 255, np.uint8)
  pad = lambda g: np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255)  # noqa: E731
  canvas = np.concatenate([pad(left), gap, pad(right)], axis=1)
  scale = max(1, 384 // max(1, canvas.shape[0]))
  img = Image.fromarray(canvas)
  if scale > 1:
    img = img.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path)


def _fmt(x, digits=4):
  return "n/a" if x is None else f"{x:.{digits}f}"


def write_report(workdir: str, results: dict, run) -> str:
  """report.md for one seed's run; returns its path."""
  names, weak = results["classes"], results["worst_classes"]
  b, f = results["baseline"], results["final"]
  cfg = results["config"]
  lines = [
      f"# mdjax report: {cfg['data']['name']}, seed {results['seed']}", "",
      f"Backbone `{cfg['model']['backbone']}`, head `{cfg['model']['head']}`, activation "
      f"`{cfg['model']['activation']}`, optimizer `{cfg['train']['optimizer']}`"
      f"{' (' + cfg['train']['base_optimizer'] + ')' if cfg['train']['optimizer'] == 'sam' else ''}; "
      f"nWPC {results['nwpc']}, nSamples ratio {cfg['mistake']['nsamples_ratio']}; "
      f"splits {results['split_sizes']}.", "",
      "| model | test accuracy |", "|---|---|",
      f"| baseline: trained, without mistake-driven training | {_fmt(b['test_accuracy'])} |",
      f"| final: fine-tuned on real + generated images | {_fmt(f['test_accuracy'])} |",
  ]
  for name, r in results.get("controls", {}).items():
    if "test_accuracy" in r:
      lines.append(f"| {CONTROL_LABELS.get(name, name)} | {_fmt(r['test_accuracy'])} |")
  fig = os.path.join("figures", "class_accuracy.png")
  _plot_class_accuracy(os.path.join(workdir, fig), names, b["test_class_accuracy"],
                       f["test_class_accuracy"], weak, "per-class test accuracy")
  lines += ["", f"![per-class test accuracy]({fig})", "", "## Weak classes", ""]
  if not weak:
    lines.append("None: mistake-driven training was off (nWPC = 0).")
  else:
    lines += ["| class | val accuracy (selection) | test before | test after | generated | "
              "judge says target | diversity | classifier says target | Frechet distance |",
              "|---|---|---|---|---|---|---|---|---|"]
    quality = results.get("gan_quality", {})
    for k in weak:
      q = quality.get(str(k), {})
      lines.append(f"| {names[k]} | {_fmt(results['val_class_accuracy'][k])} | "
                   f"{_fmt(b['test_class_accuracy'][k])} | {_fmt(f['test_class_accuracy'][k])} | "
                   f"{results['generated_per_class'].get(k, 0)} | {_fmt(q.get('judge_fraction'), 3)} | "
                   f"{_fmt(q.get('diversity_ratio'), 2)} | "
                   f"{_fmt(q.get('target_class_fraction'), 3)} | {_fmt(q.get('frechet_distance'), 2)} |")
    judge = results.get("judge") or {}
    lines += ["", "The judge is a " + judge.get("model", "classifier the pipeline did not train")
              + (f" (held-out accuracy on the real validation images {judge['heldout_accuracy']:.3f})"
                 if "heldout_accuracy" in judge else "")
              + "; its column is the share of a class's generated images it assigns to that class. "
              "Diversity is the generated images' mean pairwise distance over the real images' "
              "in the judge's feature space: near 1 they vary as much as the class, near 0 the GAN "
              "draws the same few images (mode collapse, which the other columns miss). "
              "The classifier column is the same share under the trained classifier; the Frechet "
              "distance compares real and generated images of the class in the classifier's pooled "
              "feature space (lower is closer).", ""]
    gen_dir = os.path.join(workdir, results.get("generated_dir") or "generated")
    if generate.is_complete(gen_dir):
      images, labels = generate.load_generated(gen_dir)
      real = run.weak_images(weak)
      for k in weak:
        fake = images[labels == k]
        if len(fake) == 0:
          continue
        path = os.path.join("figures", f"class_{k:04d}_real_vs_generated.png")
        _side_by_side(os.path.join(workdir, path), real[k], fake)
        lines += [f"**{names[k]}**: real (left) and generated (right)", "", f"![{names[k]}]({path})", ""]
  stopping = results.get("gan_stopping") or {}
  if stopping:
    lines += _stopping_section(workdir, stopping, names)
  lines += ["## Stage wall times", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {n} | {_fmt(s, 1)} |" for n, s in results["stage_seconds"].items()]
  path = os.path.join(workdir, "report.md")
  files.write_atomic(path, "\n".join(lines) + "\n")
  return path


def _stopping_section(workdir: str, stopping: dict, names) -> list[str]:
  """How long each weak class's GAN trained and why it stopped (mdjax.gan.monitor), with its
  quality curve drawn."""
  lines = ["## The class GANs: when each stopped", "",
           "| class | steps | stopped | judge (its real images) | diversity | "
           "Frechet distance (the class's own) | near-copies |", "|---|---|---|---|---|---|---|"]
  for k, record in sorted(stopping.items(), key=lambda item: int(item[0])):
    last = record["curve"][-1] if record["curve"] else {}
    floor = last.get("fd_floor")
    lines.append(
        f"| {names[int(k)]} | {record['steps']} | "
        f"{'its images passed' if record['stopped'] == 'passed' else 'budget'} | "
        f"{_fmt(last.get('judge_fraction'), 2)} ({_fmt(last.get('judge_recall'), 2)}) | "
        f"{_fmt(last.get('diversity_ratio'), 2)} | "
        f"{_fmt(last.get('frechet_distance'), 3)} ({_fmt(floor, 3)}) | "
        f"{_fmt(last.get('memorisation'), 2)} |")
  fig = os.path.join("figures", "gan_quality.png")
  if any(record["curve"] for record in stopping.values()):
    _plot_curves(os.path.join(workdir, fig), stopping, names)
    lines += ["", f"![quality of each class's generated images while its GAN trained]({fig})"]
  lines += ["", "Every `gan.sample_every` steps the class's EMA generator is judged; it stops once "
            "its images pass the judge and diversity thresholds and their Frechet distance (the "
            "judge's features) is as small as the class's own (two halves of its real images) "
            "or has stopped improving (mdjax/gan/monitor.py).", ""]
  return lines


def _plot_curves(path: str, stopping: dict, names) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for k, record in sorted(stopping.items(), key=lambda item: int(item[0])):
    curve = record["curve"]
    steps = [c["step"] for c in curve]
    line, = axes[0].plot(steps, [c["judge_fraction"] for c in curve], marker="o",
                         label=str(names[int(k)]))
    axes[1].plot(steps, [c["frechet_distance"] if c["frechet_distance"] is not None else np.nan
                         for c in curve], marker="o", color=line.get_color())
  axes[0].set_title("judge's fraction of the class")
  axes[1].set_title("Frechet distance to the class (judge features)")
  axes[1].set_yscale("log")
  for ax in axes:
    ax.set_xlabel("GAN step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_summary_report(workdir: str, results: dict) -> str:
  """report.md over several seeds: mean +- std, and links to each seed's own report."""
  if "final" not in results:
    return ""
  names = results["classes"]
  b, f = results["baseline"], results["final"]
  lines = [f"# mdjax report: {results['config']['data']['name']}, seeds {results['seeds']}", "",
           "| model | test accuracy (mean +- std over seeds) |", "|---|---|",
           f"| baseline | {b['test_accuracy']:.4f} +- {b['test_accuracy_std']:.4f} |",
           f"| mistake-driven | {f['test_accuracy']:.4f} +- {f['test_accuracy_std']:.4f} |"]
  for name, r in results.get("controls", {}).items():
    lines.append(f"| {CONTROL_LABELS.get(name, name)} | {r['test_accuracy']:.4f} +- "
                 f"{r['test_accuracy_std']:.4f} |")
  fig = os.path.join("figures", "class_accuracy.png")
  _plot_class_accuracy(os.path.join(workdir, fig), names, b["test_class_accuracy"],
                       f["test_class_accuracy"], results["worst_classes"],
                       "per-class test accuracy, mean over seeds")
  lines += ["", f"![per-class test accuracy]({fig})", "",
            "Weak classes per seed: " + "; ".join(
                f"seed {s}: {', '.join(names[k] for k in w)}"
                for s, w in zip(results["seeds"], results["worst_classes_per_seed"])), ""]
  lines += [f"- [seed {s}](seed_{s}/report.md)" for s in results["seeds"]]
  path = os.path.join(workdir, "report.md")
  files.write_atomic(path, "\n".join(lines) + "\n")
  return path
