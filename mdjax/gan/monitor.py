"""When a class's GAN has trained enough: its images judged while it trains, and the stopping rule.

A fixed step count tuned on one dataset does not carry over to another (300 steps drew clear 8x8
digits and blurred 28x28 shirts), so each class's GAN is judged every `gan.sample_every` steps
and stops once its images are right:

* the independent judge (mdjax.gan.judge, fit on the real training images, nothing the pipeline
  trained) assigns at least `gan.stop_judge` times its own held-out recall of the class to it:
  relative to the recall, because a judge that recognises 57% of real shirts cannot accept 90%
  of generated ones;
* their diversity ratio (spread against the real images') is at least `gan.stop_diversity`;
* and their Frechet distance to the class's real images (judge feature space) is either as
  small as the class's own, at most `gan.stop_fd_floor` times the distance between two random
  halves of the class's real images, or has stopped improving: for `gan.stop_patience` checks in
  a row it has not come `gan.stop_fd_gain` (a fraction) below the best of the checks before. One
  flat check is not enough: the distance is noisy from check to check, and Fashion-MNIST shirts
  stopped at their first flat check were blurred silhouettes where 500 steps later they had
  sleeves, collars and checks (benchmarks/RESULTS.md, "Class GANs on Fashion-MNIST").

A class that never passes trains `gan.max_steps`, the budget, and the run says so.
`gan.stop_judge = 0` turns the rule off: every class trains `gan.steps`, the paper's fixed
schedule.

Each check draws `CHECK_SAMPLES` images from the class's EMA generator with a key of its own
(`fold_in(stream_key(seed, k, CHECK_STREAM), step)`), so a resumed run repeats every check and
every decision exactly. The checks of a class (its quality curve) are saved with the chunk's
checkpoints and end up in results.json and the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from mdjax.gan import judge as judge_lib
from mdjax.gan import quality

# Images drawn from a class's EMA generator at each check: enough for a judge fraction to within a
# few points and a Frechet distance in the judge's 32 principal components.
CHECK_SAMPLES = 128
# A judge that recognises fewer of a class's real held-out images than this cannot certify its
# generated ones; the run says so.
WEAK_JUDGE = 0.5


@dataclasses.dataclass(frozen=True)
class StopRule:
  """The thresholds of the stopping rule (module docstring); `judge` = 0 turns it off. Their
  defaults are config.gan's (`from_config`)."""

  judge: float
  diversity: float
  fd_gain: float
  patience: int
  fd_floor: float

  @classmethod
  def from_config(cls, gan_config) -> StopRule:
    return cls(float(gan_config.stop_judge), float(gan_config.stop_diversity),
               float(gan_config.stop_fd_gain), int(gan_config.stop_patience),
               float(gan_config.stop_fd_floor))

  @property
  def enabled(self) -> bool:
    return self.judge > 0

  def shortfalls(self, check: Mapping[str, float]) -> list[str]:
    """What keeps one check's images from passing: ["judge 0.41 < 0.51", ...]; [] if they pass."""
    out = []
    needed = self.judge * check["judge_recall"]
    if check["judge_fraction"] < needed:
      out.append(f"judge {check['judge_fraction']:.2f} < {needed:.2f}")
    diversity = check.get("diversity_ratio")
    if diversity is not None and math.isfinite(diversity) and diversity < self.diversity:
      out.append(f"diversity {diversity:.2f} < {self.diversity:.2f}")
    return out

  def passes(self, check: Mapping[str, float]) -> bool:
    """Whether one check's images pass the judge and the diversity thresholds."""
    return not self.shortfalls(check)

  def improving(self, curve: Sequence[Mapping[str, float]]) -> bool:
    """Whether any of the last `patience` checks' Frechet distances came `fd_gain` below the best
    of the checks before it; True while there are not yet `patience` checks after the first.
    Without distances (a class of one image) a class counts as improving for as long."""
    if len(curve) <= self.patience:
      return True
    distances = [c.get("frechet_distance") for c in curve]
    if any(d is None for d in distances):
      return False
    return any(distances[i] < (1.0 - self.fd_gain) * min(distances[:i])
               for i in range(len(curve) - self.patience, len(curve)))

  def near_floor(self, check: Mapping[str, float]) -> bool:
    """Whether the check's Frechet distance is within `fd_floor` times the class's own (the
    distance between two halves of its real images, `check["fd_floor"]`)."""
    fd, floor = check.get("frechet_distance"), check.get("fd_floor")
    return bool(self.fd_floor and fd is not None and floor and fd <= self.fd_floor * floor)

  def should_stop(self, curve: Sequence[Mapping[str, float]]) -> bool:
    """After the last check of `curve` (a class's checks in order): stop training the class?"""
    return (self.enabled and bool(curve) and self.passes(curve[-1])
            and (self.near_floor(curve[-1]) or not self.improving(curve)))


