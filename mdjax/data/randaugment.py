"""RandAugment (Cubuk et al., 2019, "RandAugment: Practical automated data augmentation with a
reduced search space"), per example in the grain pipeline, on uint8 images through PIL.

The policy has two numbers: N ops drawn uniformly with replacement from the paper's 14, each
applied at the one shared magnitude M. The ops and their ranges at full strength are AutoAugment's
(Cubuk et al., CVPR 2019): rotate +-30 degrees, shear +-0.3, translate +-150/331 of the side,
colour / contrast / brightness / sharpness factors 1 +- 0.9, posterize down to 4 bits, solarize
from threshold 256 (no change) down to 0. M runs over the 0-30 scale of the RandAugment paper's
experiments (its ImageNet ResNet-50 used N = 2, M = 9), with M = 30 the full range above and
strength linear in M. Signed ops take either sign with probability 1/2 (as AutoAugment
draws them). Every selected op is applied, as in the paper's pseudo-code; identity is one of the
14, so some draws leave an image unchanged.

Randomness comes only from the generator grain's `random_map` passes (seeded by the run's seed, the
epoch and the example's position: see mdjax.data.pipeline), so the same seed gives the same images
on any machine. Geometric ops fill what they uncover with grey (128), as AutoAugment's code does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 30
_GREY = (128, 128, 128)


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, coeffs) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR,
                       fillcolor=_GREY)


def _enhance(enhancer):
  return lambda img, m, rng: enhancer(img).enhance(1.0 + _signed(0.9 * m, rng))


# Each op: (PIL image, strength m in [0, 1], generator) -> PIL image.
OPS = {
    "identity": lambda img, m, rng: img,
    "auto_contrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "equalize": lambda img, m, rng: ImageOps.equalize(img),
    "rotate": lambda img, m, rng: img.rotate(_signed(30.0 * m, rng), Image.Resampling.BILINEAR,
                                             fillcolor=_GREY),
    "solarize": lambda img, m, rng: ImageOps.solarize(img, int(round(256 * (1 - m)))),
    "color": _enhance(ImageEnhance.Color),
    "posterize": lambda img, m, rng: ImageOps.posterize(img, 8 - int(round(4 * m))),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda img, m, rng: _affine(img, (1, _signed(0.3 * m, rng), 0, 0, 1, 0)),
    "shear_y": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(0.3 * m, rng), 1, 0)),
    "translate_x": lambda img, m, rng: _affine(
        img, (1, 0, _signed(150 / 331 * m * img.size[0], rng), 0, 1, 0)),
    "translate_y": lambda img, m, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(150 / 331 * m * img.size[1], rng))),
}
_NAMES = tuple(OPS)


def randaugment(image: np.ndarray, rng: np.random.Generator, layers: int, magnitude: float
                ) -> np.ndarray:
  """`layers` ops drawn from OPS, each at `magnitude` (0-30), applied to uint8 [H, W, 3]."""
  if layers <= 0:
    return image
  strength = min(max(float(magnitude), 0.0), MAX_MAGNITUDE) / MAX_MAGNITUDE
  img = Image.fromarray(np.ascontiguousarray(image))
  for op in rng.integers(0, len(_NAMES), size=layers):
    img = OPS[_NAMES[op]](img, strength, rng)
  return np.asarray(img, dtype=np.uint8)
