"""ResNet-18 / ResNet-50 / Wide-ResNet-101-2 backbones in torchvision's exact layout.

The layout is torchvision's (v1.5): a 7x7 stride-2 stem with explicit padding 3, a 3x3 stride-2
max-pool with padding 1, then four stages of BasicBlocks (ResNet-18) or Bottlenecks (ResNet-50,
WRN-101-2) whose stride sits on the 3x3 conv, with a conv1x1+BN `downsample` shortcut where the
shape changes. Explicit paddings rather than 'SAME' matter: 'SAME' pads a stride-2 conv
asymmetrically (TensorFlow's rule) and would shift every feature map against torchvision weights.

Module names are chosen so a torchvision state_dict converts 1:1 (see `pretrained.py`): the
torch key's dotted path maps to the Flax path by joining each numeric component to its parent
with "_" and renaming the leaf:

  layer1.0.conv1.weight          -> params/layer1_0/conv1/kernel     (OIHW -> HWIO)
  layer2.0.downsample.0.weight   -> params/layer2_0/downsample_0/kernel
  layer2.0.downsample.1.weight   -> params/layer2_0/downsample_1/scale
  bn1.bias                       -> params/bn1/bias
  bn1.running_mean / running_var -> batch_stats/bn1/mean / var
  fc.weight / fc.bias            -> not in the backbone (the classifier head replaces it)

BatchNorm uses torchvision's eps 1e-5 and momentum 0.1 (Flax momentum 0.9); convs use
torchvision's He-normal fan-out init.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(train: bool, dtype, name: str):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)


def _conv(features: int, kernel: int, stride: int, dtype, name: str, conv=None):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name,
                 conv_general_dilated=conv)


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # the convolution every nn.Conv runs (mdjax.core.cpu_conv.Rules); None: XLA's
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool, norm_mask=None):
    identity = x
    y = _conv(self.planes, 3, self.stride, self.dtype, "conv1", self.conv)(x)
    y = nn.relu(_bn(train, self.dtype, "bn1")(y, mask=norm_mask))
    y = _conv(self.planes, 3, 1, self.dtype, "conv2", self.conv)(y)
    y = _bn(train, self.dtype, "bn2")(y, mask=norm_mask)
    if self.downsample:
      identity = _conv(self.planes, 1, self.stride, self.dtype, "downsample_0", self.conv)(x)
      identity = _bn(train, self.dtype, "downsample_1")(identity, mask=norm_mask)
    return nn.relu(y + identity)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carries the stride, torchvision v1.5), 1x1 expand x4."""

  planes: int
  stride: int = 1
  downsample: bool = False
  width_per_group: int = 64
  dtype: jnp.dtype = jnp.float32
  conv: Any = None
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool, norm_mask=None):
    width = self.planes * self.width_per_group // 64
    identity = x
    y = _conv(width, 1, 1, self.dtype, "conv1", self.conv)(x)
    y = nn.relu(_bn(train, self.dtype, "bn1")(y, mask=norm_mask))
    y = _conv(width, 3, self.stride, self.dtype, "conv2", self.conv)(y)
    y = nn.relu(_bn(train, self.dtype, "bn2")(y, mask=norm_mask))
    y = _conv(self.planes * 4, 1, 1, self.dtype, "conv3", self.conv)(y)
    y = _bn(train, self.dtype, "bn3")(y, mask=norm_mask)
    if self.downsample:
      identity = _conv(self.planes * 4, 1, self.stride, self.dtype, "downsample_0", self.conv)(x)
      identity = _bn(train, self.dtype, "downsample_1")(identity, mask=norm_mask)
    return nn.relu(y + identity)


class ResNet(nn.Module):
  """torchvision ResNet without `fc`; returns globally average-pooled features [B, F]."""

  block: str  # "basic" | "bottleneck"
  layers: Sequence[int]
  width_per_group: int = 64
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # the convolution every nn.Conv runs (mdjax.core.cpu_conv.Rules); None: XLA's

  @property
  def num_features(self) -> int:
    return 512 * (1 if self.block == "basic" else 4)

  @nn.compact
  def __call__(self, x, train: bool = False, norm_mask=None):
    x = _conv(64, 7, 2, self.dtype, "conv1", self.conv)(x.astype(self.dtype))
    x = nn.relu(_bn(train, self.dtype, "bn1")(x, mask=norm_mask))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    in_features = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
      for i in range(blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        if self.block == "basic":
          out_features = planes
          make = lambda **kw: BasicBlock(planes, dtype=self.dtype, conv=self.conv, **kw)
        else:
          out_features = planes * 4
          make = lambda **kw: Bottleneck(planes, width_per_group=self.width_per_group,
                                         dtype=self.dtype, conv=self.conv, **kw)
        downsample = i == 0 and (stride != 1 or in_features != out_features)
        block = make(stride=stride, downsample=downsample, name=f"layer{stage + 1}_{i}")
        x = block(x, train, norm_mask)
        in_features = out_features
    return jnp.mean(x, axis=(1, 2))


def resnet18(dtype=jnp.float32, conv=None) -> ResNet:
  return ResNet("basic", (2, 2, 2, 2), dtype=dtype, conv=conv)


def resnet50(dtype=jnp.float32, conv=None) -> ResNet:
  return ResNet("bottleneck", (3, 4, 6, 3), dtype=dtype, conv=conv)


def wide_resnet101_2(dtype=jnp.float32, conv=None) -> ResNet:
  # torchvision: Bottleneck with width_per_group 128, i.e. inner 3x3 convs twice as wide.
  return ResNet("bottleneck", (3, 4, 23, 3), width_per_group=128, dtype=dtype, conv=conv)