class Monitor:
  """Judges a class's generated images during GAN training (module docstring).

  Args:
    judge: the fitted independent judge.
    real_by_class: {class index: the class's real training images, uint8 [N, R, R, 3]}.
    rule: the stopping rule.
    class_names: for the lines the run prints.
  """

  def __init__(self, judge: judge_lib.Judge, real_by_class: Mapping[int, np.ndarray],
               rule: StopRule, class_names: Sequence[str] | None = None):
    self.judge, self.real, self.rule = judge, dict(real_by_class), rule
    self.class_names = class_names
    self._floors: dict[int, float | None] = {}

  def fd_floor(self, k: int) -> float | None:
    """The Frechet distance between two random halves of class k's real images in the judge's
    space (seeded): how far apart two samples of the class itself are. None when a half has no
    more images than the space has dimensions: its covariance is then rank-deficient and the
    distance between two such halves overstates the class's spread (with 20 images, halves of 10
    in 32 dimensions, a floor that let blurred blobs stop at their first check)."""
    if k not in self._floors:
      real = self.real[k]
      self._floors[k] = None
      order = np.random.default_rng(k).permutation(len(real))
      half = len(real) // 2
      if half >= 2:
        a, b = (self.judge.embed(self.judge.features(real[i])) for i in (order[:half],
                                                                          order[half:]))
        if half > a.shape[1]:
          self._floors[k] = quality.frechet_distance(a, b)
    return self._floors[k]

  def name(self, k: int) -> str:
    return str(self.class_names[k]) if self.class_names is not None else f"class {k}"

  def check(self, k: int, step: int, images: np.ndarray) -> dict:
    """One check of class k's generated `images` at GAN step `step`."""
    row = self.judge.measure({k: self.real[k]}, {k: images})[k]
    recall = self.judge.heldout_class_accuracy[k]
    row = {"step": int(step), **row, "judge_recall": float(recall) if np.isfinite(recall) else 1.0,
           "fd_floor": self.fd_floor(k)}
    row["passed"] = self.rule.passes(row)
    return row

  def describe(self, k: int, curve: Sequence[Mapping], reason: str) -> str:
    """The line printed when class k stops (`reason` "passed" or "budget")."""
    last = curve[-1]
    fds = [c["frechet_distance"] for c in curve if c.get("frechet_distance") is not None]
    short = self.rule.shortfalls(last)
    verdict = ("stopped: its images passed" if reason == "passed" else
               f"reached its budget without passing ({', '.join(short)})" if short else
               "reached its budget")
    diversity = last.get("diversity_ratio")
    text = (f"GAN of {self.name(k)} {verdict} at step {last['step']}: judge "
            f"{last['judge_fraction']:.2f} (needs {self.rule.judge:.2f} x its real recall "
            f"{last['judge_recall']:.2f} = {self.rule.judge * last['judge_recall']:.2f})")
    if diversity is not None:
      text += f", diversity {diversity:.2f}"
    if fds:
      text += f", Frechet distance {fds[-1]:.3g} (best {min(fds):.3g}"
      text += (f"; two halves of the real class: {last['fd_floor']:.3g})"
               if last.get("fd_floor") else ")")
    if last.get("memorisation") is not None:
      text += f", near-copies {last['memorisation']:.2f}"
    if last["judge_recall"] < WEAK_JUDGE:
      text += (f"; the judge recognises only {last['judge_recall']:.0%} of real "
               f"{self.name(k)} images, so its verdict says little")
    return text


def stop_record(curves: Mapping[int, Sequence[Mapping]], steps: Mapping[int, int],
                reasons: Mapping[int, str]) -> dict:
  """What results.json keeps per class: steps trained, why it stopped, and its quality curve."""
  return {str(k): {"steps": int(steps[k]), "stopped": reasons.get(k, "budget"),
                   "curve": list(curves.get(k, []))} for k in sorted(steps)}

