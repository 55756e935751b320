"""The Gaussian diffusion process of DDPM as pure JAX functions.

Time is 0-based: `t = 0` is one step of noise, `t = T - 1` the last. Data has
any shape `[B, ...]` (images are NHWC in [-1, 1]); per-example reductions take
the mean over every axis but the first. Every function here is pure and works
under `jit`, `vmap` and `grad`. A model is any callable
`model_fn(x_t, t) -> output` returning the raw network output: `[B, ...]` with
the data's shape, or twice the channels (last axis) for learned variances.
Half-precision inputs are computed in float32.

Errors: every function raises ValueError, naming the value and the allowed
ones, for an unknown name, a timestep outside [0, T) (checked when concrete:
traced values cannot be), a `t` that is not an int array `[B]`, or a shape that
does not match the data's (nothing is broadcast); and TypeError for an `rng`
that is not a PRNG key.

This module imports no Flax and knows no config; `ddpm_jax.models` builds a
`GaussianDiffusion` from a config.
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import keys
from ddpm_jax import range_checks

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "hybrid")
LEARNED_VAR_TYPES = ("learned", "learned_range")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_choice(kind: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(
        f"Unknown {kind} {value!r}; choose one of {', '.join(allowed)}.")


@dataclasses.dataclass(frozen=True)
class GaussianDiffusion:
  """Schedule constants of a diffusion process: an immutable pytree.

  Every array field is float32 `[T]` (int32 for `timestep_map`), computed in
  float64 by `create`. The string fields are static (part of the tree
  structure), so a jitted function taking a `GaussianDiffusion` recompiles
  only when the types change. Build it with `GaussianDiffusion.create`; copy
  it with `.replace(...)`.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  # The "fixedlarge" variance: beta_t, except posterior_variance[1] at t = 0.
  fixedlarge_variance: jax.Array
  # The timestep of the original process that each step stands for; the model
  # is fed these, so a respaced process reuses a model trained on the full one.
  timestep_map: jax.Array
  model_mean_type: str = "eps"
  model_var_type: str = "fixedlarge"
  loss_type: str = "mse"
  # T of the process the model was trained on (weights the hybrid VB term).
  original_num_timesteps: int = 0

  @property
  def num_timesteps(self) -> int:
    """T, static (known from the shape at trace time)."""
    return self.betas.shape[0]

  def replace(self, **changes) -> "GaussianDiffusion":
    return dataclasses.replace(self, **changes)

  @classmethod
  def create(cls, betas, model_mean_type: str = "eps",
             model_var_type: str = "fixedlarge", loss_type: str = "mse",
             timestep_map=None, original_num_timesteps: int | None = None
             ) -> "GaussianDiffusion":
    """Derives every constant from `betas` (float64 `[T]`, in (0, 1]).

    `timestep_map` (int `[T]`) and `original_num_timesteps` are set by
    `ddpm_jax.sampling.respace`; leave them out otherwise. A last beta of 1
    (the `jsd` schedule) makes x_T independent of x_0, which an eps-predicting
    model cannot invert: such a schedule needs `model_mean_type` 'x0' or 'v'.

    Raises:
      ValueError: an unknown name, betas outside (0, 1] or not 1-D, a last
        beta of 1 with eps prediction, a learned variance with the mse loss,
        or the hybrid loss with a fixed variance.
    """
    _check_choice("model_mean_type", model_mean_type, MEAN_TYPES)
    _check_choice("model_var_type", model_var_type, VAR_TYPES)
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    learned = model_var_type in LEARNED_VAR_TYPES
    if learned and loss_type == "mse":
      raise ValueError(
          f"model_var_type {model_var_type!r} learns the variance, which the "
          "'mse' loss does not train; use loss_type 'hybrid' or 'kl'.")
    if loss_type == "hybrid" and not learned:
      raise ValueError(
          "loss_type 'hybrid' adds a bound term that trains learned variances; "
          f"with model_var_type {model_var_type!r} use loss_type 'mse', or "
          "learn the variance ('learned' or 'learned_range').")
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
      raise ValueError(f"betas must be a 1-D array, got shape {betas.shape}.")
    bad = ~((betas > 0) & (betas <= 1))  # NaN is bad too
    if np.any(bad):
      raise ValueError(f"betas must all lie in (0, 1]; got {betas[bad][:8].tolist()} "
                       f"at index {np.flatnonzero(bad)[:8].tolist()}.")
    if betas[-1] == 1.0 and model_mean_type == "eps":
      raise ValueError(
          "The last beta is 1 (alpha-bar_T = 0, as in the 'jsd' schedule): x_0 "
          "cannot be recovered from a predicted eps there; use model_mean_type "
          "'x0' or 'v', or a schedule with betas < 1.")
    num_timesteps = betas.shape[0]
    if timestep_map is None:
      timestep_map = np.arange(num_timesteps)
    timestep_map = np.asarray(timestep_map)
    if timestep_map.shape != (num_timesteps,):
      raise ValueError(
          f"timestep_map must have shape ({num_timesteps},), got "
          f"{timestep_map.shape}.")

    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    # inf where abar = 0 (a last beta of 1); only the eps -> x_0 conversion
    # uses it, and such a process refuses eps prediction above.
    with np.errstate(divide="ignore"):
      recip_abar = 1.0 / abar
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is 0 at t = 0: its log reuses the t = 1 value.
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if (
        num_timesteps > 1) else np.log(np.maximum(post_var, 1e-20))
    fixedlarge = np.append(post_var[1], betas[1:]) if (
        num_timesteps > 1) else betas
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return cls(
        betas=f32(betas),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
        log_one_minus_alphas_cumprod=f32(np.log(1.0 - abar)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(recip_abar)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(recip_abar - 1.0)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
        posterior_mean_coef2=f32(
            (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
        fixedlarge_variance=f32(fixedlarge),
        timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        loss_type=loss_type,
        original_num_timesteps=int(original_num_timesteps or num_timesteps),
    )


_DATA_FIELDS = [f.name for f in dataclasses.fields(GaussianDiffusion)
                if f.name not in ("model_mean_type", "model_var_type",
                                  "loss_type", "original_num_timesteps")]
jax.tree_util.register_dataclass(
    GaussianDiffusion, data_fields=_DATA_FIELDS,
    meta_fields=["model_mean_type", "model_var_type", "loss_type",
                 "original_num_timesteps"])


# ---------------------------------------------------------------------------
# Helpers


def _check_t(d: GaussianDiffusion, t, x) -> None:
  """Validates the timesteps against the data; values only when concrete."""
  x_shape = jnp.shape(x)
  if not hasattr(t, "dtype"):
    # A Python int or list: one timestep per example is asked for explicitly.
    raise ValueError(
        f"t must be an integer array of shape [B] = {x_shape[:1]} (one "
        f"timestep per example of x with shape {x_shape}), got {type(t).__name__} "
        f"{t!r}; for one t for every example pass "
        "jnp.full((B,), t, jnp.int32).")
  t_shape = jnp.shape(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"t must be an integer array, got dtype {t.dtype}.")
  if len(x_shape) < 1 or t_shape != x_shape[:1]:
    raise ValueError(
        f"t must have shape [B] = {x_shape[:1]} (one timestep per example of "
        f"x with shape {x_shape}), got {t_shape}; for one t for every example "
        "pass jnp.full((B,), t, jnp.int32).")
  bad = range_checks.outside(t, 0, d.num_timesteps - 1)
  if bad:
    raise ValueError(f"t out of range: got {bad}; allowed "
                     f"0..{d.num_timesteps - 1} (time is 0-based).")


def _check_like(name: str, a, ref_name: str, ref) -> None:
  """Refuses `a` unless it has `ref`'s shape (broadcasting would be silent)."""
  if jnp.shape(a) != jnp.shape(ref):
    raise ValueError(
        f"{name} must have the shape of {ref_name}, {jnp.shape(ref)}, got "
        f"{jnp.shape(a)} (one value per element of every example: it is not "
        "broadcast).")


def extract(a: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """Gathers `a[t]` (`a`: `[T]`, `t`: int `[B]`) as `[B, 1, ..., 1]` with `ndim` axes."""
  out = a[t]
  return out.reshape(out.shape + (1,) * (ndim - 1))


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the first: `[B, ...] -> [B]`."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _at_least_float32(x) -> jax.Array:
  """x as float32, or wider if it is: half-precision inputs are computed in float32."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _split_output(d: GaussianDiffusion, model_output, x):
  """Splits a learned-variance output `[..., 2C]` into (mean part, var part).

  Both parts are float32 (or wider): a bfloat16 network's output is not used
  at its own precision in the losses and the variance.
  """
  model_output = _at_least_float32(model_output)
  c = x.shape[-1]
  if d.model_var_type in LEARNED_VAR_TYPES:
    if x.ndim < 2:
      # The last axis of [B] data is the batch: there are no channels to double.
      raise ValueError(
          f"model_var_type {d.model_var_type!r} splits the model output's last "
          f"(channel) axis in two, but x with shape {x.shape} has none; give "
          "the data a channel axis ([B, 1]) or use 'fixedlarge'/'fixedsmall'.")
    if model_output.shape != x.shape[:-1] + (2 * c,):
      raise ValueError(
          f"model_var_type {d.model_var_type!r} needs a model output with 2C = "
          f"{2 * c} channels (shape {x.shape[:-1] + (2 * c,)}), got "
          f"{model_output.shape}.")
    return model_output[..., :c], model_output[..., c:]
  if model_output.shape != x.shape:
    raise ValueError(
        f"model_var_type {d.model_var_type!r} needs a model output shaped like "
        f"x {x.shape}, got {model_output.shape}.")
  return model_output, None


def call_model(d: GaussianDiffusion, model_fn: ModelFn, x, t) -> jax.Array:
  """Runs `model_fn` on the timesteps of the original process (respacing)."""
  return model_fn(x, d.timestep_map[t])


# ---------------------------------------------------------------------------
# The forward process q and its posterior


def q_mean_variance(d: GaussianDiffusion, x_start, t):
  """q(x_t | x_0): returns (mean `[B, ...]`, variance, log_variance `[B, 1, ...]`).

  `x_start`: `[B, ...]` float (any rank >= 1); `t`: int `[B]` in [0, T). The
  variances are float32, the mean float32 (or wider if `x_start` is).
  """
  _check_t(d, t, x_start)
  n = x_start.ndim
  mean = extract(d.sqrt_alphas_cumprod, t, n) * x_start
  # Squared from the float64-derived root: 1 - abar in float32 loses digits
  # where abar is close to 1.
  variance = extract(jnp.square(d.sqrt_one_minus_alphas_cumprod), t, n)
  log_variance = extract(d.log_one_minus_alphas_cumprod, t, n)
  return mean, variance, log_variance


def q_sample(d: GaussianDiffusion, x_start, t, noise):
  """Draws x_t ~ q(x_t | x_0) given standard normal `noise` shaped like `x_start`.

  `x_start`, `noise`: `[B, ...]` float (the same shape; not broadcast); `t`:
  int `[B]` in [0, T). Returns x_t `[B, ...]` float32 for float32/16 inputs.
  """
  _check_t(d, t, x_start)
  _check_like("noise", noise, "x_start", x_start)
  n = x_start.ndim
  return (extract(d.sqrt_alphas_cumprod, t, n) * x_start +
          extract(d.sqrt_one_minus_alphas_cumprod, t, n) * noise)


def q_posterior_mean_variance(d: GaussianDiffusion, x_start, x_t, t):
  """q(x_{t-1} | x_t, x_0): returns (mean `[B, ...]`, variance, log_variance `[B, 1, ...]`).

  The log-variance is clipped at t = 0 (where the variance is 0) to the t = 1
  value, as in the original code. `x_start`, `x_t`: `[B, ...]` float, the same
  shape; `t`: int `[B]` in [0, T).
  """
  _check_t(d, t, x_t)
  _check_like("x_start", x_start, "x_t", x_t)
  n = x_t.ndim
  mean = (extract(d.posterior_mean_coef1, t, n) * x_start +
          extract(d.posterior_mean_coef2, t, n) * x_t)
  variance = extract(d.posterior_variance, t, n)
  log_variance = extract(d.posterior_log_variance_clipped, t, n)
  return mean, variance, log_variance


def predict_xstart_from_eps(d: GaussianDiffusion, x_t, t, eps):
  """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).

  `x_t`, `eps`: `[B, ...]` float32; `t`: int `[B]` in [0, T). Returns `[B, ...]`.
  """
  _check_t(d, t, x_t)
  _check_like("eps", eps, "x_t", x_t)
  n = x_t.ndim
  return (extract(d.sqrt_recip_alphas_cumprod, t, n) * x_t -
          extract(d.sqrt_recipm1_alphas_cumprod, t, n) * eps)


def predict_eps_from_xstart(d: GaussianDiffusion, x_t, t, x_start):
  """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t).

  `x_t`, `x_start`: `[B, ...]` float32; `t`: int `[B]` in [0, T). Returns
  `[B, ...]`. (This form stays finite where abar_t = 0.)
  """
  _check_t(d, t, x_t)
  _check_like("x_start", x_start, "x_t", x_t)
  n = x_t.ndim
  return ((x_t - extract(d.sqrt_alphas_cumprod, t, n) * x_start) /
          extract(d.sqrt_one_minus_alphas_cumprod, t, n))


def get_v(d: GaussianDiffusion, x_start, noise, t):
  """The v-target of Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1 - abar) x_0.

  `x_start`, `noise`: `[B, ...]` float32 (note the order: like `q_sample`, not
  like the `predict_*` functions); `t`: int `[B]` in [0, T). Returns `[B, ...]`.
  """
  _check_t(d, t, x_start)
  _check_like("noise", noise, "x_start", x_start)
  n = x_start.ndim
  return (extract(d.sqrt_alphas_cumprod, t, n) * noise -
          extract(d.sqrt_one_minus_alphas_cumprod, t, n) * x_start)


def predict_xstart_from_v(d: GaussianDiffusion, x_t, t, v):
  """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v.

  `x_t`, `v`: `[B, ...]` float32; `t`: int `[B]` in [0, T). Returns `[B, ...]`.
  """
  _check_t(d, t, x_t)
  _check_like("v", v, "x_t", x_t)
  n = x_t.ndim
  return (extract(d.sqrt_alphas_cumprod, t, n) * x_t -
          extract(d.sqrt_one_minus_alphas_cumprod, t, n) * v)


def predict_eps_from_v(d: GaussianDiffusion, x_t, t, v):
  """eps = sqrt(1 - abar) x_t + sqrt(abar) v.

  `x_t`, `v`: `[B, ...]` float32; `t`: int `[B]` in [0, T). Returns `[B, ...]`.
  """
  _check_t(d, t, x_t)
  _check_like("v", v, "x_t", x_t)
  n = x_t.ndim
  return (extract(d.sqrt_one_minus_alphas_cumprod, t, n) * x_t +
          extract(d.sqrt_alphas_cumprod, t, n) * v)


# ---------------------------------------------------------------------------
# The reverse process p


def p_mean_variance(d: GaussianDiffusion, model_output, x_t, t,
                    clip_denoised: bool = True) -> dict:
  """p(x_{t-1} | x_t) from a raw model output.

  Args:
    d: the process.
    model_output: `[B, ..., C]`, or `[B, ..., 2C]` for learned variances (the
      first C channels the mean parameterisation, the rest the variance).
    x_t: `[B, ..., C]` float32.
    t: int `[B]` in [0, T).
    clip_denoised: clip the predicted x_0 to [-1, 1] (for sampling and the
      bound, not for the training KL).

  Returns:
    dict with `mean`, `pred_xstart` (`[B, ..., C]`), and `variance`,
    `log_variance` (`[B, ..., C]` when learned, else `[B, 1, ..., 1]`). For
    fixedsmall, `variance` is 0 at t = 0 while `log_variance` is clipped to
    the t = 1 value, as in the original code.
  """
  _check_t(d, t, x_t)
  n = x_t.ndim
  mean_out, var_out = _split_output(d, model_output, x_t)
  if d.model_var_type == "learned":
    log_variance = var_out
  elif d.model_var_type == "learned_range":
    # The output in [-1, 1] interpolates between the two extremes of Ho et al.
    min_log = extract(d.posterior_log_variance_clipped, t, n)
    max_log = extract(jnp.log(d.betas), t, n)
    frac = (var_out + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
  elif d.model_var_type == "fixedlarge":
    log_variance = extract(jnp.log(d.fixedlarge_variance), t, n)
  else:  # fixedsmall
    log_variance = extract(d.posterior_log_variance_clipped, t, n)
  if d.model_var_type == "fixedsmall":
    # The true posterior variance, 0 at t = 0 (only its log is clipped).
    variance = extract(d.posterior_variance, t, n)
  else:
    variance = jnp.exp(log_variance)

  if d.model_mean_type == "eps":
    pred_xstart = predict_xstart_from_eps(d, x_t, t, mean_out)
  elif d.model_mean_type == "v":
    pred_xstart = predict_xstart_from_v(d, x_t, t, mean_out)
  else:  # x0
    pred_xstart = mean_out
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x_t, t)
  return dict(mean=mean, variance=variance, log_variance=log_variance,
              pred_xstart=pred_xstart)


# ---------------------------------------------------------------------------
# Likelihood terms


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

  Args:
    mean1, logvar1, mean2, logvar2: float arrays broadcastable to one shape
      (e.g. `[B, ...]` means and `[B, 1, ..., 1]` log-variances).

  Returns:
    The broadcast shape, float32 (or wider if an input is).
  """
  mean1, logvar1, mean2, logvar2 = map(_at_least_float32,
                                       (mean1, logvar1, mean2, logvar2))
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) of data discretised to 256 bins of width 2/255 over [-1, 1].

  Args:
    x: `[B, ...]` data, exactly on the bin centres (uint8 / 127.5 - 1).
    means, log_scales: the Gaussian's mean and log standard deviation,
      broadcastable to `x`.

  Returns:
    `[B, ...]` log-probabilities in nats. The edge bins take the Gaussian's
    tails (x < -0.999: everything below; x > 0.999: everything above); a floor
    of 1e-12 keeps the log finite. Uses the exact normal CDF (the original
    code used a tanh approximation of it), and a bin above the mean is
    measured with the upper tail, 1 - ndtr(z) = ndtr(-z), so that it keeps
    the same precision as its mirror image below the mean (CDF(upper) -
    CDF(lower) of two values near 1 cancels). Computed in at least float32
    whatever the inputs' dtypes (in bfloat16, 0.999 rounds to 1, which would
    move the edge bins of bfloat16 data into the interior formula).
  """
  for name, a in (("means", means), ("log_scales", log_scales)):
    try:
      fits = np.broadcast_shapes(jnp.shape(a), jnp.shape(x)) == jnp.shape(x)
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(f"{name} must broadcast to x's shape {jnp.shape(x)}, "
                       f"got {jnp.shape(a)}.")
  dtype = jnp.result_type(x, means, log_scales, jnp.float32)
  x, means, log_scales = (jnp.asarray(a, dtype) for a in (x, means, log_scales))
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  upper = inv_std * (centered + 1.0 / 255.0)
  lower = inv_std * (centered - 1.0 / 255.0)
  cdf_upper = jax.scipy.special.ndtr(upper)
  cdf_lower = jax.scipy.special.ndtr(lower)
  # Tails in log space directly: 1 - ndtr(z) = ndtr(-z) keeps precision.
  log_cdf_upper = jnp.log(jnp.maximum(cdf_upper, 1e-12))
  log_one_minus_cdf_lower = jnp.log(
      jnp.maximum(jax.scipy.special.ndtr(-lower), 1e-12))
  delta = jnp.where(centered > 0,
                    jax.scipy.special.ndtr(-lower) - jax.scipy.special.ndtr(-upper),
                    cdf_upper - cdf_lower)
  log_delta = jnp.log(jnp.maximum(delta, 1e-12))
  return jnp.where(x < -0.999, log_cdf_upper,
                   jnp.where(x > 0.999, log_one_minus_cdf_lower, log_delta))


def vb_terms_bpd(d: GaussianDiffusion, model_output, x_start, x_t, t,
                 clip_denoised: bool = True):
  """One term of the variational bound, in bits per dimension.

  L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the
  decoder NLL -log p(x_0 | x_1) at t = 0.

  Returns:
    (`[B]` float32 bits/dim, pred_xstart `[B, ...]`).
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(d, x_start, x_t, t)
  out = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"],
                           out["log_variance"])) / math.log(2.0)
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x_start, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl), out["pred_xstart"]


