"""Re-fitting the classifier's output layer on real images only, after the fine-tune (SYNAuG).

SYNAuG (Ye-Bin et al., arXiv 2308.00994) trains on real and generated images, then re-fits only
the last layer on class-balanced real images, to undo what the generated images' domain gap and
their shift of the class priors did to the decision boundaries. Here: the output layer's input
(`Classifier.penultimate`, eval mode) of every real training image is computed once, and the
output layer's weights and biases are fit to those features by class-balanced multinomial logistic
regression with an L2 penalty on the weights (not the biases), started from the fine-tuned layer.
Every example weighs n / (C n_y), so each class counts the same however many images it has.

The problem is convex and small (examples x (features + 1) x classes), so it is solved to
convergence by L-BFGS (optax.lbfgs) rather than by more epochs of SGD. The penalty is chosen on
the validation split from REFIT_L2 (the one whose re-fit layer scores the best validation
accuracy; ties to the stronger penalty), as scikit-learn's LogisticRegressionCV chooses C: no
strength tuned on one dataset is assumed for the others.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdjax.core import mesh as mesh_lib
from mdjax.core import process
from mdjax.data import pipeline
from mdjax.models import heads

# The L2 strengths tried (per example: the objective is the mean weighted cross-entropy plus
# l2 / 2 ||W||^2).
REFIT_L2 = (1e-4, 1e-3, 1e-2, 1e-1)
LBFGS_STEPS = 200


@dataclasses.dataclass
class Refit:
  """What `refit_last_layer` returns: the classifier's variables with the re-fit output layer,
  the penalty chosen, and each penalty's validation accuracy."""
  variables: dict
  l2: float
  val_accuracy: dict[float, float]

  def record(self) -> dict:
    return {"l2": self.l2, "val_accuracy": {str(k): v for k, v in self.val_accuracy.items()}}


def class_balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """n / (C n_y) per example: every class's weights sum to n / C."""
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  return (len(labels) / (num_classes * counts[labels])).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_logistic(features: jax.Array, labels: jax.Array, weights: jax.Array, kernel: jax.Array,
                 bias: jax.Array, l2: jax.Array, steps: int = LBFGS_STEPS):
  """Minimises sum_i w_i CE(features_i kernel + bias, labels_i) / sum_i w_i + l2/2 ||kernel||^2
  by L-BFGS from (kernel, bias); returns the fit (kernel, bias)."""
  def objective(p):
    logits = features @ p["kernel"] + p["bias"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(p["kernel"] ** 2)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)
  params = {"kernel": kernel, "bias": bias}

  def body(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(body, (params, solver.init(params)), None, length=steps)
  return params["kernel"], params["bias"]


def penultimate_features(model: nn.Module, variables: dict, source, config) -> np.ndarray:
  """The output layer's input [N, D] for every image of `source` (its evaluation view, eval
  mode). Every process computes all of them (the re-fit is the same in each)."""
  fn = jax.jit(lambda images: model.apply(variables, images, method=model.penultimate))
  size, augment = int(config.data.image_size), str(config.data.augment)
  images = np.stack([pipeline.eval_image(source[i]["image"], size, augment)
                     for i in range(len(source))])
  return pipeline.apply_in_batches(fn, images, batch_size=256)


def refit_last_layer(model: nn.Module, variables: dict, train_source, val_source, config,
                     num_classes: int) -> Refit:
  """The classifier with its output layer re-fit on `train_source` (real images only), the L2
  penalty chosen on `val_source` (module docstring)."""
  layer = heads.OUTPUT_LAYERS[str(config.model.head)]
  params = variables["params"]
  kernel, bias = params["head"][layer]["kernel"], params["head"][layer]["bias"]
  train_x = jnp.asarray(penultimate_features(model, variables, train_source, config))
  val_x = penultimate_features(model, variables, val_source, config)
  labels = np.asarray(train_source.labels)
  weights = jnp.asarray(class_balanced_weights(labels, num_classes))
  fits, scores = {}, {}
  for l2 in REFIT_L2:
    fits[l2] = fit_logistic(train_x, jnp.asarray(labels), weights, kernel, bias, jnp.float32(l2))
    predicted = np.argmax(val_x @ np.asarray(fits[l2][0]) + np.asarray(fits[l2][1]), -1)
    scores[l2] = float(np.mean(predicted == np.asarray(val_source.labels)))
  best = max(REFIT_L2, key=lambda l2: (scores[l2], l2))
  head = dict(params["head"])
  head[layer] = {"kernel": np.asarray(fits[best][0]), "bias": np.asarray(fits[best][1])}
  new = dict(variables, params=dict(params, head=head))
  # Every process fit the same layer from the same features: placed as the run's other variables.
  new = process.put_global(jax.device_get(new), mesh_lib.replicated(mesh_lib.data_mesh()))
  return Refit(new, best, scores)
