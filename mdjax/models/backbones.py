"""The backbone registry: `config.model.backbone` -> a flax module returning pooled features [B, F].

Adding a backbone is adding an entry; `config.validate` reads the allowed names from BACKBONES.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from mdjax.errors import ConfigError
from mdjax.models import efficientnet, resnet, wrn

# CIFAR-style Wide-ResNets (depth, width). The small ones make CPU smoke runs and tests fast:
# on this 2-core CPU a batch-32 gradient of WRN-10-1 takes ~0.07 s against ~4.5 s for WRN-16-4.
CIFAR_WRNS = {"wrn10_1": (10, 1), "wrn10_2": (10, 2), "wrn16_2": (16, 2), "wrn16_4": (16, 4),
              "wrn28_10": (28, 10)}

# name -> builder(dtype, conv); every builder returns a module with `.num_features`.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(wrn.WideResNet, depth, width)
       for name, (depth, width) in CIFAR_WRNS.items()},
    "resnet18": resnet.resnet18,
    "resnet50": resnet.resnet50,
    "wrn101": resnet.wide_resnet101_2,
    **{name: functools.partial(efficientnet.EfficientNet, name) for name in efficientnet.VARIANTS},
}


def build_backbone(name: str, dtype=jnp.float32, conv=None) -> nn.Module:
  """A backbone module returning pooled features; `.num_features` gives F. `conv` is the
  convolution its nn.Convs run (mdjax.core.cpu_conv.Rules; None: XLA's own)."""
  if name not in BACKBONES:
    raise ConfigError("model.backbone", name, "one of " + ", ".join(BACKBONES))
  return BACKBONES[name](dtype=dtype, conv=conv)
