"""CIFAR-style Wide-ResNet (Zagoruyko & Komodakis 2016) for 32x32 inputs.

WRN-d-k: a 3x3 conv to 16 channels, then three groups of (d - 4) / 6 pre-activation blocks
(BN-ReLU-conv3x3-[dropout]-BN-ReLU-conv3x3) of widths 16k, 32k, 64k with strides 1, 2, 2, then
BN-ReLU and a global average pool. Where a block changes width or stride, the shortcut is a 1x1
conv applied to the pre-activated input, as in the authors' code. WRN-16-4 (2.7M parameters,
features 256) is mdjax's fast from-scratch backbone; WRN-28-10 (36.5M, features 640) is the
paper-scale CIFAR model. BatchNorm follows PyTorch's eps 1e-5 / momentum 0.1.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel, stride, dtype, name, conv=None):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name,
                 conv_general_dilated=conv)


def _bn(train, dtype, name):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)


class WideBlock(nn.Module):
  features: int
  stride: int
  drop_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # the convolution every nn.Conv runs (mdjax.core.cpu_conv.Rules); None: XLA's

  @nn.compact
  def __call__(self, x, train: bool, norm_mask=None):
    pre = nn.relu(_bn(train, self.dtype, "bn1")(x, mask=norm_mask))
    y = _conv(self.features, 3, self.stride, self.dtype, "conv1", self.conv)(pre)
    y = nn.relu(_bn(train, self.dtype, "bn2")(y, mask=norm_mask))
    y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
    y = _conv(self.features, 3, 1, self.dtype, "conv2", self.conv)(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, self.dtype, "shortcut", self.conv)(pre)
    return x + y


class WideResNet(nn.Module):
  """Returns globally average-pooled features [B, 64 * widen_factor]."""

  depth: int = 16
  widen_factor: int = 4
  drop_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  conv: Any = None  # the convolution every nn.Conv runs (mdjax.core.cpu_conv.Rules); None: XLA's

  @property
  def num_features(self) -> int:
    return 64 * self.widen_factor

  @nn.compact
  def __call__(self, x, train: bool = False, norm_mask=None):
    if (self.depth - 4) % 6:
      raise ValueError(f"Wide-ResNet depth must be 6n + 4, got {self.depth}")
    n = (self.depth - 4) // 6
    x = _conv(16, 3, 1, self.dtype, "conv1", self.conv)(x.astype(self.dtype))
    for g, (width, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
      for i in range(n):
        x = WideBlock(width * self.widen_factor, stride if i == 0 else 1, self.drop_rate,
                      self.dtype, self.conv, name=f"block{g + 1}_{i}")(x, train, norm_mask)
    x = nn.relu(_bn(train, self.dtype, "bn")(x, mask=norm_mask))
    return jnp.mean(x, axis=(1, 2))
