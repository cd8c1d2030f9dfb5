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
"""

from __future__ import annotations

import dataclasses
import functools
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

  @classmethod
  def from_config(cls, config) -> GANSpec:
    if isinstance(config, GANSpec):
      return config
    spec = cls(resolution=int(config.resolution), ngf=int(config.ngf), ndf=int(config.ndf),
               nz=int(config.nz), learning_rate=float(config.learning_rate),
               beta1=float(config.beta1), beta2=float(config.beta2),
               ema_decay=float(config.ema_decay), recon_loss=str(config.recon_loss),
               diffaug=_policy(config.diffaug))
    if spec.resolution not in fastgan.RESOLUTIONS:
      raise ConfigError("gan.resolution", spec.resolution,
                        "one of " + ", ".join(map(str, fastgan.RESOLUTIONS)))
    if spec.recon_loss not in losses.RECON_LOSSES:
      raise ConfigError("gan.recon_loss", spec.recon_loss, "one of " + ", ".join(losses.RECON_LOSSES))
    return spec


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
  """Pure functions for one GAN spec; `jax.jit` / `jax.vmap` them as needed."""

  init: Callable[[jax.Array], GANState]
  step: Callable[[GANState, jax.Array, jax.Array], tuple[GANState, dict]]
  sample: Callable[[GANState, jax.Array, int], jax.Array]
  spec: GANSpec
  # `step` with an extra term in G's loss: guided_step(state, real, rng, g_term), where
  # g_term(fake [B, R, R, 3] in [-1, 1], before DiffAugment) -> (scalar loss, metrics dict) is
  # added to the adversarial loss and differentiated into G only (D's update does not see it).
  # GAN distillation (mdjax.gan.distill) passes its triplet term here.
  guided_step: Callable[[GANState, jax.Array, jax.Array, Callable], tuple[GANState, dict]]


@functools.lru_cache(maxsize=32)
def _make(spec: GANSpec) -> GANFns:
  gen, disc = fastgan.build(spec.resolution, spec.ngf, spec.ndf)
  r, small = spec.resolution, fastgan.small_size(spec.resolution)
  big_t, small_t, part_t = fastgan.recon_sizes(r)
  tx = optax.adam(spec.learning_rate, b1=spec.beta1, b2=spec.beta2)

  def augment(x, key):
    return diffaug.diff_augment(x, key, spec.diffaug) if spec.diffaug else x

  def init(rng):
    kg, kd = jax.random.split(rng)
    z = jax.ShapeDtypeStruct((2, spec.nz), jnp.float32)
    g_vars = fastgan.init_variables(gen, kg, z, train=False)
    img = jax.ShapeDtypeStruct((2, r, r, 3), jnp.float32)
    img_small = jax.ShapeDtypeStruct((2, small, small, 3), jnp.float32)
    d_vars = fastgan.init_variables(disc, kd, img, img_small, train=False, part=0)
    g_params, d_params = g_vars["params"], d_vars["params"]
    return GANState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params, g_stats=g_vars["batch_stats"],
        d_params=d_params, d_stats=d_vars["batch_stats"],
        g_opt=tx.init(g_params), d_opt=tx.init(d_params),
        ema_params=jax.tree.map(jnp.array, g_params))

  def step(state: GANState, real: jax.Array, rng: jax.Array):
    # CPU only: convolution weight gradients as matmuls (mdjax.core.cpu_conv); at 256x256 XLA's
    # own dW convolutions were 14 of the step's 24 s. GPUs keep XLA's convolutions.
    with cpu_conv.use_fast_conv_grads():
      return _step(state, real, rng)

  def guided_step(state: GANState, real: jax.Array, rng: jax.Array, g_term: Callable):
    with cpu_conv.use_fast_conv_grads():
      return _step(state, real, rng, g_term)

  def _step(state: GANState, real: jax.Array, rng: jax.Array, g_term: Callable | None = None):
    if real.ndim != 4 or real.shape[1:] != (r, r, 3):
      raise DataError(f"a GAN batch must be float32 [B, {r}, {r}, 3] in [-1, 1] for "
                      f"config.gan.resolution={r}; got shape {real.shape}. Resize the class "
                      "images to the GAN resolution (or set gan.resolution to match).")
    real = real.astype(jnp.float32)
    b = real.shape[0]
    (k_z, k_noise, k_real_aug, k_fake_aug, k_small_aug, k_part, k_u_real,
     k_u_fake) = jax.random.split(rng, 8)
    z = jax.random.normal(k_z, (b, spec.nz), jnp.float32)

    def generate(g_params):
      (img, img_small), upd = gen.apply(
          {"params": g_params, "batch_stats": state.g_stats}, z, train=True,
          rngs={"noise": k_noise}, mutable=["batch_stats"])
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
          part=part, mutable=["batch_stats"])
      logits_fake, upd = disc.apply(
          {"params": d_params, "batch_stats": upd["batch_stats"]}, *fakes_aug, train=True,
          mutable=["batch_stats"])
      recon = sum(losses.reconstruction(p, t, spec.recon_loss) for p, t in zip(recs, targets))
      loss = (losses.d_hinge_real(logits_real, k_u_real) + recon
              + losses.d_hinge_fake(logits_fake, k_u_fake))
      aux = dict(recon_loss=recon, d_real=jnp.mean(logits_real), d_fake=jnp.mean(logits_fake))
      return loss, (upd["batch_stats"], aux)

    (d_loss, (d_stats, d_aux)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        state.d_params)
    d_updates, d_opt = tx.update(d_grads, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)

    def g_loss_fn(img, img_small):
      logits, upd = disc.apply({"params": d_params, "batch_stats": d_stats},
                               *augment_fake(img, img_small), train=True, mutable=["batch_stats"])
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

  def sample(state: GANState, rng: jax.Array, n: int):
    kz, kn = jax.random.split(rng)
    z = jax.random.normal(kz, (n, spec.nz), jnp.float32)
    img, _ = gen.apply({"params": state.ema_params, "batch_stats": state.g_stats}, z,
                       train=False, rngs={"noise": kn})
    return img

  return GANFns(init=init, step=step, sample=sample, spec=spec, guided_step=guided_step)


def make_gan_fns(config) -> GANFns:
  """Pure (init, step, sample) functions for `config.gan` (a ConfigDict or a GANSpec)."""
  return _make(GANSpec.from_config(config))


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
