"""Classifier heads on pooled backbone features: linear, SpinalNet and Progressive SpinalNet.

Progressive SpinalNet (Chopra 2021) is the head of the paper's main configuration. Every hidden
layer sees the (dropped-out) backbone features and the outputs of all earlier hidden layers, so
the Dense input widths grow F, F+W, F+2W, F+3W and the output layer reads F+4W. SpinalNet
(Kabir et al. 2020) feeds each hidden layer one half of the features (alternating) and only the
previous layer's output: widths F_a, F_b+W, F_a+W, F_b+W, output 4W. The hidden activation is what
the paper ablates (SELU / GELU / ReLU); mish and swish are there for experiments.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mdjax.errors import ConfigError


def _mish(x):
  return x * jnp.tanh(jax.nn.softplus(x))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "selu": jax.nn.selu,
    # PyTorch's nn.GELU default (exact erf form), as the paper's PyTorch code used.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "mish": _mish,
    "swish": jax.nn.swish,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ConfigError("model.activation", name, "one of " + ", ".join(ACTIVATIONS)) from None


# The name of each head's output layer (what `penultimate=True` leaves out and mdjax.train.refit
# fits again), as the pretrained-weight converters expect it.
OUTPUT, SPINAL_OUTPUT = "fc", "fc_out"


class LinearHead(nn.Module):
  """Dropout then one Dense layer (the usual fine-tuning head; EfficientNet's own classifier)."""

  num_classes: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, penultimate: bool = False):
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x if penultimate else nn.Dense(self.num_classes, dtype=self.dtype, name=OUTPUT)(x)


class SpinalHead(nn.Module):
  """SpinalNet: four hidden layers, each reading one half of the features and the last output."""

  num_classes: int
  width: int = 200
  dropout: float = 0.35
  activation: str = "selu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, penultimate: bool = False):
    act = activation(self.activation)
    d = nn.Dropout(self.dropout, deterministic=not train)(x)
    half = x.shape[-1] // 2
    halves = (d[..., :half], d[..., half:])
    outs = []
    for i in range(4):
      inputs = halves[i % 2] if i == 0 else jnp.concatenate([halves[i % 2], outs[-1]], axis=-1)
      outs.append(act(nn.Dense(self.width, dtype=self.dtype, name=f"fc{i + 1}")(inputs)))
    last = jnp.concatenate(outs, -1)
    return last if penultimate else nn.Dense(self.num_classes, dtype=self.dtype,
                                             name=SPINAL_OUTPUT)(last)


class ProgressiveSpinalHead(nn.Module):
  """Progressive SpinalNet as the authors' code writes it.

  d = Dropout(x); x1 = act(Dense(x)); x_k = act(Dense(concat(d, x1..x_{k-1}))) for k = 2..4;
  logits = Dense(concat(d, x1..x4)). The first layer reads the features before dropout, as the
  authors' transfer-learning scripts do (Chopra 2021, arXiv:2103.11373; code at
  github.com/praveenchopra/ProgressiveSpinalNet, e.g. `SpinalNet_ResNet.forward` in
  Transfer_Learning_Caltech101_wide_resnet101.py, width 200, dropout 0.35); every later layer and
  the output read the dropped-out copy d.
  """

  num_classes: int
  width: int = 200
  dropout: float = 0.35
  activation: str = "selu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, penultimate: bool = False):
    act = activation(self.activation)
    d = nn.Dropout(self.dropout, deterministic=not train)(x)
    outs = [act(nn.Dense(self.width, dtype=self.dtype, name="fc1")(x))]
    for i in range(2, 5):
      inputs = jnp.concatenate([d, *outs], axis=-1)
      outs.append(act(nn.Dense(self.width, dtype=self.dtype, name=f"fc{i}")(inputs)))
    last = jnp.concatenate([d, *outs], -1)
    return last if penultimate else nn.Dense(self.num_classes, dtype=self.dtype,
                                             name=SPINAL_OUTPUT)(last)


HEADS = {"linear": LinearHead, "spinal": SpinalHead, "progressive_spinal": ProgressiveSpinalHead}
# Each head's output layer, by head name.
OUTPUT_LAYERS = {"linear": OUTPUT, "spinal": SPINAL_OUTPUT, "progressive_spinal": SPINAL_OUTPUT}
