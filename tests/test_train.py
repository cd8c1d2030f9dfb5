"""Classifier steps and the training loop: sharding invariance, SAM modes, exact resume, NaN
detection, exact evaluation counts. A tiny conv+BN model keeps these tests fast; what a real
backbone learns on real data is tested against scikit-learn in tests/test_learning.py."""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdjax import config as config_lib
from mdjax import optim
from mdjax.core import mesh as mesh_lib
from mdjax.data import sources
from mdjax.errors import NonFiniteLossError
from mdjax.train import classifier as clf
from mdjax.train import steps

NUM_CLASSES = 3
SIZE = 8


class _Backbone(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    # No conv bias before BatchNorm (as in real ResNets): its true gradient is 0, and Adam would
    # turn the float noise in it into +-lr steps that differ between device counts.
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x).mean((1, 2))


class _Head(nn.Module):
  dropout: float

  @nn.compact
  def __call__(self, f, train):
    f = nn.Dropout(self.dropout)(f, deterministic=not train)
    return nn.Dense(NUM_CLASSES)(f)


class TinyClassifier(nn.Module):
  """The params layout of mdjax.models ({"backbone", "head"}) at a test's size."""
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    return _Head(self.dropout, name="head")(_Backbone(name="backbone")(x, train), train)


def _config(**train):
  c = config_lib.base_config()
  c.data.image_size = SIZE
  c.data.num_threads = 0
  c.train.update(dict(optimizer="sam", base_optimizer="sgd", sam_perturbation="global",
                      schedule="constant", learning_rate=0.05, batch_size=16))
  c.train.update(train)
  return c


def _arrays(n=16, seed=0):
  rs = np.random.RandomState(seed)
  return rs.rand(n, SIZE, SIZE, 3).astype(np.float32), rs.randint(0, NUM_CLASSES, n).astype(np.int32)


def _mesh(n):
  return mesh_lib.data_mesh(jax.devices()[:n])


@functools.lru_cache(maxsize=None)
def _run(optimizer="sam", perturbation="global", lr=0.05, n_devices=4, n_steps=4, dropout=0.0,
         freeze=False, explicit_mesh=False):
  """Steps on one fixed batch; cached because compiling dominates these tests' time."""
  config = _config(optimizer=optimizer, base_optimizer="adam" if optimizer != "sgd" else "sgd",
                   sam_perturbation=perturbation, learning_rate=lr)
  config.model.freeze_backbone = freeze
  mesh = (jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
          if explicit_mesh else _mesh(n_devices))
  model = TinyClassifier(dropout=dropout)
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  state = steps.create_train_state(model, tx, jax.random.PRNGKey(0), (SIZE, SIZE, 3), mesh)
  train_step = steps.make_train_step(model, tx, config, mesh)
  x, y = _arrays()
  losses = []
  for _ in range(n_steps):
    state, metrics = train_step(state, {"image": x, "label": y})
    losses.append(float(metrics["loss"]))
  assert state.params["head"]["Dense_0"]["kernel"].sharding.is_fully_replicated
  return jax.device_get(state), losses


def _max_diff(a, b):
  return max(float(np.abs(np.asarray(u) - np.asarray(v)).max())
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_step_reduces_loss_and_keeps_state_replicated():
  state, losses = _run()
  assert losses[-1] < losses[0] - 0.01
  assert int(state.step) == 4


@pytest.mark.parametrize("optimizer", ["adam", "sam"])
def test_global_step_is_independent_of_device_count(optimizer):
  one, _ = _run(optimizer, n_devices=1)
  four, _ = _run(optimizer, n_devices=4)
  assert _max_diff(one.params, four.params) < 1e-5
  assert _max_diff(one.batch_stats, four.batch_stats) < 1e-5
  # The steps did move the parameters (the comparison above is not of two initial states).
  init, _ = _run(optimizer, n_devices=4, n_steps=0)
  assert _max_diff(init.params, one.params) > 1e-3


def test_per_device_sam_equals_global_on_one_device_and_differs_on_four():
  glob, _ = _run("sam", "global", n_devices=1)
  per1, _ = _run("sam", "per_device", n_devices=1)
  per4, _ = _run("sam", "per_device", n_devices=4)
  assert _max_diff(glob.params, per1.params) < 1e-5
  # m-sharpness: each device perturbs with its own quarter of the batch, by design not the same.
  assert _max_diff(glob.params, per4.params) > 1e-4


def test_per_device_sam_is_m_sharpness():
  """4 devices: each perturbs with the gradient of its own quarter batch (BatchNorm statistics of
  that quarter too), g' is averaged, plain SGD applies it. Checked against that sum written out."""
  rho, lr = 0.05, 0.1
  config = _config(optimizer="sam", base_optimizer="sgd", momentum=0.0, learning_rate=lr,
                   sam_rho=rho, sam_perturbation="per_device")
  mesh = _mesh(4)
  model = TinyClassifier()
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  state = steps.create_train_state(model, tx, jax.random.PRNGKey(0), (SIZE, SIZE, 3), mesh)
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  x, y = _arrays()
  new_state, _ = steps.make_train_step(model, tx, config, mesh)(state, {"image": x, "label": y})

  def local_loss(p, xk, yk):
    logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, xk, train=True,
                            mutable=["batch_stats"])
    return steps.cross_entropy(logits, yk)

  grad = jax.jit(jax.grad(local_loss))
  sam_grads = []
  for xk, yk in zip(np.split(x, 4), np.split(y, 4)):
    g = grad(params, xk, yk)
    norm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, v: w + rho * v / norm, params, g)
    sam_grads.append(grad(perturbed, xk, yk))
  expected = jax.tree.map(lambda w, *gs: w - lr * np.mean(gs, axis=0), params, *sam_grads)
  assert _max_diff(jax.device_get(new_state.params), expected) < 1e-5


