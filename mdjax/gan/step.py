"""One FastGAN train step as a pure function: D update, then G update, then EMA of G.

```python
state = init_gan_state(rng, config.gan)
step = jax.jit(functools.partial(gan_step, config=config.gan), donate_argnums=0)
state, metrics = step(state, real_batch, rng)      # real_batch: float32 [B, R, R, 3] in [-1, 1]
images = sample(state, rng, n, config=config.gan)  # EMA generator, eval-mode BN
```

`GANState` is a pytree of arrays only (no modules, no config), so the ensemble can stack one per
class and `jax.vmap` the step, shard it, and checkpoint it with orbax. Everything that depends on
the config is closed over by `make_gan_fns(spec)`, whose functions are pure; ConfigDicts are not
hashable, so the config is first read into the frozen `GANSpec`.

The step mirrors one iteration of the reference `train.py`: G runs once in train mode; D sees
DiffAugment(real) (with reconstructions of a random quadrant) and the detached DiffAugment(fake)
as two separate BatchNorm batches; after D's Adam update, G is trained against the updated D on
the same augmented fakes. G's forward pass is shared between both updates through `jax.vjp`
(the reference's `fake.detach()` for D plus `backward()` through the same graph for G), which
saves one generator forward per step. D's BatchNorm statistics and spectral-norm vectors are
updated by all three D passes, as PyTorch's train-mode D does.

The EMA generator (what `sample` draws from) differs from the reference on purpose. The reference
keeps `ema = decay * ema + (1 - decay) * g` from a copy of the random init, with no bias
correction: after t steps the init still weighs decay^t, harmless over its 50,000 iterations
(0.999^50000 ~ 2e-22) but 82% at the 200 steps a CPU run affords, and mdjax once generated noise
because of it. mdjax keeps the bias-corrected average instead (`ema_update`): the same decay, so
`gan.ema_decay` means what it means in the reference and long runs converge to the same average,
but the random init carries no weight at any step (after step 1 the EMA equals G).

The class-conditional GAN (mdjax.gan.conditional) is this same step with labels: a `GANSpec` with
`num_classes > 0` builds the conditional G and projection D (mdjax.gan.fastgan), and
`make_conditional_gan_fns` returns `step(state, real, labels, rng)`, which generates the fakes for
the real batch's labels (as the conditional-GAN augmentation paper does), shows D each batch with
its labels, and scales the real side's hinge margin by `real_label_smoothing` (mdjax.gan.losses);
`sample(state, rng, labels)` draws one image per label. With `num_classes = 0` nothing of this is
traced, so the per-class step is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from mdjax.errors import ConfigError, DataError
from mdjax.gan import diffaug, fastgan, losses
from mdjax.core import cpu_conv

PyTree = Any


@dataclasses.dataclass(frozen=True)
class GANSpec:
  """The hashable part of `config.gan` that the model and the step read."""

  resolution: int = 32
  ngf: int = 64
  ndf: int = 64
  nz: int = 256
  learning_rate: float = 2e-4
  beta1: float = 0.5
  beta2: float = 0.999
  ema_decay: float = 0.999
  recon_loss: str = "mse"
  diffaug: tuple[str, ...] = ("color", "translation")
  # The conditional GAN only (`conditional_spec`): 0 = unconditional; the one-sided smoothing
  # factor of the real side's hinge margin (mdjax.gan.losses), 1.0 = none.
  num_classes: int = 0
  real_label_smoothing: float = 1.0
  # Grey output: G's images have their channels averaged (`gan.colour`, resolved: see `from_config`).
  grey: bool = False
  # The computation's dtype (`gan.dtype`): "bfloat16" is mixed precision (parameters, Adam
  # moments, EMA and BatchNorm statistics float32; losses in float32).
  dtype: str = "float32"
  # The CPU's convolution rules on a CPU (mdjax.core.cpu_conv); False: XLA's own everywhere (the
  # twin benchmarks count FLOPs on: the rules' chunked loops hide FLOPs from XLA's analysis).
  fast_convs: bool = True

  @classmethod
  def from_config(cls, config, grey_data: bool = False) -> GANSpec:
    """The spec of `config.gan`; `gan.colour = "auto"` makes a grey generator when `grey_data`
    (the classes' real images are all grey)."""
    if isinstance(config, GANSpec):
      return config
    colour = str(config.colour)
    if colour not in COLOURS:
      raise ConfigError("gan.colour", colour, "one of " + ", ".join(COLOURS))
    spec = cls(resolution=int(config.resolution), ngf=int(config.ngf), ndf=int(config.ndf),
               nz=int(config.nz), learning_rate=float(config.learning_rate),
               beta1=float(config.beta1), beta2=float(config.beta2),
               ema_decay=float(config.ema_decay), recon_loss=str(config.recon_loss),
               diffaug=_policy(config.diffaug),
               grey=colour == "grey" or (colour == "auto" and grey_data),
               dtype=str(config.dtype))
    if spec.dtype not in DTYPES:
      raise ConfigError("gan.dtype", spec.dtype, "one of " + ", ".join(DTYPES))
    if spec.resolution not in fastgan.RESOLUTIONS:
      raise ConfigError("gan.resolution", spec.resolution,
                        "one of " + ", ".join(map(str, fastgan.RESOLUTIONS)))
    if spec.recon_loss not in losses.RECON_LOSSES:
      raise ConfigError("gan.recon_loss", spec.recon_loss, "one of " + ", ".join(losses.RECON_LOSSES))
    return spec

  @classmethod
  def conditional_spec(cls, config, num_classes: int) -> GANSpec:
    """The spec of one class-conditional GAN over `num_classes` classes: `config.gan` plus
    `gan.real_label_smoothing` (which the per-class GANs do not read)."""
    smoothing = float(config.real_label_smoothing)
    if not 0 < smoothing <= 1:
      raise ConfigError("gan.real_label_smoothing", smoothing,
                        "a number in (0, 1]: the real side's hinge margin factor (1.0 = none)")
    if num_classes < 1:
      raise DataError("a class-conditional GAN needs at least one class")
    return dataclasses.replace(cls.from_config(config), num_classes=int(num_classes),
                               real_label_smoothing=smoothing)


# `gan.colour`: "auto" follows the data (grey when every real image is grey).
COLOURS = ("auto", "rgb", "grey")
# `gan.dtype` -> the computation's dtype.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def to_grey(images: jax.Array) -> jax.Array:
  """Images [..., 3] with each pixel's channels replaced by their mean: a grey image that D,
  DiffAugment and the classifier read as RGB. G learns through the mean, so it is trained as a
  one-channel generator would be, in the same model."""
  return jnp.broadcast_to(jnp.mean(images, axis=-1, keepdims=True), images.shape)


def _policy(text) -> tuple[str, ...]:
  try:
    return diffaug.parse_policy(text)
  except ValueError:
    raise ConfigError("gan.diffaug", text,
                      "a comma-separated subset of " + ",".join(diffaug.POLICIES) + " (or empty)"
                      ) from None


@flax.struct.dataclass
class GANState:
  """Everything one GAN carries between steps; every leaf is an array."""

  step: jax.Array  # int32 scalar
  g_params: PyTree
  g_stats: PyTree  # BatchNorm running statistics and spectral-norm vectors of G
  d_params: PyTree
  d_stats: PyTree
  g_opt: PyTree
  d_opt: PyTree
  ema_params: PyTree  # bias-corrected moving average of g_params (`ema_update`); what `sample` uses


def ema_update(ema_params: PyTree, g_params: PyTree, step: jax.Array, decay: float) -> PyTree:
  """The bias-corrected EMA after G's update number `step` (1-based) produced `g_params`.

  Equals `optax.ema(decay, debias=True)`'s output, sum_i (1 - d) d^(t-i) g_i / (1 - d^t), kept as
  the average itself so `sample` reads it directly: with that average A, the next one is
  A + w (g - A) with w = (1 - d) / (1 - d^t), which is 1 at t = 1 (the init drops out at once)
  and tends to 1 - d. The state then needs no extra accumulator or counter: `GANState.step` is t.
  """
  # Both terms in float32, so that the weight is exactly 1 at t = 1.
  d, t = jnp.float32(decay), jnp.asarray(step, jnp.float32)
  weight = (1.0 - d) / (1.0 - jnp.power(d, t))
  return optax.incremental_update(g_params, ema_params, weight)


class GANFns(NamedTuple):
  """One GAN as pure functions; `jax.jit` / `jax.vmap` them as needed. The contract the ensemble
  (mdjax.gan.program) trains: `init(rng) -> state`, `step(state, real [B, R, R, 3] in [-1, 1],
  rng) -> (state, metrics)`, `sample(state, rng, n) -> images in [-1, 1]`; states are pytrees of
  arrays. Stand-ins (tests) give only those three."""

  init: Callable[[jax.Array], Any]
  step: Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]
  sample: Callable[[Any, jax.Array, int], jax.Array]
  spec: GANSpec | None = None
  # `step` with an extra term in G's loss: guided_step(state, real, rng, g_term), where
  # g_term(fake [B, R, R, 3] in [-1, 1], before DiffAugment) -> (scalar loss, metrics dict) is
  # added to the adversarial loss and differentiated into G only (D's update does not see it).
  # GAN distillation (mdjax.gan.distill) passes its triplet term here.
  guided_step: Callable[[Any, jax.Array, jax.Array, Callable], tuple[Any, dict]] | None = None


