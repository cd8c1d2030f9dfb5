"""Backbones, heads and build_classifier: shapes, parameter counts, activations, BatchNorm modes.

Shapes and parameter counts come from `jax.eval_shape` (no compile); the few real forward passes
use tiny images and random variables filled on the host (a jitted random init of a deep network
compiles for many seconds).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mdjax import config as config_lib
from mdjax import models
from mdjax.errors import ConfigError
from mdjax.models import heads


def model_config(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.base_config().model
  c.weights = "random"
  c.update(overrides)
  return c


def shapes_of(module, x, **kwargs):
  return jax.eval_shape(functools.partial(module.init, train=False, **kwargs),
                        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)


def random_variables(module, x, seed=0):
  """He-scaled random weights and non-trivial BatchNorm statistics, made with numpy."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), s.shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, shapes_of(module, x))


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------
# Heads


def dense_shapes(head, features):
  params = shapes_of(head, jnp.zeros((2, features)))["params"]
  return {k: (v["kernel"].shape, v["bias"].shape) for k, v in params.items()}


def test_progressive_spinal_dense_sizes_follow_the_formula():
  F, W, n = 10, 3, 4
  shapes = dense_shapes(heads.ProgressiveSpinalHead(n, width=W), F)
  assert shapes == {
      "fc1": ((F, W), (W,)),
      "fc2": ((F + W, W), (W,)),
      "fc3": ((F + 2 * W, W), (W,)),
      "fc4": ((F + 3 * W, W), (W,)),
      "fc_out": ((F + 4 * W, n), (n,)),
  }


def test_spinal_dense_sizes_follow_the_formula():
  F, W, n = 11, 3, 4  # odd F: halves of 5 and 6
  a, b = F // 2, F - F // 2
  shapes = dense_shapes(heads.SpinalHead(n, width=W), F)
  assert shapes == {
      "fc1": ((a, W), (W,)),
      "fc2": ((b + W, W), (W,)),
      "fc3": ((a + W, W), (W,)),
      "fc4": ((b + W, W), (W,)),
      "fc_out": ((4 * W, n), (n,)),
  }


NP_ACTIVATIONS = {
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2))),
    "relu": lambda x: np.maximum(x, 0),
    "mish": lambda x: x * np.tanh(np.log1p(np.exp(x))),
    "swish": lambda x: x / (1 + np.exp(-x)),
}


def reference_head(kind, p, x, act):
  dense = lambda name, v: v @ p[name]["kernel"] + p[name]["bias"]
  if kind == "linear":
    return dense("fc", x)
  outs = []
  if kind == "progressive_spinal":
    for i in range(1, 5):
      outs.append(act(dense(f"fc{i}", np.concatenate([x, *outs], -1) if outs else x)))
    return dense("fc_out", np.concatenate([x, *outs], -1))
  half = x.shape[-1] // 2
  parts = (x[:, :half], x[:, half:])
  for i in range(4):
    inputs = parts[i % 2] if i == 0 else np.concatenate([parts[i % 2], outs[-1]], -1)
    outs.append(act(dense(f"fc{i + 1}", inputs)))
  return dense("fc_out", np.concatenate(outs, -1))


@pytest.mark.parametrize("kind", ["spinal", "progressive_spinal"])
def test_spinal_heads_compute_the_formula_with_the_chosen_activation(kind):
  x = np.random.default_rng(0).normal(size=(3, 9)).astype(np.float32)
  outputs = {}
  for name, np_act in NP_ACTIVATIONS.items():
    head = models.build_head(kind, 5, width=4, dropout=0.5, activation=name)
    variables = random_variables(head, x, seed=1)
    got = np.asarray(head.apply(variables, x, train=False))  # eval: dropout off
    np.testing.assert_allclose(got, reference_head(kind, variables["params"], x, np_act),
                               rtol=1e-5, atol=1e-5, err_msg=name)
    outputs[name] = got
  # Same params (same init key), so the activation alone changes the logits.
  names = list(outputs)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not np.allclose(outputs[a], outputs[b], atol=1e-4), (a, b)


def test_linear_head_and_dropout_in_training():
  x = np.ones((4, 64), np.float32)
  head = models.build_head("progressive_spinal", 3, width=8, dropout=0.5)
  variables = random_variables(head, x)
  eval_out = head.apply(variables, x, train=False)
  train_out = head.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(eval_out, train_out)
  lin = models.build_head("linear", 3, dropout=0.0)
  v = random_variables(lin, x)
  np.testing.assert_allclose(lin.apply(v, x), x @ v["params"]["fc"]["kernel"] + v["params"]["fc"]["bias"],
                             rtol=1e-5)


def test_unknown_names_are_config_errors():
  with pytest.raises(ConfigError, match="model.activation"):
    models.build_head("spinal", 3, activation="tanh")
  with pytest.raises(ConfigError, match="model.backbone"):
    models.build_classifier(model_config(backbone="vgg16"), 3)
  with pytest.raises(ConfigError, match="model.head"):
    models.build_classifier(model_config(head="mlp"), 3)
  with pytest.raises(ConfigError, match="model.weights"):
    models.build_classifier(model_config(backbone="resnet18", weights="shipped"), 3)


# ----------------------------------------------------------------------------------------------
# Backbones