def test_explicit_mesh_and_dropout():
  """jax.make_mesh builds Explicit axes (mesh_lib.data_mesh Auto ones); both give the same step,
  dropout included, and the dropout key changes with the step."""
  explicit, losses = _run("sgd", lr=0.0, dropout=0.5, explicit_mesh=True, n_steps=3)
  auto, _ = _run("sgd", lr=0.0, dropout=0.5, n_steps=3)
  assert _max_diff(explicit.batch_stats, auto.batch_stats) < 1e-5
  assert len(set(losses)) == 3  # lr 0: only the dropout mask changes the loss


def test_frozen_backbone_is_unchanged_by_steps():
  init, _ = _run("sam", freeze=True, n_steps=0)
  state, _ = _run("sam", freeze=True, n_steps=2)
  assert _max_diff(init.params["backbone"], state.params["backbone"]) == 0.0
  assert _max_diff(init.params["head"], state.params["head"]) > 1e-3


# ------------------------------------------------------------------------------------------------
# Evaluation


def _source(n, seed=0):
  rs = np.random.RandomState(seed)
  images = rs.randint(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)
  return sources.ArraySource(images, rs.randint(0, NUM_CLASSES, n).astype(np.int32))


def test_evaluate_counts_every_example_once_with_padded_last_batch():
  model = TinyClassifier()
  with jax.threefry_partitionable(False):  # see steps.INIT_THREEFRY_PARTITIONABLE (compile time)
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, SIZE, SIZE, 3)))
  src = _source(13)  # batch 8 on 4 devices: the second batch holds 5 real examples and 3 pads
  config = _config(batch_size=8)
  counts = clf.evaluate(model, variables, src, config, mesh_lib.data_mesh())
  images = np.stack([src[i]["image"] for i in range(13)]).astype(np.float32) / 255.0
  pred = np.asarray(jnp.argmax(model.apply(variables, images), -1))
  labels = src.labels
  expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(expected, (labels, pred), 1)
  np.testing.assert_array_equal(counts["confusion"], expected)
  np.testing.assert_array_equal(counts["total"], np.bincount(labels, minlength=NUM_CLASSES))
  np.testing.assert_array_equal(counts["correct"], np.diag(expected))
  assert counts["total"].sum() == 13
  assert counts["accuracy"] == pytest.approx(np.mean(pred == labels))