class ConditionalGANFns(NamedTuple):
  """Pure functions of a class-conditional GAN: labels are int32 in [0, spec.num_classes)."""

  init: Callable[[jax.Array], GANState]
  # (state, real [B, R, R, 3], labels [B], rng) -> (state, metrics)
  step: Callable[[GANState, jax.Array, jax.Array, jax.Array], tuple[GANState, dict]]
  # (state, rng, labels [n]) -> images [n, R, R, 3] from the EMA generator
  sample: Callable[[GANState, jax.Array, jax.Array], jax.Array]
  spec: GANSpec


@functools.lru_cache(maxsize=32)
def _make(spec: GANSpec) -> GANFns | ConditionalGANFns:
  # CPU only: convolution weight gradients as matmuls (mdjax.core.cpu_conv; at 256x256 XLA's own
  # dW convolutions were 14 of the step's 24 s). GPUs, and the FLOP-counting twin
  # (`fast_convs=False`), keep XLA's convolutions.
  conv = cpu_conv.rules_for_backend() if spec.fast_convs else None
  gen, disc = fastgan.build(spec.resolution, spec.ngf, spec.ndf, spec.num_classes,
                            DTYPES[spec.dtype], conv)
  # Labels as keyword arguments of G and D, only for a conditional spec (then always given).
  cond = (lambda labels: {"labels": labels}) if spec.num_classes else (lambda labels: {})
  r, small = spec.resolution, fastgan.small_size(spec.resolution)
  big_t, small_t, part_t = fastgan.recon_sizes(r)
  tx = optax.adam(spec.learning_rate, b1=spec.beta1, b2=spec.beta2)

  def augment(x, key):
    return diffaug.diff_augment(x, key, spec.diffaug) if spec.diffaug else x

  def init(rng):
    kg, kd = jax.random.split(rng)
    z = jax.ShapeDtypeStruct((2, spec.nz), jnp.float32)
    labels = cond(jnp.zeros((2,), jnp.int32))
    g_vars = fastgan.init_variables(gen, kg, z, train=False, **labels)
    img = jax.ShapeDtypeStruct((2, r, r, 3), jnp.float32)
    img_small = jax.ShapeDtypeStruct((2, small, small, 3), jnp.float32)
    d_vars = fastgan.init_variables(disc, kd, img, img_small, train=False, part=0, **labels)
    g_params, d_params = g_vars["params"], d_vars["params"]
    return GANState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params, g_stats=g_vars["batch_stats"],
        d_params=d_params, d_stats=d_vars["batch_stats"],
        g_opt=tx.init(g_params), d_opt=tx.init(d_params),
        ema_params=jax.tree.map(jnp.array, g_params))

  def train_step(state: GANState, real: jax.Array, rng: jax.Array, labels: jax.Array | None,
                 g_term: Callable | None = None):
    if real.ndim != 4 or real.shape[1:] != (r, r, 3):
      raise DataError(f"a GAN batch must be float32 [B, {r}, {r}, 3] in [-1, 1] for "
                      f"config.gan.resolution={r}; got shape {real.shape}. Resize the class "
                      "images to the GAN resolution (or set gan.resolution to match).")
    real = real.astype(jnp.float32)
    b = real.shape[0]
    # Fakes are made for the real batch's labels, so D compares like with like per class.
    label_kw = cond(labels)
    (k_z, k_noise, k_real_aug, k_fake_aug, k_small_aug, k_part, k_u_real,
     k_u_fake) = jax.random.split(rng, 8)
    z = jax.random.normal(k_z, (b, spec.nz), jnp.float32)

    def generate(g_params):
      (img, img_small), upd = gen.apply(
          {"params": g_params, "batch_stats": state.g_stats}, z, train=True,
          rngs={"noise": k_noise}, mutable=["batch_stats"], **label_kw)
      if spec.grey:
        img, img_small = to_grey(img), to_grey(img_small)
      return (img, img_small), upd["batch_stats"]

    (fake, fake_small), g_vjp, g_stats = jax.vjp(generate, state.g_params, has_aux=True)

    def augment_fake(img, img_small):
      # The reference augments G's two outputs independently; the same draw serves D and G.
      return augment(img, k_fake_aug), augment(img_small, k_small_aug)

    real_aug = augment(real, k_real_aug)
    real_small = fastgan.downscale(real_aug, small)
    part = jax.random.randint(k_part, (), 0, 4)
    targets = (fastgan.downscale(real_aug, big_t), real_small,
               fastgan.downscale(fastgan.crop_quadrant(real_aug, part), part_t))
    fakes_aug = augment_fake(jax.lax.stop_gradient(fake), jax.lax.stop_gradient(fake_small))

    def d_loss_fn(d_params):
      (logits_real, recs), upd = disc.apply(
          {"params": d_params, "batch_stats": state.d_stats}, real_aug, real_small, train=True,
          part=part, mutable=["batch_stats"], **label_kw)
      logits_fake, upd = disc.apply(
          {"params": d_params, "batch_stats": upd["batch_stats"]}, *fakes_aug, train=True,
          mutable=["batch_stats"], **label_kw)
      recon = sum(losses.reconstruction(p, t, spec.recon_loss) for p, t in zip(recs, targets))
      loss = (losses.d_hinge_real(logits_real, k_u_real, spec.real_label_smoothing) + recon
              + losses.d_hinge_fake(logits_fake, k_u_fake))
      aux = dict(recon_loss=recon, d_real=jnp.mean(logits_real), d_fake=jnp.mean(logits_fake))
      return loss, (upd["batch_stats"], aux)

    (d_loss, (d_stats, d_aux)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        state.d_params)
    d_updates, d_opt = tx.update(d_grads, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)

    def g_loss_fn(img, img_small):
      logits, upd = disc.apply({"params": d_params, "batch_stats": d_stats},
                               *augment_fake(img, img_small), train=True, mutable=["batch_stats"],
                               **label_kw)
      adversarial = losses.g_loss(logits)
      if g_term is None:
        return adversarial, (upd["batch_stats"], adversarial, {})
      extra, extra_metrics = g_term(img)
      return adversarial + extra, (upd["batch_stats"], adversarial, extra_metrics)

    (_, (d_stats, g_loss, g_aux)), fake_grads = jax.value_and_grad(
        g_loss_fn, argnums=(0, 1), has_aux=True)(fake, fake_small)
    (g_grads,) = g_vjp(fake_grads)
    g_updates, g_opt = tx.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)
    ema_params = ema_update(state.ema_params, g_params, state.step + 1, spec.ema_decay)

    new_state = GANState(step=state.step + 1, g_params=g_params, g_stats=g_stats,
                         d_params=d_params, d_stats=d_stats, g_opt=g_opt, d_opt=d_opt,
                         ema_params=ema_params)
    metrics = dict(d_loss=d_loss, g_loss=g_loss, **d_aux, **g_aux)
    return new_state, metrics

  def draw(state: GANState, rng: jax.Array, n: int, labels: jax.Array | None):
    kz, kn = jax.random.split(rng)
    z = jax.random.normal(kz, (n, spec.nz), jnp.float32)
    img, _ = gen.apply({"params": state.ema_params, "batch_stats": state.g_stats}, z,
                       train=False, rngs={"noise": kn}, **cond(labels))
    return to_grey(img) if spec.grey else img

  if not spec.num_classes:
    def step(state: GANState, real: jax.Array, rng: jax.Array):
      return train_step(state, real, rng, None)

    def guided_step(state: GANState, real: jax.Array, rng: jax.Array, g_term: Callable):
      return train_step(state, real, rng, None, g_term)

    def sample(state: GANState, rng: jax.Array, n: int):
      return draw(state, rng, n, None)

    return GANFns(init=init, step=step, sample=sample, spec=spec, guided_step=guided_step)

  def conditional_step(state: GANState, real: jax.Array, labels: jax.Array, rng: jax.Array):
    return train_step(state, real, rng, jnp.asarray(labels, jnp.int32))

  def conditional_sample(state: GANState, rng: jax.Array, labels: jax.Array):
    return draw(state, rng, labels.shape[0], jnp.asarray(labels, jnp.int32))

  return ConditionalGANFns(init=init, step=conditional_step, sample=conditional_sample, spec=spec)