@pytest.mark.parametrize("name,features,classes,reference_count,tolerance", [
    # torchvision's exact counts (1000-way fc), the EfficientNet papers', and Zagoruyko &
    # Komodakis's CIFAR-10 counts (10-way fc), which they give rounded to 0.1M.
    ("resnet18", 512, 1000, 11_689_512, 0), ("resnet50", 2048, 1000, 25_557_032, 0),
    ("wrn101", 2048, 1000, 126_886_696, 0),
    ("efficientnet_b0", 1280, 1000, 5_288_548, 0), ("efficientnet_b7", 2560, 1000, 66_347_960, 0),
    ("efficientnet_lite0", 1280, 1000, 4_652_008, 0),
    ("wrn16_4", 256, 10, 2_700_000, 50_000), ("wrn28_10", 640, 10, 36_500_000, 50_000),
])
def test_feature_shapes_and_parameter_counts(name, features, classes, reference_count, tolerance):
  backbone = models.build_backbone(name)
  assert backbone.num_features == features
  x = jnp.zeros((2, 33, 33, 3))  # odd size: strides and 'SAME' padding round up
  out, variables = jax.eval_shape(functools.partial(backbone.init_with_output, train=False),
                                  jax.random.key(0), x)
  assert out.shape == (2, features)
  total = count(variables["params"]) + classes * (features + 1)
  assert abs(total - reference_count) <= tolerance


def test_wide_resnet_101_2_is_torchvision_layout():
  params = shapes_of(models.build_backbone("wrn101"), jnp.zeros((1, 64, 64, 3)))["params"]
  assert len([k for k in params if k.startswith("layer3_")]) == 23
  block = params["layer1_0"]
  assert block["conv1"]["kernel"].shape == (1, 1, 64, 128)  # width x2: 64 * 128 / 64
  assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert block["conv3"]["kernel"].shape == (1, 1, 128, 256)
  assert block["downsample_0"]["kernel"].shape == (1, 1, 64, 256)
  assert "downsample_0" not in params["layer1_1"]


def test_classifier_layout_dtype_and_features():
  cfg = model_config(backbone="wrn16_4", head="progressive_spinal", head_width=8, dtype="bfloat16")
  model = models.build_classifier(cfg, num_classes=7)
  x = jnp.zeros((2, 16, 16, 3))
  variables = shapes_of(model, x)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "head"}
  assert set(variables["batch_stats"]) == {"backbone"}
  # Computation in bfloat16, parameters and outputs in float32.
  assert {l.dtype for l in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  feats = jax.eval_shape(functools.partial(model.apply, train=False, method=model.features),
                         variables, x)
  assert feats.shape == (2, 256)
  assert variables["params"]["head"]["fc1"]["kernel"].shape == (256, 8)


def test_eval_uses_running_statistics_and_train_updates_them():
  model = models.build_classifier(model_config(backbone="wrn16_4", head="linear", dropout=0.0), 5)
  rng = np.random.default_rng(0)
  a, b, c = (rng.uniform(size=(1, 8, 8, 3)).astype(np.float32) for _ in range(3))
  variables = random_variables(model, jnp.asarray(np.concatenate([a, b])))

  @functools.partial(jax.jit, static_argnums=2)
  def run(variables, x, train):
    return model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)

  eval_ab = run(variables, np.concatenate([a, b]), False)
  eval_ac = run(variables, np.concatenate([a, c]), False)
  np.testing.assert_allclose(eval_ab[0], eval_ac[0], rtol=1e-5, atol=1e-5)
  (train_ab, stats_ab) = run(variables, np.concatenate([a, b]), True)
  (train_ac, _) = run(variables, np.concatenate([a, c]), True)
  assert not np.allclose(train_ab[0], train_ac[0], atol=1e-3)  # batch statistics differ
  old = variables["batch_stats"]["backbone"]["bn"]["mean"]
  new = stats_ab["batch_stats"]["backbone"]["bn"]["mean"]
  assert new.shape == old.shape and not np.allclose(new, old)
  assert np.all(np.isfinite(eval_ab)) and np.all(np.isfinite(train_ab))


def test_resolve_weights():
  assert models.resolve_weights("efficientnet_lite0", "") == "shipped"
  assert models.resolve_weights("efficientnet_lite0", "random") == ""
  assert models.resolve_weights("resnet18", "") == ""
  assert models.resolve_weights("wrn101", "/x/wrn.pth") == "/x/wrn.pth"


def test_mbconv_squeeze_excitation_and_drop_connect():
  from mdjax.models import efficientnet  # pylint: disable=import-outside-toplevel
  block = efficientnet.MBConv(3, 1, 6, 16, 16, se_ratio=0.25, drop_connect_rate=0.999, lite=False)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 16)).astype(np.float32))
  variables = random_variables(block, x)
  p = variables["params"]
  assert p["se_reduce"]["kernel"].shape == (1, 1, 96, 4)  # squeeze to int(16 * 0.25) channels
  assert p["se_expand"]["kernel"].shape == (1, 1, 4, 96)
  eval_out = block.apply(variables, x, train=False)
  assert eval_out.shape == x.shape and not np.allclose(eval_out, x)
  # In training the residual branch is dropped per sample (almost surely, at this rate).
  train_out, _ = block.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)},
                             mutable=["batch_stats"])
  np.testing.assert_allclose(train_out, x, atol=1e-6)
  lite = efficientnet.MBConv(3, 1, 6, 16, 16, se_ratio=0.0, drop_connect_rate=0.0, lite=True)
  assert "se_reduce" not in shapes_of(lite, x)["params"]
