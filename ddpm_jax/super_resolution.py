"""Cascaded super-resolution (Ho et al. 2021): conditioning helpers, pure JAX.

A super-resolution U-Net (``model.low_res_size = s > 0``) predicts the noise
of a high-resolution image ``[B, S, S, C]`` given a low-resolution image
``[B, s, s, C]`` in [-1, 1] (the model upsamples it by nearest neighbour and
concatenates it to its input) and the low-resolution image's
noise-augmentation level ``aug_t``.

Noise-conditioning augmentation: during training the low-resolution input is
corrupted by the forward process to a random level s ~ U{0, ..., S_max},
S_max = floor(model.noise_aug_max * T), and the model is told s. Levels are
1-based so that 0 means "clean": level s >= 1 is q(x_{s-1} | x_0) of the
(0-based) diffusion timestep s - 1, i.e. alpha_bar = alphas_cumprod[s - 1];
level 0 has alpha_bar = 1. At sampling time one fixed level (0 by default)
is applied to every low-resolution image; a small level makes the second
stage robust to artefacts of the first.

The low-resolution image of a training example is its area (box) average
over ``factor x factor`` blocks, ``downsample_area``.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import keys
from ddpm_jax import range_checks
from ddpm_jax.diffusion import GaussianDiffusion

# apply_fn(x [B, S, S, C], t [B], low_res [B, s, s, C], aug_t int32 [B])
#   -> network output [B, S, S, C'].
ApplyFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def downsample_area(x: jax.Array, size: int) -> jax.Array:
  """Area (box-filter) downsampling of ``[B, H, W, C]`` to ``[B, size, size, C]``.

  H and W must be multiples of ``size``; each output pixel is the mean of its
  ``(H / size) x (W / size)`` block. Works on numpy and jax arrays.
  """
  b, height, width, c = x.shape
  if size < 1 or height % size or width % size:
    raise ValueError(f"Cannot area-downsample {height}x{width} images to "
                     f"{size}x{size}: the size must divide both sides.")
  fh, fw = height // size, width // size
  return x.reshape(b, size, fh, size, fw, c).mean(axis=(2, 4))


def max_aug_level(num_timesteps: int, noise_aug_max: float) -> int:
  """S_max = floor(noise_aug_max * T), the largest augmentation level."""
  if not 0.0 <= noise_aug_max <= 1.0:
    raise ValueError(f"model.noise_aug_max must lie in [0, 1] (a fraction of "
                     f"T), got {noise_aug_max}.")
  return int(np.floor(noise_aug_max * num_timesteps + 1e-9))


def _check_original(d: GaussianDiffusion) -> None:
  if d.original_num_timesteps != d.num_timesteps:
    raise ValueError(
        "Noise augmentation levels refer to the training process; pass the "
        "un-respaced diffusion (models.create_diffusion(config)), not a "
        "respaced one.")


def _check_levels(d: GaussianDiffusion, aug_t, low_res) -> None:
  """Refuses levels that are not int [B] in 0..T; values only when concrete."""
  if (not hasattr(aug_t, "dtype") or not jnp.issubdtype(aug_t.dtype, jnp.integer)
      or jnp.shape(aug_t) != jnp.shape(low_res)[:1]):
    raise ValueError(
        f"aug_t must be an integer array of shape [B] = {jnp.shape(low_res)[:1]}"
        f" (one level per low-resolution image), got {aug_t!r}.")
  bad = range_checks.outside(aug_t, 0, d.num_timesteps)
  if bad:
    # Indexing would clamp them silently to level T or wrap negative ones.
    raise ValueError(f"aug_t out of range: got {bad}; allowed "
                     f"0..{d.num_timesteps} (0 = clean).")


def augment(d: GaussianDiffusion, low_res: jax.Array, aug_t: jax.Array,
            noise: jax.Array) -> jax.Array:
  """Corrupts low-resolution images to augmentation levels ``aug_t``.

  Args:
    d: the training process (not respaced); levels refer to its timesteps.
    low_res: float32 ``[B, s, s, C]`` in [-1, 1].
    aug_t: int32 ``[B]`` levels in 0..T (0 = unchanged).
    noise: float32 standard normal, shaped like ``low_res``.

  Returns:
    float32 ``[B, s, s, C]``: sqrt(abar) * low_res + sqrt(1 - abar) * noise
    with abar = 1 at level 0 and ``alphas_cumprod[level - 1]`` otherwise.
  """
  _check_original(d)
  _check_levels(d, aug_t, low_res)
  # The float64-derived square roots (as q_sample uses): sqrt(1 - abar) in
  # float32 would lose digits at small levels, where abar is close to 1.
  shape = (-1,) + (1,) * (low_res.ndim - 1)
  signal = jnp.concatenate([jnp.ones((1,)), d.sqrt_alphas_cumprod])[aug_t]
  sigma = jnp.concatenate([jnp.zeros((1,)),
                           d.sqrt_one_minus_alphas_cumprod])[aug_t]
  return signal.reshape(shape) * low_res + sigma.reshape(shape) * noise


def training_condition(d: GaussianDiffusion, x_start: jax.Array,
                       low_res_size: int, max_level: int,
                       rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The conditioning of one training batch: (low_res, aug_t).

  Args:
    d: the training process.
    x_start: float32 ``[B, S, S, C]`` clean images in [-1, 1].
    low_res_size: s, a divisor of S.
    max_level: S_max (``max_aug_level``); levels are drawn from 0..S_max.
    rng: a key, used for the levels and the augmentation noise.

  Returns:
    low_res float32 ``[B, s, s, C]`` (area-downsampled, then augmented) and
    aug_t int32 ``[B]``.
  """
  if keys.is_batched(rng):
    raise ValueError("rng must be one PRNG key for the batch, not one per "
                     f"example (got shape {rng.shape}).")
  if not 0 <= max_level <= d.num_timesteps:
    raise ValueError(f"max_level must lie in 0..T = 0..{d.num_timesteps}, "
                     f"got {max_level}.")
  k_level, k_noise = jax.random.split(rng)
  low_res = downsample_area(x_start, low_res_size)
  aug_t = jax.random.randint(k_level, (x_start.shape[0],), 0, max_level + 1,
                             dtype=jnp.int32)
  noise = jax.random.normal(k_noise, low_res.shape, low_res.dtype)
  return augment(d, low_res, aug_t, noise), aug_t