def prior_bpd(d: GaussianDiffusion, x_start):
  """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, `[B]`."""
  t = jnp.full(x_start.shape[:1], d.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(d, x_start, t)
  kl = normal_kl(mean, log_variance, 0.0, 0.0)
  return mean_flat(kl) / math.log(2.0)


# ---------------------------------------------------------------------------
# Training


def training_losses(d: GaussianDiffusion, model_fn: ModelFn, x_start, t,
                    noise) -> dict:
  """Per-example training losses at timesteps `t`.

  Args:
    d: the process (its `loss_type` picks the loss).
    model_fn: `model_fn(x_t, t) -> output`, the raw network output.
    x_start: `[B, ...]` float32 data in [-1, 1].
    t: int `[B]` timesteps in [0, T).
    noise: standard normal, shaped like `x_start`.

  Returns:
    dict with `loss` float32 `[B]` and its parts: `mse` `[B]` (for mse and
    hybrid: the mean squared error of the mean parameterisation) and `vb`
    `[B]` (for kl and hybrid: the bound term L_t in bits/dim; for hybrid
    already weighted by T/1000).
  """
  _check_t(d, t, x_start)
  x_t = q_sample(d, x_start, t, noise)
  model_output = call_model(d, model_fn, x_t, t)
  mean_out, var_out = _split_output(d, model_output, x_t)
  terms = {}
  if d.loss_type == "kl":
    terms["vb"], _ = vb_terms_bpd(d, model_output, x_start, x_t, t,
                                  clip_denoised=False)
    terms["loss"] = terms["vb"]
    return terms

  target = {"eps": noise, "x0": x_start,
            "v": get_v(d, x_start, noise, t)}[d.model_mean_type]
  terms["mse"] = mean_flat(jnp.square(target - mean_out))
  terms["loss"] = terms["mse"]
  if d.loss_type == "hybrid":
    if var_out is None:
      raise ValueError(
          "loss_type 'hybrid' trains learned variances; use model_var_type "
          "'learned' or 'learned_range'.")
    # The VB term trains only the variance: the mean is left to the MSE.
    frozen = jnp.concatenate(
        [jax.lax.stop_gradient(mean_out), var_out], axis=-1)
    vb, _ = vb_terms_bpd(d, frozen, x_start, x_t, t, clip_denoised=False)
    # Weighted so the bound is on the scale of the per-step sum (Nichol &
    # Dhariwal use T/1000 with lambda = 0.001 folded in).
    terms["vb"] = vb * (d.original_num_timesteps / 1000.0)
    terms["loss"] = terms["mse"] + terms["vb"]
  return terms


# ---------------------------------------------------------------------------
# The full bound


def calc_bpd_loop(d: GaussianDiffusion, model_fn: ModelFn, x_start, rng,
                  clip_denoised: bool = True) -> dict:
  """The full variational bound of `x_start` in bits per dimension.

  Evaluates every term L_0 .. L_{T-1} with fresh noise (`fold_in(rng, t)`) in
  one `lax.scan` over t, so under `jit` the whole bound is one compiled program.

  Args:
    x_start: `[B, ...]` data on the 256 bin centres of [-1, 1].
    rng: a PRNG key, or one key per example (`[B]` typed or `[B, 2]` raw), so
      that an example's bound does not depend on the batch it is in.

  Returns:
    dict of float32: `total_bpd` `[B]` (prior + sum of all terms), `prior_bpd`
    `[B]`, `vb` `[B, T]` (vb[:, 0] is the decoder NLL L_0), `xstart_mse`
    `[B, T]` and `mse` `[B, T]` (of the implied eps).
  """
  batch = x_start.shape[0]
  # At least float32: bfloat16/float16 noise would be coarsely quantised.
  noise_dtype = jnp.promote_types(x_start.dtype, jnp.float32)

  def term(_, t_scalar):
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    noise = keys.normal(keys.fold_in(rng, t_scalar), x_start.shape, noise_dtype)
    x_t = q_sample(d, x_start, t, noise)
    output = call_model(d, model_fn, x_t, t)
    vb, pred_xstart = vb_terms_bpd(d, output, x_start, x_t, t,
                                   clip_denoised=clip_denoised)
    eps = predict_eps_from_xstart(d, x_t, t, pred_xstart)
    return None, (vb, mean_flat(jnp.square(pred_xstart - x_start)),
                  mean_flat(jnp.square(eps - noise)))

  _, (vb, xstart_mse, mse) = jax.lax.scan(
      term, None, jnp.arange(d.num_timesteps, dtype=jnp.int32))
  prior = prior_bpd(d, x_start)
  vb, xstart_mse, mse = vb.T, xstart_mse.T, mse.T  # [T, B] -> [B, T]
  return dict(total_bpd=jnp.sum(vb, axis=1) + prior, prior_bpd=prior, vb=vb,
              xstart_mse=xstart_mse, mse=mse)