def make_gan_fns(config, grey_data: bool = False) -> GANFns:
  """Pure (init, step, sample) functions for `config.gan` (a ConfigDict or a GANSpec);
  `grey_data` resolves `gan.colour = "auto"` (GANSpec.from_config)."""
  spec = GANSpec.from_config(config, grey_data)
  if spec.num_classes:
    raise ValueError("a conditional GANSpec: use make_conditional_gan_fns")
  return _make(spec)


def make_conditional_gan_fns(config, num_classes: int | None = None) -> ConditionalGANFns:
  """Pure (init, step, sample) functions of one class-conditional GAN: `config.gan` with
  `num_classes` labels, or a GANSpec that has `num_classes > 0`."""
  if isinstance(config, GANSpec):
    if not config.num_classes:
      raise ValueError("make_conditional_gan_fns needs a GANSpec with num_classes > 0")
    return _make(config)
  return _make(GANSpec.conditional_spec(config, num_classes))


def parameter_counts(fns: GANFns | ConditionalGANFns) -> dict[str, int]:
  """{"g_parameters", "d_parameters"} of one GAN (from shapes: nothing is computed)."""
  state = jax.eval_shape(fns.init, jax.random.PRNGKey(0))
  count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
  return {"g_parameters": count(state.g_params), "d_parameters": count(state.d_params)}


def init_gan_state(rng: jax.Array, config) -> GANState:
  """A fresh GAN for `config.gan`: initial G/D variables, Adam states, EMA = G params (a
  placeholder: the first step replaces it, see `ema_update`)."""
  return make_gan_fns(config).init(rng)


def gan_step(state: GANState, real_batch: jax.Array, rng: jax.Array, *, config):
  """One D + G + EMA update; returns (state, metrics) with scalar metrics
  d_loss, g_loss, recon_loss, d_real, d_fake."""
  return make_gan_fns(config).step(state, real_batch, rng)


def sample(state: GANState, rng: jax.Array, n: int, *, config) -> jax.Array:
  """n images float32 [n, R, R, 3] in [-1, 1] from the EMA generator (eval-mode BatchNorm)."""
  return make_gan_fns(config).sample(state, rng, n)
