"""Sample quality of the per-class GANs, measured with the classifier the samples are meant for.

Three numbers per weak class:

* `target_class_fraction`: the fraction of a class's generated images that the classifier assigns
  to that class. It answers the question the method cares about (do the samples carry the class's
  label information?) and needs nothing beyond the classifier itself.
* `frechet_distance` between real and generated images in a feature space given as a function.
  The pipeline passes the classifier's own pooled backbone features: Inception weights cannot be
  downloaded here, so this is a "classifier-FID", comparable between runs of the same classifier
  and not with published FID figures.

* `diversity_ratio`: how spread out a class's generated images are against its real ones, the mean
  pairwise distance of the generated set over that of the real set in a feature space. Near 1 the
  GAN covers the class about as widely as the data; near 0 it draws (nearly) one image again and
  again. Mode collapse passes both numbers above (every copy of one good image is "the class"),
  which is why it is measured on its own. The pipeline uses the independent judge's feature space.

Statistics are computed on the host in float64 with numpy / `scipy.linalg.sqrtm`: the matrix square
root has no JAX implementation on CPU, and float32 loses the small differences the distance is made
of for feature dimensions in the thousands.

Small sample counts: a weak class has tens to hundreds of images, often fewer than the feature
dimension F, so both covariances are rank-deficient (rank <= n - 1). `sqrtm` of a product of
singular matrices is ill-conditioned and can return complex or non-finite values. We add `eps * I`
to both covariances (the pytorch-fid remedy, applied always rather than on failure so results do
not jump between two regimes), take the real part and clip tiny negative traces. With n < F the
estimate is biased upwards (the well-known FID sample-size bias): compare classes at equal n.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.linalg
import scipy.spatial

from mdjax.data.pipeline import ImageFn, apply_in_batches
from mdjax.errors import DataError


def target_class_fraction(classify_fn: ImageFn, images_by_class: Mapping[int, np.ndarray], *,
                          batch_size: int = 256) -> dict[int, float]:
  """For each class k: the fraction of `images_by_class[k]` the classifier labels k.

  Args:
    classify_fn: images float32 [B, H, W, 3] in [0, 1] -> logits [B, num_classes].
    images_by_class: {class index: generated images, uint8 or float in [0, 1], NHWC}.
    batch_size: images per call of `classify_fn`.
  """
  fractions = {}
  for k, images in images_by_class.items():
    if len(images) == 0:
      raise DataError(f"class {k} has no images to score.")
    logits = apply_in_batches(classify_fn, images, batch_size=batch_size)
    fractions[int(k)] = float(np.mean(np.argmax(logits, axis=-1) == int(k)))
  return fractions


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [F] and covariance [F, F] (unbiased, float64) of features [N, F]."""
  features = np.asarray(features, np.float64).reshape(len(features), -1)
  if len(features) < 2:
    raise DataError(f"a Frechet distance needs at least 2 samples per set, got {len(features)}.")
  return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def frechet_distance(real_features: np.ndarray, generated_features: np.ndarray, *,
                     eps: float = 1e-6) -> float:
  """||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) of two feature sets [N, F].

  `eps * I` is added to both covariances (see the module docstring: rank-deficient covariances
  when N <= F).
  """
  mu1, s1 = feature_statistics(real_features)
  mu2, s2 = feature_statistics(generated_features)
  if mu1.shape != mu2.shape:
    raise DataError(f"feature dimensions differ: {mu1.shape[0]} (real) vs {mu2.shape[0]} (generated).")
  offset = eps * np.eye(len(mu1))
  s1, s2 = s1 + offset, s2 + offset
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.all(np.isfinite(covmean)):
    raise FloatingPointError("sqrtm of the covariance product is not finite; increase eps.")
  covmean = np.real(covmean)
  diff = mu1 - mu2
  value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
  # Round-off can leave a tiny negative value for (nearly) identical sets.
  return float(max(value, 0.0))


def class_frechet_distances(feature_fn: ImageFn, real_by_class: Mapping[int, np.ndarray],
                            generated_by_class: Mapping[int, np.ndarray], *, batch_size: int = 256,
                            eps: float = 1e-6) -> dict[int, float]:
  """Per-class Frechet distance between real and generated images in `feature_fn`'s space.

  Args:
    feature_fn: images float32 [B, H, W, 3] in [0, 1] -> features [B, F] (e.g. the classifier's
      pooled backbone features).
    real_by_class / generated_by_class: {class index: images, uint8 or float [0, 1], NHWC}; the
      distance is computed for the classes present in both.
  """
  distances = {}
  for k in sorted(set(real_by_class) & set(generated_by_class)):
    real = apply_in_batches(feature_fn, real_by_class[k], batch_size=batch_size)
    fake = apply_in_batches(feature_fn, generated_by_class[k], batch_size=batch_size)
    distances[int(k)] = frechet_distance(real, fake, eps=eps)
  return distances


def mean_pairwise_distance(features: np.ndarray, *, max_samples: int = 512, seed: int = 0) -> float:
  """The mean Euclidean distance over all pairs of distinct rows of `features` [N, ...].

  At most `max_samples` rows (a fixed random subset) are used: there are max_samples^2 / 2 pairs.
  """
  x = np.asarray(features, np.float64).reshape(len(features), -1)
  if len(x) < 2:
    raise DataError(f"a pairwise distance needs at least 2 samples, got {len(x)}.")
  if len(x) > max_samples:
    x = x[np.random.default_rng(seed).choice(len(x), max_samples, replace=False)]
  return float(scipy.spatial.distance.pdist(x).mean())


def diversity_ratio(real_features: np.ndarray, generated_features: np.ndarray, *,
                    max_samples: int = 512) -> float:
  """mean_pairwise_distance(generated) / mean_pairwise_distance(real) (see the module docstring).

  NaN when the real images are all identical (no spread to compare with).
  """
  real = mean_pairwise_distance(real_features, max_samples=max_samples)
  generated = mean_pairwise_distance(generated_features, max_samples=max_samples)
  return generated / real if real > 0 else float("nan")


def nearest_distances(queries: np.ndarray, references: np.ndarray, *,
                      exclude_self: bool = False) -> np.ndarray:
  """Euclidean distance from each row of `queries` [Q, F] to its nearest row of `references`
  [R, F]; with `exclude_self` (queries == references) a row's distance to itself is skipped."""
  q = np.asarray(queries, np.float64).reshape(len(queries), -1)
  r = np.asarray(references, np.float64).reshape(len(references), -1)
  d = scipy.spatial.distance.cdist(q, r)
  if exclude_self:
    np.fill_diagonal(d, np.inf)
  return d.min(axis=1)


def memorisation(real_features: np.ndarray, generated_features: np.ndarray, *,
                 percentile: float = 5.0, max_real: int = 2048, seed: int = 0) -> float:
  """The share of generated images closer to a real training image than the `percentile`-th
  percentile of the real images' own nearest-neighbour distances (module docstring).

  At most `max_real` real images (a fixed random subset) are compared: the distances are a
  [generated, real] matrix.
  """
  real = np.asarray(real_features, np.float64).reshape(len(real_features), -1)
  if len(real) < 2:
    raise DataError(f"a memorisation measure needs at least 2 real images, got {len(real)}.")
  if len(real) > max_real:
    real = real[np.random.default_rng(seed).choice(len(real), max_real, replace=False)]
  threshold = np.percentile(nearest_distances(real, real, exclude_self=True), percentile)
  return float(np.mean(nearest_distances(generated_features, real) < threshold))
