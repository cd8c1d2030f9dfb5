"""What a run will do, read from its config before anything runs: its stages, seeds and nWPC.

Kept free of JAX on purpose: mdjax.config reads STAGES while the command line is parsed, before
mdjax.main starts JAX.
"""

from __future__ import annotations

import math

from mdjax.errors import ConfigError

# Algorithm 1's stages in the order they run; each is a method of mdjax.pipeline.stages.Run.
# "distill" (GAN distillation, `config.distill`) replaces gan, generate and finetune when enabled;
# otherwise it is recorded as skipped, as those three are when it is enabled.
STAGES = ("train", "validate", "gan", "generate", "finetune", "distill", "test")


def parse_stages(config) -> list[str]:
  """`config.stages` ("train,validate") as a list; a ConfigError for an unknown stage."""
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  bad = [s for s in stages if s not in STAGES]
  if bad or not stages:
    raise ConfigError("stages", config.stages, "a comma-separated subset of " + ",".join(STAGES))
  return stages


def parse_seeds(config) -> list[int]:
  """`config.seeds` ("0,1,2") as a list, or [config.seed] when it is empty."""
  if not str(config.seeds).strip():
    return [int(config.seed)]
  try:
    return [int(s) for s in str(config.seeds).split(",") if s.strip()]
  except ValueError:
    raise ConfigError("seeds", config.seeds, "comma-separated integers such as 0,1,2") from None


def nwpc_count(nwpc, num_classes: int) -> int:
  """The number of worst-performing classes for `nwpc` ("auto", a count, or a fraction of n)."""
  if nwpc == "auto":
    return math.ceil((0.2 if num_classes > 20 else 0.5) * num_classes)
  if isinstance(nwpc, float):  # a fraction of the classes, rounded up as the paper does
    return math.ceil(nwpc * num_classes)
  return int(nwpc)


def filter_threshold(mistake_filter, num_classes: int) -> float | None:
  """The class-probability threshold `mistake.filter` sets (None: no filtering)."""
  if mistake_filter == "none":
    return None
  return 1.0 / num_classes if mistake_filter == "1/n" else float(mistake_filter)


def check_nwpc(nwpc, num_classes: int) -> None:
  """A class count in `mistake.nwpc` must not exceed the dataset's number of classes."""
  if isinstance(nwpc, int) and not isinstance(nwpc, bool) and nwpc > num_classes:
    raise ConfigError("mistake.nwpc", nwpc, f"at most the number of classes ({num_classes})")