@pytest.mark.perf
def test_eval_step_keeps_counts_per_device_with_no_collective():
  # Each step adds to the counts it is given and sums nothing across devices, so successive steps
  # depend on each other and a multi-process run cannot get two evaluation steps' collectives out
  # of order (steps.make_eval_step, tests/test_multiprocess_pipeline.py).
  model = TinyClassifier()
  with jax.threefry_partitionable(False):
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, SIZE, SIZE, 3)))
  mesh = mesh_lib.data_mesh()
  n = mesh.size
  assert n == 4
  step = steps.make_eval_step(model, NUM_CLASSES, mesh)
  src = _source(8)
  images = np.stack([src[i]["image"] for i in range(8)]).astype(np.float32) / 255.0
  batch = {"image": images, "label": src.labels, "mask": np.ones(8, np.float32)}
  counts = steps.eval_counts_init(NUM_CLASSES, mesh)
  hlo = step.lower(variables, batch, counts).compile().as_text()
  assert "all-reduce" not in hlo and "all-gather" not in hlo
  counts = step(variables, batch, counts)
  counts = step(variables, batch, counts)  # the second pass adds to the first
  assert counts["confusion"].shape == (n, NUM_CLASSES, NUM_CLASSES)
  logits = np.asarray(model.apply(variables, images), np.float64)
  pred = logits.argmax(-1)
  per_device = np.zeros((n, NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(per_device, (np.arange(8) // (8 // n), src.labels, pred), 2)
  np.testing.assert_array_equal(np.asarray(counts["confusion"]), per_device)
  total = steps.eval_counts(counts)
  np.testing.assert_array_equal(total["confusion"], per_device.sum(0))
  np.testing.assert_array_equal(total["total"], 2 * np.bincount(src.labels, minlength=NUM_CLASSES))
  # Each class's mean cross-entropy, by hand: -log softmax(logits)[label], averaged per class.
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -log_p[np.arange(8), src.labels]
  for k in range(NUM_CLASSES):
    expected = ce[src.labels == k].mean() if np.any(src.labels == k) else np.nan
    np.testing.assert_allclose(total["class_loss"][k], expected, rtol=1e-5)


def test_class_wise_accuracy():
  cwa = clf.class_wise_accuracy({"correct": np.array([3, 0, 0]), "total": np.array([4, 2, 0])})
  np.testing.assert_allclose(cwa[:2], [0.75, 0.0])
  assert np.isnan(cwa[2])


# ------------------------------------------------------------------------------------------------
# The loop


class _Kill(Exception):
  pass


def _loop_config(**train):
  return _config(**dict(dict(batch_size=8, epochs=2, checkpoint_every=3, log_every=2,
                             base_optimizer="adam", learning_rate=0.01), **train))


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
  config = _loop_config()
  # No validation source: evaluation is tested on its own and in the digits test below, and each
  # train_classifier call compiles its steps afresh.
  train_src, val_src = _source(40), None  # 5 steps per epoch, 10 in all
  model = TinyClassifier(dropout=0.3)
  full = clf.train_classifier(config, train_src, val_src, str(tmp_path / "a"), NUM_CLASSES,
                              model=model)
  assert int(full.state.step) == 10
  assert full.history["epoch"] == [1, 2] and full.history["step"] == [5, 10]

  def kill(step, state):
    if step == 7:  # checkpoints exist at steps 3, 5 (epoch end) and 6: resumes from 6
      raise _Kill()

  with pytest.raises(_Kill):
    clf.train_classifier(config, train_src, val_src, str(tmp_path / "b"), NUM_CLASSES,
                         model=model, step_callback=kill)
  seen = []
  resumed = clf.train_classifier(config, train_src, val_src, str(tmp_path / "b"), NUM_CLASSES,
                                 model=model, step_callback=lambda s, _: seen.append(s))
  assert seen[0] == 7  # it did resume, from step 6
  assert _max_diff(full.variables, resumed.variables) < 1e-6
  np.testing.assert_allclose(full.history["train_loss"], resumed.history["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(full.history["train_accuracy"], resumed.history["train_accuracy"],
                             rtol=1e-5)
  assert os.listdir(tmp_path / "a" / "train" / "tensorboard")
  # A finished run returns at once from its last checkpoint.
  again = clf.train_classifier(config, train_src, val_src, str(tmp_path / "b"), NUM_CLASSES,
                               model=model, step_callback=lambda s, _: pytest.fail("trained again"))
  assert _max_diff(again.variables, resumed.variables) == 0.0


def test_non_finite_loss_raises_and_keeps_a_good_checkpoint(tmp_path):
  config = _loop_config(optimizer="sgd", learning_rate=1e30, checkpoint_every=1, log_every=1,
                        epochs=3)
  with pytest.raises(NonFiniteLossError, match=r"step \d+") as info:
    clf.train_classifier(config, _source(40), None, str(tmp_path), NUM_CLASSES,
                         model=TinyClassifier())
  assert "last good checkpoint" in str(info.value)
  import orbax.checkpoint as ocp
  ckpt_dir = tmp_path / "train" / "checkpoints"
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "history")) as manager:
    latest = manager.latest_step()
    assert latest is not None and f"step {latest}" in str(info.value)
    restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state))


