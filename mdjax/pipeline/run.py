"""Placeholder until the pipeline stages land: load and validate config and data, print a summary."""

from __future__ import annotations

from mdjax import config as config_lib
from mdjax.data import registry


def run(config, workdir: str) -> dict:
  splits = registry.load_splits(config.data)
  config_lib.validate(config, num_classes=splits.num_classes)
  print(f"mdjax: dataset {config.data.name}: {splits.summary()}")
  print(f"mdjax: workdir {workdir}")
  print("mdjax: stages not built yet: " + ", ".join(config_lib.parse_stages(config)))
  return {}