def make_model_fn(apply_fn: ApplyFn, d: GaussianDiffusion,
                  low_res: jax.Array, *, aug_level: int = 0,
                  noise: Optional[jax.Array] = None
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The ``model_fn(x, t)`` of a super-resolution model, for the samplers.

  Args:
    apply_fn: ``apply_fn(x, t, low_res, aug_t) -> output``, e.g.
      ``lambda x, t, lr, s: model.apply({'params': p}, x, t, low_res=lr,
      aug_t=s)``.
    d: the training process (not respaced), for the augmentation.
    low_res: float32 ``[B, s, s, C]`` in [-1, 1], one per sample; B must be
      the batch the sampler runs.
    aug_level: the fixed augmentation level in 0..T applied to every
      low-resolution image (0: used as given).
    noise: standard normal shaped like ``low_res``; required when
      ``aug_level > 0`` (no hidden randomness).

  Returns:
    ``model_fn(x [B, S, S, C], t [B]) -> output``, to pass to
    ``sampling.p_sample_loop`` / ``ddim_sample_loop`` / ``sample_steps``.
  """
  low_res = jnp.asarray(low_res, jnp.float32)
  if low_res.ndim != 4:
    raise ValueError(f"low_res must be [B, s, s, C], got shape {low_res.shape}.")
  if not isinstance(aug_level, (int, np.integer)) or not (
      0 <= aug_level <= d.original_num_timesteps):
    raise ValueError(f"aug_level must be an int in 0..{d.original_num_timesteps}"
                     f", got {aug_level!r}.")
  batch = low_res.shape[0]
  aug_t = jnp.full((batch,), aug_level, jnp.int32)
  if aug_level > 0:
    if noise is None or jnp.shape(noise) != low_res.shape:
      raise ValueError(
          f"aug_level={aug_level} > 0 needs standard normal `noise` of the "
          f"low-res shape {low_res.shape}, got "
          f"{None if noise is None else jnp.shape(noise)}.")
    low_res = augment(d, low_res, aug_t, noise)

  def model_fn(x, t):
    return apply_fn(x, t, low_res, aug_t)
  return model_fn
