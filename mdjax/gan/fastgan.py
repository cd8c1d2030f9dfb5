"""FastGAN (Liu et al., ICLR 2021) in flax.linen, NHWC, for 32 to 1024 pixels.

256, 512 and 1024 follow the official PyTorch code (github.com/odegeasslbc/FastGAN-pytorch,
`models.py`) layer for layer:

Generator: z -> 4x4 (transposed conv, BN, GLU) -> UpBlockComp 8, UpBlock 16, Comp 32, Up 64,
Comp 128, Up 256, Comp 512, Up 1024, stopping at the resolution R. Skip-layer excitation (SLE)
multiplies feat_64 by SLE(feat_4), feat_128 by SLE(feat_8), feat_256 by SLE(feat_16) and
feat_512 by SLE(feat_32). Two outputs: the R x R image (conv3x3) and a small image (conv1x1);
both go through tanh (the reference omits tanh at 256/512, an accident we do not copy: samples
must lie in [-1, 1]).

Discriminator: a big branch of DownBlockComps down to 8x8 with SLE inside D (the 8x8, 16x16 and
32x32 maps are excited by the maps 8 times larger), a 5x5 logit map from it; a small branch on a
small copy of the input (128x128 at R >= 256) with its own 5x5 logits; the two concatenated,
[B, 50]. On real images three small decoders reconstruct the image from the 8x8 big-branch
features, the small copy from the small-branch features, and one random quadrant from the 16x16
big-branch features (self-supervision keeps D's features informative on tiny datasets).

Spectral normalisation wraps every convolution, as in the reference (G included). We use
`flax.linen.SpectralNorm`: its power-iteration vector `u` lives in the `batch_stats` collection,
so it is updated exactly when BatchNorm statistics are (`train=True`, `mutable=["batch_stats"]`),
and a train step threads one collection instead of two. Init: conv kernels N(0, 0.02), BN scale
N(1, 0.02), BN bias 0 (the reference `weights_init`). BN momentum 0.9 = PyTorch's 0.1.

Small resolutions (32, 64, 128; the reference code crashes below 256) are our design, chosen so
that every FastGAN mechanism survives at a size where it still makes sense:

* Generator: the same 4x4 start and the same up-block sequence, simply stopped at R (32: three
  up-blocks), so the channel table ngf x {4:16, 8:8, ...} is unchanged. The SLE pairs of the
  reference that exist at R are kept (64 <- 4 at R >= 64, 128 <- 8 at R >= 128). At R = 32 no
  reference pair exists, so we excite the output map by the 4x4 map (32 <- 4) to keep the
  global "style" path that SLE gives.
* The small image is min(128, R / 2) pixels (at 256+ the reference's 128), produced by a
  conv1x1 from the generator map of that size, so D's two-scale view exists at every R.
* Discriminator: it always ends at 8x8, so the 5x5 logit maps, the 8x8 decoder inputs and the
  16x16 quadrant source are the same at every R. At R <= 256 the stem is a stride-1 conv3x3 (the
  reference's 256 stem), followed by log2(R / 8) DownBlockComps (32: two, 64: three, 128: four).
  Channels follow the reference table by spatial size. SLE pairs (s <- 8s) that exist are kept;
  at 32 none does, so the 8x8 map is excited by the 32x32 stem output (ratio 4).
* The small branch sees the min(128, R / 2) copy: a stride-2 conv, then DownBlocks until 8x8.
* Reconstruction targets are taken at their native size capped at 128 (whole image:
  min(128, R); small copy and quadrant: min(128, R / 2)), and each decoder has as many up-blocks
  as it needs from 8x8 (the reference's four at 128). Real images are downscaled with a box
  filter (the reference uses nearest-neighbour interpolation, which aliases).

The decoders' base width is ndf / 2 (the reference hard-codes 32 = 64 / 2), so tiny test models
stay tiny.

Class conditioning (`num_classes > 0`; mdjax.gan.conditional, one GAN for all weak classes): ours,
not the reference's, which is unconditional. With `num_classes = 0` (the per-class ensemble) the
modules and their parameter trees are exactly the unconditional ones.

* Generator: a learned label embedding [num_classes, nz], N(0, 1) like z, is concatenated with z
  before the 4x4 transposed convolution. Concatenation, not z * embedding: a product scales the
  label signal with |z| and lets it vanish where z is small, while a concatenated label reaches
  every 4x4 feature through its own kernel weights whatever z is; the cost is nz more input
  channels in one layer. The label enters once, at the start: SLE then carries the 4x4 map (and so
  the class) to the larger maps as it carries the style of an unconditional FastGAN.
* Discriminator: a projection discriminator (Miyato & Koyama, ICLR 2018): the inner product of a
  class embedding [num_classes, C] with the big branch's 8x8 features averaged over space (C
  channels) is added to every one of the 50 patch logits. Chosen over an auxiliary classifier
  head (AC-GAN) because the class then enters D's one hinge loss and no second loss has to be
  weighed against it (AC-GAN's classification term also rewards easily classified samples, which
  costs diversity, Miyato & Koyama's comparison), and over concatenating the label to D's input
  because that puts a label map through every convolution. The class embedding starts at
  N(0, 0.1), about Glorot's scale for a [K, C] table (sqrt(2 / (K + C)) = 0.12 for 5 classes and
  C = 128), so D tells the labels apart from its first steps. At the conv init's N(0, 0.02) it
  could not at mdjax's budgets: Adam at lr 2e-4 moves each entry by at most ~2e-4 per step, and
  after the default digits run's 200 steps the table still had std 0.021, D was in effect
  unconditional, and G drew the wrong digit for some labels (seed 0: 3s for class 5 and 5s for
  class 3; the judge recognised 5% and 12% of them). At N(0, 0.1) the same run's classes were
  recognised 97-100%. The table is not spectrally normalised (the hinge loss stops rewarding D
  once a margin is met, which bounds it).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax


RESOLUTIONS = (32, 64, 128, 256, 512, 1024)

# Channel multipliers per spatial size, from the reference code.
G_MULT = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
D_MULT = {4: 16, 8: 16, 16: 8, 32: 4, 64: 2, 128: 1, 256: 0.5, 512: 0.25, 1024: 0.125}
DECODER_MULT = (4, 2, 2, 1)  # 16, 32, 64, 128 of the reference SimpleDecoder
# The projection discriminator's class embedding starts at N(0, CLASS_EMBEDDING_STD) (module
# docstring: why not the conv init's 0.02).
CLASS_EMBEDDING_STD = 0.1

_conv_init = nn.initializers.normal(0.02)


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def small_size(resolution: int) -> int:
  """Side of the second image G makes and D's small branch reads."""
  return min(128, resolution // 2)


def recon_sizes(resolution: int) -> tuple[int, int, int]:
  """Sides of the (whole image, small copy, quadrant) reconstruction targets."""
  s = small_size(resolution)
  return min(128, resolution), s, s


def channels(mult: dict, width: int, size: int) -> int:
  return max(1, int(mult[size] * width))


def downscale(x: jax.Array, size: int) -> jax.Array:
  """Box-filter downscale of NHWC images by an integer factor."""
  b, h, w, c = x.shape
  if h == size and w == size:
    return x
  fh, fw = h // size, w // size
  if fh * size != h or fw * size != w:
    raise ValueError(f"cannot box-downscale {h}x{w} to {size}x{size}")
  return x.reshape(b, size, fh, size, fw, c).mean(axis=(2, 4))


def glu(x: jax.Array) -> jax.Array:
  a, b = jnp.split(x, 2, axis=-1)
  return a * jax.nn.sigmoid(b)


def upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 (broadcast + reshape: cheaper in XLA than jax.image.resize)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def avg_pool_to(x: jax.Array, size: int) -> jax.Array:
  """Adaptive average pooling to size x size where the side is a multiple of it."""
  return downscale(x, size)


def upsample_conv3x3(lhs, rhs, window_strides=(1, 1), padding=((1, 1), (1, 1)), *, conv=None,
                     **kwargs):
  """conv3x3(upsample2(lhs), rhs) with padding 1, computed at lhs's resolution: 2.25x fewer FLOPs.

  Why: every up-block of G and of D's decoders is nearest x2 upsampling then a 3x3 conv, and at
  256x256 these convolutions (with their gradients) are most of a FastGAN step. Output pixel
  (2i + a, 2j + b) of that conv sees only 2 x 2 distinct input pixels, so each of the four output
  phases (a, b) is a 2x2 convolution of the low-resolution input with a kernel made of sums of
  the 3x3 taps (rows: phase 0 = [w0, w1 + w2] over rows i-1, i; phase 1 = [w0 + w1, w2] over rows
  i, i+1; columns alike): 4 x 4 instead of 9 x 4 multiply-adds per input pixel, exactly the same
  function (float rounding aside; tests/test_fastgan.py checks it against the naive form). The four
  phases are one 2x2 conv with 4 x O outputs over the input padded by 1, sliced and interleaved.
  This is the signature of `lax.conv_general_dilated`, so it plugs into `nn.Conv` (and so into
  `nn.SpectralNorm`) unchanged: same kernel, same parameter tree. `conv` is the convolution the
  phases run (mdjax.core.cpu_conv.Rules on CPUs; None: lax's).
  """
  del kwargs  # dimension numbers etc.: NHWC / HWIO, as nn.Conv passes them
  if tuple(window_strides) != (1, 1) or tuple(map(tuple, padding)) != ((1, 1), (1, 1)):
    raise ValueError("upsample_conv3x3 is a stride-1, padding-1 3x3 convolution")
  if rhs.shape[:2] != (3, 3):
    raise ValueError(f"upsample_conv3x3 needs a 3x3 kernel, got {rhs.shape}")
  b, h, w, _ = lhs.shape
  o = rhs.shape[-1]

  def phases(k, axis):  # [3, ...] taps along `axis` -> the two phases' [2, ...] taps
    t0, t1, t2 = (jnp.take(k, i, axis=axis) for i in range(3))
    return (jnp.stack([t0, t1 + t2], axis=axis), jnp.stack([t0 + t1, t2], axis=axis))

  kernels = [[kc for kc in phases(kr, 1)] for kr in phases(rhs, 0)]  # [a][b] -> [2, 2, C, O]
  kernel = jnp.stack([jnp.stack(row, axis=-2) for row in kernels], axis=-3)  # [2, 2, C, 2, 2, O]
  kernel = kernel.reshape(2, 2, rhs.shape[2], 4 * o)
  conv = conv or lax.conv_general_dilated
  y = conv(lhs, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y.reshape(b, h + 1, w + 1, 2, 2, o)
  rows = [jnp.stack([y[:, a:a + h, c:c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o)  # [B, H, a, W, b, O] interleaved


class SNConv(nn.Module):
  """A spectrally normalised, bias-free convolution with PyTorch-style explicit padding.

  With `upsample=True` (3x3, padding 1 only) it convolves the x2 nearest upsampling of its input,
  through `upsample_conv3x3`.
  """

  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  upsample: bool = False
  dtype: Any = jnp.float32
  conv: Any = None  # the convolution (mdjax.core.cpu_conv.Rules on CPUs); None: XLA's

  @nn.compact
  def __call__(self, x, train: bool):
    impl = functools.partial(upsample_conv3x3, conv=self.conv) if self.upsample else self.conv
    conv = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                   padding=[(self.padding, self.padding)] * 2, use_bias=False,
                   kernel_init=_conv_init, name="conv", dtype=self.dtype,
                   conv_general_dilated=impl)
    return nn.SpectralNorm(conv, name="sn")(x, update_stats=train)  # normalises in float32


class BN(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    # Statistics in float32 whatever the compute dtype (flax's force_float32_reductions).
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        scale_init=_bn_scale_init, name="bn", dtype=self.dtype)(x)


class NoiseInjection(nn.Module):
  """feat + w * N(0, 1) of shape [B, H, W, 1]; w is one scalar initialised to 0.

  The noise comes from the "noise" rng stream, so a step is a pure function of its key.
  """

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.zeros, ())
    noise = jax.random.normal(self.make_rng("noise"), x.shape[:-1] + (1,), x.dtype)
    return x + w.astype(x.dtype) * noise


class SLE(nn.Module):
  """Skip-layer excitation: big * sigmoid(conv1x1(swish(conv4x4_valid(avgpool4(small)))))."""

  features: int
  dtype: Any = jnp.float32
  conv: Any = None

  @nn.compact
  def __call__(self, small, big, train: bool):
    s = avg_pool_to(small, 4)
    s = SNConv(self.features, 4, name="conv4", dtype=self.dtype, conv=self.conv)(s, train)
    s = nn.swish(s)
    s = SNConv(self.features, 1, name="conv1", dtype=self.dtype, conv=self.conv)(s, train)
    return big * jax.nn.sigmoid(s)


class UpBlock(nn.Module):
  features: int
  dtype: Any = jnp.float32
  conv: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    # upsample2, conv3x3
    x = SNConv(2 * self.features, 3, padding=1, upsample=True, dtype=self.dtype,
               conv=self.conv)(x, train)
    return glu(BN(dtype=self.dtype)(x, train))


class UpBlockComp(nn.Module):
  features: int
  dtype: Any = jnp.float32
  conv: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    # upsample2, conv3x3
    x = SNConv(2 * self.features, 3, padding=1, upsample=True, dtype=self.dtype,
               conv=self.conv)(x, train)
    x = glu(BN(dtype=self.dtype)(NoiseInjection()(x), train))
    x = SNConv(2 * self.features, 3, padding=1, dtype=self.dtype, conv=self.conv)(x, train)
    return glu(BN(dtype=self.dtype)(NoiseInjection()(x), train))


def generator_sle_pairs(resolution: int) -> tuple[tuple[int, int], ...]:
  """(target size, source size) pairs of the generator's skip-layer excitations."""
  if resolution == 32:
    return ((32, 4),)
  return tuple((s, s // 16) for s in (64, 128, 256, 512) if s <= resolution)


def discriminator_sle_pairs(resolution: int) -> tuple[tuple[int, int], ...]:
  """(target size, source size) pairs of the discriminator's skip-layer excitations."""
  if resolution == 32:
    return ((8, 32),)
  top = min(resolution, 256)
  return tuple((s, 8 * s) for s in (8, 16, 32) if 8 * s <= top)


class Generator(nn.Module):
  """z [B, nz] -> (image [B, R, R, 3], small image [B, r, r, 3]), both in [-1, 1].

  Attributes:
    resolution: R, one of RESOLUTIONS.
    ngf: base width; the map of side s has ngf * G_MULT[s] channels.
    num_classes: > 0 for a class-conditional G: `labels` int [B] in [0, num_classes) are then
      required, and their embedding is concatenated with z (module docstring).
  """

  resolution: int
  ngf: int = 64
  num_classes: int = 0
  dtype: Any = jnp.float32  # of the computation; parameters and statistics stay float32
  conv: Any = None  # the convolution (mdjax.core.cpu_conv.Rules on CPUs); None: XLA's

  @nn.compact
  def __call__(self, z, train: bool = True, labels=None):
    dt = self.dtype
    ch = functools.partial(channels, G_MULT, self.ngf)
    if self.num_classes:
      table = self.param("label_embedding", nn.initializers.normal(1.0),
                         (self.num_classes, z.shape[-1]))
      z = jnp.concatenate([z, table[_labels(labels, z.shape[0])]], axis=-1)
    x = z.reshape(z.shape[0], 1, 1, -1)
    init = nn.ConvTranspose(2 * ch(4), (4, 4), padding="VALID", use_bias=False,
                            kernel_init=_conv_init, name="init", dtype=dt)
    x = nn.SpectralNorm(init, name="init_sn")(x, update_stats=train)
    x = glu(BN(name="init_bn", dtype=dt)(x, train))
    feats = {4: x}
    sle = dict(generator_sle_pairs(self.resolution))
    size = 4
    while size < self.resolution:
      size *= 2
      comp = int(math.log2(size)) % 2 == 1  # Comp at 8, 32, 128, 512 as the reference
      block = UpBlockComp if comp else UpBlock
      x = block(ch(size), name=f"feat_{size}", dtype=dt, conv=self.conv)(x, train)
      if size in sle:
        x = SLE(ch(size), name=f"se_{size}", dtype=dt, conv=self.conv)(feats[sle[size]], x, train)
      feats[size] = x
    small = small_size(self.resolution)
    img = SNConv(3, 3, padding=1, name="to_big", dtype=dt, conv=self.conv)(x, train)
    img_small = SNConv(3, 1, name="to_small", dtype=dt, conv=self.conv)(feats[small], train)
    # Images leave G in float32: the losses, DiffAugment and the EMA samples read them.
    return (jnp.tanh(img).astype(jnp.float32), jnp.tanh(img_small).astype(jnp.float32))


class DownBlock(nn.Module):
  features: int
  dtype: Any = jnp.float32
  conv: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = SNConv(self.features, 4, stride=2, padding=1, dtype=self.dtype, conv=self.conv)(x, train)
    return nn.leaky_relu(BN(dtype=self.dtype)(x, train), 0.2)


class DownBlockComp(nn.Module):
  features: int
  dtype: Any = jnp.float32
  conv: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    dt = self.dtype
    conv = functools.partial(SNConv, dtype=dt, conv=self.conv)
    m = conv(self.features, 4, stride=2, padding=1, name="main1")(x, train)
    m = nn.leaky_relu(BN(name="main1_bn", dtype=dt)(m, train), 0.2)
    m = conv(self.features, 3, padding=1, name="main2")(m, train)
    m = nn.leaky_relu(BN(name="main2_bn", dtype=dt)(m, train), 0.2)
    d = conv(self.features, 1, name="direct")(downscale(x, x.shape[1] // 2), train)
    d = nn.leaky_relu(BN(name="direct_bn", dtype=dt)(d, train), 0.2)
    return (m + d) / 2


class SimpleDecoder(nn.Module):
  """8x8 features -> an out_size x out_size image in [-1, 1] (nearest-up, conv, BN, GLU)."""

  out_size: int
  base: int
  dtype: Any = jnp.float32
  conv: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    if x.shape[1] != 8:
      raise ValueError(f"decoder input must be 8x8, got {x.shape}")
    n = int(math.log2(self.out_size // 8))
    for i in range(n):
      x = UpBlock(max(1, DECODER_MULT[i] * self.base), name=f"up_{i}", dtype=self.dtype,
                  conv=self.conv)(x, train)
    x = SNConv(3, 3, padding=1, name="to_rgb", dtype=self.dtype, conv=self.conv)(x, train)
    return jnp.tanh(x).astype(jnp.float32)  # reconstructions: losses in float32


class Discriminator(nn.Module):
  """(image [B, R, R, 3], small image [B, r, r, 3]) -> logits [B, 50].

  With `part` (an int32 scalar in 0..3, may be traced) it also returns the reconstructions
  (whole image, small copy, quadrant `part`) used on real images.

  Attributes:
    resolution: R, one of RESOLUTIONS.
    ndf: base width; the big-branch map of side s has ndf * D_MULT[2s] channels.
    num_classes: > 0 for a projection discriminator: `labels` int [B] are then required, and
      <class embedding, pooled 8x8 features> is added to every logit (module docstring).
  """

  resolution: int
  ndf: int = 64
  num_classes: int = 0
  dtype: Any = jnp.float32  # of the computation; parameters and statistics stay float32
  conv: Any = None  # the convolution (mdjax.core.cpu_conv.Rules on CPUs); None: XLA's

  @nn.compact
  def __call__(self, img, img_small, train: bool = True, part=None, labels=None):
    r, dt = self.resolution, self.dtype
    conv = functools.partial(SNConv, dtype=dt, conv=self.conv)
    ch = lambda s: channels(D_MULT, self.ndf, 2 * s)  # noqa: E731
    lrelu = functools.partial(nn.leaky_relu, negative_slope=0.2)
    # Stem: the reference's 1024 / 512 / 256 stems; below 256 the 256 stem at R.
    if r == 1024:
      x = lrelu(conv(channels(D_MULT, self.ndf, 1024), 4, 2, 1, name="stem1")(img, train))
      x = conv(ch(256), 4, 2, 1, name="stem2")(x, train)
      x = lrelu(BN(dtype=dt, name="stem2_bn")(x, train))
    elif r == 512:
      x = lrelu(conv(ch(256), 4, 2, 1, name="stem1")(img, train))
    else:
      x = lrelu(conv(ch(r), 3, 1, 1, name="stem1")(img, train))
    size = x.shape[1]
    feats = {size: x}
    sle = dict(discriminator_sle_pairs(r))
    while size > 8:
      size //= 2
      x = DownBlockComp(ch(size), name=f"down_{size}", dtype=dt, conv=self.conv)(x, train)
      if size in sle:
        x = SLE(ch(size), name=f"se_{size}", dtype=dt, conv=self.conv)(feats[sle[size]], x, train)
      feats[size] = x
    rf = conv(ch(4), 1, name="rf_big1")(x, train)
    rf = lrelu(BN(dtype=dt, name="rf_big_bn")(rf, train))
    rf_big = conv(1, 4, name="rf_big2")(rf, train)  # 8x8 -> 5x5

    s = conv(channels(D_MULT, self.ndf, 2 * img_small.shape[1]), 4, 2, 1,
               name="small_stem")(img_small, train)
    s = lrelu(s)
    while s.shape[1] > 8:
      s = DownBlock(channels(D_MULT, self.ndf, 2 * s.shape[1]),
                    name=f"small_down_{s.shape[1] // 2}", dtype=dt, conv=self.conv)(s, train)
    rf_small = conv(1, 4, name="rf_small")(s, train)

    b = img.shape[0]
    # Logits in float32: the hinge losses read them.
    logits = jnp.concatenate([rf_big.reshape(b, -1), rf_small.reshape(b, -1)],
                             axis=1).astype(jnp.float32)
    if self.num_classes:
      table = self.param("class_embedding", nn.initializers.normal(CLASS_EMBEDDING_STD),
                         (self.num_classes, x.shape[-1]))
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, C]: the big branch's 8x8 map
      logits = logits + jnp.sum(table[_labels(labels, b)] * pooled, axis=-1, keepdims=True)
    if part is None:
      return logits
    big_size, small_sz, part_size = recon_sizes(r)
    base = max(1, self.ndf // 2)
    decoder = functools.partial(SimpleDecoder, dtype=dt, conv=self.conv)
    rec_big = decoder(big_size, base, name="decoder_big")(feats[8], train)
    rec_small = decoder(small_sz, base, name="decoder_small")(s, train)
    quadrant = crop_quadrant(feats[16], part)
    rec_part = decoder(part_size, base, name="decoder_part")(quadrant, train)
    return logits, (rec_big, rec_small, rec_part)


def _labels(labels, batch: int) -> jax.Array:
  if labels is None:
    raise ValueError("a class-conditional FastGAN (num_classes > 0) needs labels int [B]")
  labels = jnp.asarray(labels)
  if labels.shape != (batch,):
    raise ValueError(f"labels must be int [{batch}], got shape {labels.shape}")
  return labels


def crop_quadrant(x: jax.Array, part) -> jax.Array:
  """Quadrant `part` of NHWC maps: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
  part = jnp.asarray(part, jnp.int32)
  h, w = x.shape[1] // 2, x.shape[2] // 2
  return jax.lax.dynamic_slice(x, (0, (part // 2) * h, (part % 2) * w, 0),
                               (x.shape[0], h, w, x.shape[3]))


# How `init_variables` draws each leaf, by its name: the same distributions as the module
# initializers above (conv N(0, 0.02), BN scale N(1, 0.02), flax SpectralNorm's u ~ N(0, 1)).
_INIT_RULES = {
    "kernel": (0.0, 0.02), "scale": (1.0, 0.02), "u": (0.0, 1.0),
    "bias": (0.0, 0.0), "weight": (0.0, 0.0), "mean": (0.0, 0.0), "var": (1.0, 0.0),
    "sigma": (1.0, 0.0),
    # Class conditioning (module docstring): G's label embedding on z's scale, D's projection
    # embedding at CLASS_EMBEDDING_STD.
    "label_embedding": (0.0, 1.0), "class_embedding": (0.0, CLASS_EMBEDDING_STD),
}


def init_variables(module: nn.Module, rng: jax.Array, *args, **kwargs) -> dict:
  """`module.init(rng, ...)` with one random draw for all leaves.

  Why not flax's init: it derives a key (fold_in) and draws once per parameter, and XLA's CPU
  compiler spends a good fraction of a second on each threefry call, so the tiny 32x32 G + D
  init took over a minute to compile; one draw compiles in seconds. The tree comes from
  flax (`jax.eval_shape` of `module.init`), the values from _INIT_RULES.
  """
  keys = {"params": jax.random.key(0), "noise": jax.random.key(0)}
  abstract = jax.eval_shape(lambda *a: module.init(keys, *a, **kwargs), *args)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  sizes = [math.prod(x.shape) for _, x in paths_leaves]
  noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  out, offset = [], 0
  for (path, leaf), size in zip(paths_leaves, sizes):
    name = str(getattr(path[-1], "key", path[-1])).rsplit("/", 1)[-1]
    if name not in _INIT_RULES:
      raise NotImplementedError(f"no init rule for {jax.tree_util.keystr(path)}")
    mean, std = _INIT_RULES[name]
    value = mean + std * noise[offset:offset + size].reshape(leaf.shape)
    out.append(value.astype(leaf.dtype))
    offset += size
  return jax.tree_util.tree_unflatten(treedef, out)


def build(resolution: int, ngf: int, ndf: int, num_classes: int = 0,
          dtype: Any = jnp.float32, conv=None) -> tuple[Generator, Discriminator]:
  """G and D; `num_classes > 0` makes both class-conditional (module docstring); `dtype` is the
  computation's (bfloat16: mixed precision, parameters and BatchNorm statistics in float32);
  `conv` the convolution every conv runs (mdjax.core.cpu_conv.Rules on CPUs; None: XLA's)."""
  if resolution not in RESOLUTIONS:
    raise ValueError(f"resolution {resolution} not in {RESOLUTIONS}")
  return (Generator(resolution, ngf, num_classes, dtype, conv),
          Discriminator(resolution, ndf, num_classes, dtype, conv))

