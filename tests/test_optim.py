"""SAM / ASAM against hand-computed numpy, and the optimizer factory's choices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mdjax import config as config_lib
from mdjax import optim
from mdjax.errors import ConfigError

# A quadratic L(w) = 0.5 w'Aw + b'w over two parameter leaves (the norm must be global).
A = np.array([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]])
B = np.array([0.2, -1.0, 0.5])


def _loss(params):
  w = jnp.concatenate([params["a"], params["b"]])
  return 0.5 * w @ jnp.asarray(A, jnp.float32) @ w + jnp.asarray(B, jnp.float32) @ w


def _params():
  return {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}


def _np_grad(w):
  return A @ w + B


def _sam_step(adaptive, rho=0.1, lr=0.3):
  tx = optim.sam(optax.sgd(lr), rho=rho, adaptive=adaptive)
  params = _params()
  g = jax.grad(_loss)(params)
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=jax.grad(_loss))
  return np.concatenate([np.asarray(updates["a"]), np.asarray(updates["b"])])


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_update_matches_formula(adaptive):
  rho, lr = 0.1, 0.3
  w = np.array([1.0, -2.0, 0.5])
  g = _np_grad(w)
  if adaptive:
    e = rho * w**2 * g / np.linalg.norm(w * g)
  else:
    e = rho * g / np.linalg.norm(g)
  expected = -lr * _np_grad(w + e)
  np.testing.assert_allclose(_sam_step(adaptive, rho, lr), expected, rtol=1e-5, atol=1e-6)
  # SAM is not the plain gradient step (the test would not notice a missing perturbation otherwise).
  assert np.abs(expected - (-lr * g)).max() > 1e-2


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_zero_gradient_stays_finite(adaptive):
  tx = optim.sam(optax.adam(1e-2), rho=0.05, adaptive=adaptive)
  params = {"w": jnp.zeros((3,)), "v": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  calls = []

  def grad_fn(p):
    calls.append(p)
    return jax.tree.map(jnp.zeros_like, p)

  updates, state = tx.update(zero, tx.init(params), params, grad_fn=grad_fn)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((updates, state)))
  # With no gradient there is no perturbation: g' is taken at w itself.
  np.testing.assert_array_equal(np.asarray(calls[0]["v"]), np.ones(2))


def test_sam_perturb_mask_leaves_frozen_leaves_alone():
  tx = optim.sam(optax.sgd(1.0), rho=0.5, perturb_mask={"a": False, "b": True})
  params = _params()
  seen = {}

  def grad_fn(p):
    seen.update(p)
    return jax.grad(_loss)(p)

  tx.update(jax.grad(_loss)(params), tx.init(params), params, grad_fn=grad_fn)
  np.testing.assert_array_equal(np.asarray(seen["a"]), np.asarray(params["a"]))
  g_b = float(jax.grad(_loss)(params)["b"][0])
  # The norm only counts unmasked leaves: b moves by exactly rho in the direction of its gradient.
  np.testing.assert_allclose(float(seen["b"][0]), 0.5 + 0.5 * np.sign(g_b), rtol=1e-6)


def test_sam_requires_grad_fn():
  tx = optim.sam(optax.sgd(1.0))
  params = _params()
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, tx.init(params), params)


# ------------------------------------------------------------------------------------------------
# make_optimizer / make_schedule


def _config(**train):
  c = config_lib.base_config()
  for k, v in train.items():
    c.train[k] = v
  return c


def _model_params():
  return {"backbone": {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros((4,))}},
          "head": {"dense": {"kernel": jnp.full((4, 3), 0.5), "bias": jnp.zeros((3,))}}}


def _one_step(config, params=None, spe=10):
  params = _model_params() if params is None else params
  tx = optim.make_optimizer(config, steps_per_epoch=spe)
  loss = lambda p: sum(jnp.sum(jnp.sin(x) + 0.1 * x**2) for x in jax.tree.leaves(p))
  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss))
  return params, grads, updates


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "sam"])
def test_make_optimizer_choices_descend(name):
  config = _config(optimizer=name, schedule="constant", learning_rate=0.01)
  params, grads, updates = _one_step(config)
  # Every optimizer moves against the gradient on this smooth loss.
  dot = sum(float(jnp.vdot(g, u)) for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates)))
  assert dot < 0


def test_sgd_is_torch_like():
  config = _config(optimizer="sgd", schedule="constant", learning_rate=0.1, momentum=0.9,
                   weight_decay=0.01)
  params, grads, updates = _one_step(config)
  k, g = params["head"]["dense"]["kernel"], grads["head"]["dense"]["kernel"]
  np.testing.assert_allclose(updates["head"]["dense"]["kernel"], -0.1 * (g + 0.01 * k), rtol=1e-6)
  # Biases are not decayed.
  np.testing.assert_allclose(updates["head"]["dense"]["bias"], -0.1 * grads["head"]["dense"]["bias"],
                             rtol=1e-6)


def test_schedules():
  spe = 10
  step = optim.make_schedule(_config(schedule="step", learning_rate=1.0, step_epochs=7, step_gamma=0.1), spe)
  assert float(step(0)) == pytest.approx(1.0)
  assert float(step(69)) == pytest.approx(1.0)
  assert float(step(70)) == pytest.approx(0.1)
  assert float(step(140)) == pytest.approx(0.01)
  cos = optim.make_schedule(_config(schedule="cosine", learning_rate=2.0, epochs=4), spe)
  assert float(cos(0)) == pytest.approx(2.0)
  assert float(cos(20)) == pytest.approx(1.0, rel=1e-5)
  assert float(cos(40)) == pytest.approx(0.0, abs=1e-6)
  warm = optim.make_schedule(_config(schedule="cosine", learning_rate=1.0, epochs=3, warmup_epochs=1.0), spe)
  assert float(warm(0)) == 0.0
  assert float(warm(5)) == pytest.approx(0.5)
  assert float(warm(10)) == pytest.approx(1.0)
  assert float(warm(20)) == pytest.approx(0.5, rel=1e-5)
  const = optim.make_schedule(_config(schedule="constant", learning_rate=0.3), spe, learning_rate=0.05)
  assert float(const(1000)) == pytest.approx(0.05)
  # `epochs` overrides the cosine length (fine-tuning).
  short = optim.make_schedule(_config(schedule="cosine", learning_rate=1.0, epochs=20), spe, epochs=2)
  assert float(short(20)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["adam", "sam"])
def test_frozen_backbone_gets_no_update(name):
  config = _config(optimizer=name, base_optimizer="adam", schedule="constant", learning_rate=0.1)
  config.model.freeze_backbone = True
  _, _, updates = _one_step(config)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["backbone"]))
  assert all(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(updates["head"]["dense"]["kernel"]))


def test_backbone_lr_mult_scales_backbone_updates():
  config = _config(optimizer="sgd", momentum=0.0, schedule="constant", learning_rate=0.1)
  _, _, full = _one_step(config)
  config.model.backbone_lr_mult = 0.25
  _, _, scaled = _one_step(config)
  for u, v in zip(jax.tree.leaves(full["backbone"]), jax.tree.leaves(scaled["backbone"])):
    np.testing.assert_allclose(v, 0.25 * u, rtol=1e-6)
  for u, v in zip(jax.tree.leaves(full["head"]), jax.tree.leaves(scaled["head"])):
    np.testing.assert_allclose(v, u, rtol=1e-6)


def test_freeze_without_backbone_subtree_is_a_config_error():
  config = _config(optimizer="adam")
  config.model.freeze_backbone = True
  with pytest.raises(ConfigError, match="backbone"):
    _one_step(config, params={"dense": {"kernel": jnp.ones((2, 2))}})
