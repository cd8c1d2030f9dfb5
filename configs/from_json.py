"""A config read back from JSON: a workdir's `config.json`, or an ablation cell's config.

    python -m mdjax.main --config=configs/from_json.py:runs/ablation/mdt/seed_0/ablation_config.json \
        --workdir=runs/ablation/mdt/seed_0
    python -m mdjax.main --config=configs/from_json.py:runs/default-1a2b3c4d/config.json

Every key of the file is set on `base_config()`, so a key this mdjax does not define is refused
(naming the file and the key) rather than dropped. `mdjax.ablate` runs each cell of its grid this
way: the cell's config is composed and validated once, by the runner, and the cell runs exactly
that config.
"""

from mdjax import config as config_lib
from mdjax.core import files
from mdjax.errors import UnknownConfigKeyError, UserError


def _leaves(tree: dict, prefix: str = ""):
  for name, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{name}.")
    else:
      yield prefix + name, value


def get_config(arg=None):
  if not arg:
    raise UserError("configs/from_json.py needs the JSON file to read: "
                    "--config=configs/from_json.py:PATH/config.json")
  try:
    tree = files.read_json(arg)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read the config {arg}: {e}") from None
  config = config_lib.base_config()
  known = set(config_lib.config_keys(config))
  for key, value in _leaves(tree):
    if key not in known:
      raise UnknownConfigKeyError(key, f"in {arg}", config_lib.closest_key(key, config))
    config_lib.set_key(config, key, value)
  return config
