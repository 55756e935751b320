"""Samplers of the reverse process: ancestral (DDPM), DDIM, and respacing.

Every chain runs inside one compiled `lax` loop. `sample_steps` runs any
contiguous stretch of a chain, so a command-line tool can advance a progress
bar between compiled chunks; the per-step noise comes from `fold_in(rng, t)`,
so a chain run in chunks equals the chain run whole.

Errors: as in `ddpm_jax.diffusion` (ValueError for bad names, levels, shapes
and options such as DDIM's eta outside [0, 1], checked when concrete;
TypeError for an `rng` that is not a PRNG key).

RNG: `rng` is one key for the whole batch, or a batch of keys (`[B]` typed
keys or `[B, 2]` raw keys), one per example, so that an example's sample does
not depend on the batch it was drawn in.
"""
import operator
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion as diff
from ddpm_jax import keys
from ddpm_jax.diffusion import GaussianDiffusion, ModelFn

SAMPLERS = ("ancestral", "ddim")

# cond_fn(x_t, t) -> gradient shaped like x_t (classifier guidance).
CondFn = Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# One step of each sampler


def p_sample(d: GaussianDiffusion, model_fn: ModelFn, x, t, rng,
             clip_denoised: bool = True, cond_fn: Optional[CondFn] = None
             ) -> dict:
  """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t).

  Args:
    x: `[B, ...]` float32; t: int32 `[B]`; rng: key(s) for the step's noise.
    cond_fn: classifier guidance, `cond_fn(x_t, t) -> s * grad log p(y | x_t)`
      (see `classifier_guidance`); shifts the mean by variance * cond_fn.

  Returns:
    dict with `sample` (no noise is added where t == 0) and `pred_xstart`.
  """
  out = diff.p_mean_variance(d, diff.call_model(d, model_fn, x, t), x, t,
                             clip_denoised=clip_denoised)
  mean = out["mean"]
  if cond_fn is not None:
    # Dhariwal & Nichol 2021, Algorithm 1: mu + s Sigma grad log p(y | x_t).
    mean = mean + out["variance"] * diff.call_model(d, cond_fn, x, t)
  # In the mean's dtype (float32 for a bfloat16/float16 x): the noise is
  # never quantised to the state's precision.
  noise = keys.normal(rng, x.shape, mean.dtype)
  nonzero = diff.extract((jnp.arange(d.num_timesteps) != 0).astype(x.dtype),
                         t, x.ndim)
  sample = mean + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
  return dict(sample=sample, pred_xstart=out["pred_xstart"])


def check_eta(eta) -> None:
  """Raises ValueError unless DDIM's eta lies in [0, 1] (when concrete).

  Above 1 the step's noise exceeds what the marginals allow: 1 - abar_prev -
  sigma^2 turns negative near t = 0 and its square root NaN.
  """
  if jnp.ndim(eta) != 0:
    raise ValueError(f"eta must be a scalar (one noise scale for every "
                     f"example), got shape {jnp.shape(eta)}.")
  try:
    value = float(eta)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return  # traced: values are unknown until run time
  if not 0.0 <= value <= 1.0:
    raise ValueError(
        f"eta={eta} is outside [0, 1]: DDIM's noise scale runs from 0 "
        "(deterministic) to 1 (the ancestral step's variance); above 1 the "
        "step's variance exceeds what the process allows and the samples "
        "turn NaN.")


def ddim_sample(d: GaussianDiffusion, model_fn: ModelFn, x, t, rng,
                eta: float = 0.0, clip_denoised: bool = True,
                cond_fn: Optional[CondFn] = None) -> dict:
  """One DDIM step (Song et al. 2021) x_t -> x_{t-1}; eta = 0 is deterministic.

  Args:
    x: `[B, ...]` float32; t: int32 `[B]`; rng: key(s) for the step's noise
      (unused at eta = 0).
    eta: the noise scale in [0, 1]: 0 deterministic, 1 the ancestral
      step's variance (checked when concrete).
    cond_fn: classifier guidance: shifts the score, eps -= sqrt(1 - abar) *
      cond_fn(x_t, t), as in Dhariwal & Nichol 2021, Algorithm 2.

  Returns:
    dict with `sample` x_{t-1} and `pred_xstart`, both `[B, ...]` float32.
  """
  check_eta(eta)
  out = diff.p_mean_variance(d, diff.call_model(d, model_fn, x, t), x, t,
                             clip_denoised=clip_denoised)
  n = x.ndim
  # The eps implied by the (possibly clipped) x_0 keeps the step consistent.
  eps = diff.predict_eps_from_xstart(d, x, t, out["pred_xstart"])
  if cond_fn is not None:
    eps = eps - (diff.extract(d.sqrt_one_minus_alphas_cumprod, t, n) *
                 diff.call_model(d, cond_fn, x, t))
    # Where abar_t = 0 (a schedule whose last beta is 1) x_t holds no trace
    # of x_0: 1/sqrt(abar) is infinite, and the model's own x_0 is kept. The
    # guided x_0 is computed there at t = 0 instead: its infinite factor
    # would make the gradient through the unused branch NaN (0 * inf).
    informative = d.alphas_cumprod[t] > 0
    guided = diff.predict_xstart_from_eps(
        d, x, jnp.where(informative, t, 0), eps)
    out["pred_xstart"] = jnp.where(
        informative.reshape((-1,) + (1,) * (n - 1)), guided,
        out["pred_xstart"])
  abar = diff.extract(d.alphas_cumprod, t, n)
  abar_prev = diff.extract(d.alphas_cumprod_prev, t, n)
  sigma = (eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) *
           jnp.sqrt(1.0 - abar / abar_prev))
  mean = (out["pred_xstart"] * jnp.sqrt(abar_prev) +
          jnp.sqrt(1.0 - abar_prev - jnp.square(sigma)) * eps)
  noise = keys.normal(rng, x.shape, mean.dtype)  # not quantised to x's dtype
  nonzero = diff.extract((jnp.arange(d.num_timesteps) != 0).astype(x.dtype),
                         t, n)
  return dict(sample=mean + nonzero * sigma * noise,
              pred_xstart=out["pred_xstart"])


def ddim_reverse_sample(d: GaussianDiffusion, model_fn: ModelFn, x, t,
                        clip_denoised: bool = False) -> dict:
  """One deterministic DDIM step forward in time, x_t -> x_{t+1} (encoding)."""
  out = diff.p_mean_variance(d, diff.call_model(d, model_fn, x, t), x, t,
                             clip_denoised=clip_denoised)
  n = x.ndim
  eps = diff.predict_eps_from_xstart(d, x, t, out["pred_xstart"])
  abar_next = diff.extract(
      jnp.append(d.alphas_cumprod[1:], 0.0), t, n)
  sample = (out["pred_xstart"] * jnp.sqrt(abar_next) +
            jnp.sqrt(1.0 - abar_next) * eps)
  return dict(sample=sample, pred_xstart=out["pred_xstart"])


# ---------------------------------------------------------------------------
# Chains


def sample_steps(d: GaussianDiffusion, model_fn: ModelFn, x, rng, t_start,
                 t_end, *, sampler: str = "ancestral", eta: float = 0.0,
                 clip_denoised: bool = True, cond_fn: Optional[CondFn] = None,
                 known=None, known_mask=None, resample: int = 1):
  """Runs the reverse steps t = t_start - 1, ..., t_end: x_{t_start} -> x_{t_end}.

  A full chain is `t_start = T, t_end = 0` from x_T ~ N(0, I). `t_start` and
  `t_end` may be traced, so one compiled function serves every chunk of a
  chain; step t draws its noise from `fold_in(rng, t)`.

  Args:
    x: `[B, ...]`, the state at level t_start; any float dtype (the chain
      runs in float32: a bfloat16 state would lose the small steps).
    rng: key(s) of the chain (see the module docstring).
    t_start, t_end: ints with 0 <= t_end <= t_start <= T: Python ints or
      int arrays of shape (); checked when concrete (traced ones cannot be).
    sampler: 'ancestral' or 'ddim'.
    eta: DDIM's noise scale in [0, 1] (0: deterministic); ignored by
      'ancestral'. ValueError outside [0, 1] (when concrete).
    clip_denoised: clip the predicted x_0 to [-1, 1].
    cond_fn: classifier guidance (see `classifier_guidance`).
    known, known_mask: inpainting. `known` `[B, ...]` in [-1, 1] holds the
      known pixels where `known_mask` is 1 (of x's rank, broadcastable to
      it; 1 = known, 0 = to fill). After every step the known pixels are replaced by the
      known image noised to the step's level, and at the end by the known
      image itself (the "replacement" method).
    resample: RePaint's resampling (Lugmayr et al. 2022) with jump length 1:
      each step is done `resample` times, going back up by
      q(x_t | x_{t-1}) in between, so the filled region harmonises with the
      known one. Needs `known`.

  Returns:
    `[B, ...]` float32, the state at level t_end.
  """
  if sampler not in SAMPLERS:
    raise ValueError(
        f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
  check_eta(eta)
  levels = {}
  for name, value in (("t_start", t_start), ("t_end", t_end)):
    if (jnp.ndim(value) != 0 or
        not jnp.issubdtype(jnp.result_type(value), jnp.integer)):
      raise ValueError(
          f"{name} must be a scalar integer (a Python int or an int array of "
          f"shape ()), got {value!r}.")
    try:
      levels[name] = int(value)
    except (jax.errors.TracerIntegerConversionError,
            jax.errors.ConcretizationTypeError):
      continue  # traced: checked only when concrete
    if not 0 <= levels[name] <= d.num_timesteps:
      raise ValueError(
          f"{name}={levels[name]} out of range 0..{d.num_timesteps} (levels: "
          f"t_start = T = {d.num_timesteps} is pure noise, 0 the data).")
  if len(levels) == 2 and levels["t_end"] > levels["t_start"]:
    raise ValueError(
        f"t_end={levels['t_end']} > t_start={levels['t_start']}: the chain "
        "runs backwards in time, from level t_start down to t_end.")
  x = jnp.asarray(x, jnp.float32)
  if (known is None) != (known_mask is None):
    raise ValueError("Inpainting needs both `known` and `known_mask`.")
  if known is not None and jnp.shape(known) != x.shape:
    raise ValueError(f"known has shape {jnp.shape(known)}, expected {x.shape}.")
  if known_mask is not None and (
      jnp.ndim(known_mask) != x.ndim
      or any(m not in (1, s) for m, s in zip(jnp.shape(known_mask), x.shape))):
    raise ValueError(
        f"known_mask has shape {jnp.shape(known_mask)}; it must have x's rank "
        f"and broadcast to x's shape {x.shape} (each axis 1 or x's size), "
        f"e.g. {x.shape[:-1] + (1,)}.")
  try:
    resample = operator.index(resample)
  except TypeError:
    raise ValueError(f"resample must be an int, got {resample!r}.") from None
  if resample < 1 or (resample > 1 and known is None):
    raise ValueError(f"resample={resample}: must be >= 1, and > 1 only with "
                     "inpainting (`known`).")
  batch, n = x.shape[0], x.ndim

  def step(x, t_b, key):
    if sampler == "ancestral":
      x_prev = p_sample(d, model_fn, x, t_b, key, clip_denoised,
                        cond_fn)["sample"]
    else:
      x_prev = ddim_sample(d, model_fn, x, t_b, key, eta, clip_denoised,
                           cond_fn)["sample"]
    if known is None:
      return x_prev
    # The known region at level t - 1 (abar_prev = 1 at t = 0: exact).
    abar_prev = diff.extract(d.alphas_cumprod_prev, t_b, n)
    noised = (jnp.sqrt(abar_prev) * known + jnp.sqrt(1.0 - abar_prev) *
              keys.normal(keys.fold_in(key, 1), x.shape, x.dtype))
    return known_mask * noised + (1.0 - known_mask) * x_prev

  def body(i, x):
    t = t_start - 1 - i
    t_b = jnp.full((batch,), t, dtype=jnp.int32)
    key = keys.fold_in(rng, t)

    def jump_back(r, x):
      x_prev = step(x, t_b, keys.fold_in(keys.fold_in(key, 2), r))
      beta = diff.extract(d.betas, t_b, n)
      z = keys.normal(keys.fold_in(keys.fold_in(key, 3), r), x.shape, x.dtype)
      return jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * z

    if resample > 1:
      x = jax.lax.fori_loop(0, resample - 1, jump_back, x)
    return step(x, t_b, key)

  return jax.lax.fori_loop(0, t_start - t_end, body, x)


# ---------------------------------------------------------------------------
# Guidance


def classifier_free_guidance(apply_fn: Callable, y, null_label: int,
                             scale: float) -> ModelFn:
  """A model_fn that mixes conditional and unconditional predictions.

  eps = (1 + w) eps(x, y) - w eps(x, no class) (Ho & Salimans 2022), with
  both evaluations in one batched network call. For learned variances only
  the first C channels (the mean parameterisation) are mixed; the variance
  channels come from the conditional prediction.

  Args:
    apply_fn: `apply_fn(x, t, y) -> output` of a class-conditional network.
    y: int32 `[B]` class labels.
    null_label: the "no class" id (the model's `num_classes`).
    scale: w >= 0; 0 is plain conditional sampling.
  """
  def model_fn(x, t):
    b, c = x.shape[0], x.shape[-1]
    out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([y, jnp.full_like(y, null_label)]))
    cond, uncond = out[:b], out[b:]
    guided = (1.0 + scale) * cond[..., :c] - scale * uncond[..., :c]
    return jnp.concatenate([guided, cond[..., c:]], axis=-1)
  return model_fn


def classifier_guidance(classifier_fn: Callable, y, scale: float) -> CondFn:
  """`cond_fn(x_t, t) = s * grad_x log p(y | x_t, t)` for `p_sample`/`ddim_sample`.

  Args:
    classifier_fn: `classifier_fn(x_t, t) -> logits [B, K]`, a noise-aware
      classifier taking the original process's timesteps.
    y: int32 `[B]` target classes.
    scale: s, the guidance scale.
  """
  def log_prob(x, t):
    logp = jax.nn.log_softmax(classifier_fn(x, t).astype(jnp.float32))
    return jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))

  def cond_fn(x, t):
    return scale * jax.grad(log_prob)(x, t)
  return cond_fn


def prior_sample(d: GaussianDiffusion, rng, shape: Sequence[int]):
  """x_T ~ N(0, I) `[*shape]` float32, the start of every chain drawn from `rng`.

  Uses `fold_in(rng, T)`, a key no step uses (steps fold in t in [0, T)).
  """
  return keys.normal(keys.fold_in(rng, d.num_timesteps), tuple(shape))


def p_sample_loop(d: GaussianDiffusion, model_fn: ModelFn, shape: Sequence[int],
                  rng, clip_denoised: bool = True):
  """Ancestral sampling: x_T ~ N(0, I), then T reverse steps, in one `lax` loop.

  Returns `[*shape]` float32 samples (not clipped; clip to [-1, 1] to use).
  """
  x = prior_sample(d, rng, shape)
  return sample_steps(d, model_fn, x, rng, d.num_timesteps, 0,
                      sampler="ancestral", clip_denoised=clip_denoised)


def ddim_sample_loop(d: GaussianDiffusion, model_fn: ModelFn,
                     shape: Sequence[int], rng, eta: float = 0.0,
                     clip_denoised: bool = True, noise=None):
  """DDIM sampling over every step of `d` (respace `d` to take fewer steps).

  `noise` (`[*shape]`, any float dtype) replaces the drawn x_T, e.g. a
  `ddim_reverse_sample_loop` encoding. Returns `[*shape]` float32 samples.
  """
  if noise is not None and jnp.shape(noise) != tuple(shape):
    raise ValueError(
        f"noise has shape {jnp.shape(noise)}, but the samples asked for have "
        f"shape {tuple(shape)}; pass noise of that shape (or shape="
        f"{jnp.shape(noise)}).")
  x = prior_sample(d, rng, shape) if noise is None else noise
  return sample_steps(d, model_fn, x, rng, d.num_timesteps, 0, sampler="ddim",
                      eta=eta, clip_denoised=clip_denoised)


def ddim_reverse_sample_loop(d: GaussianDiffusion, model_fn: ModelFn, x_start,
                             clip_denoised: bool = False):
  """Deterministically encodes data x_0 into x_T (the inverse of eta = 0 DDIM).

  `x_start`: `[B, ...]` data in [-1, 1], any float dtype. Returns x_T, `[B, ...]`
  float32 (the chain runs in float32), for `ddim_sample_loop(noise=...)`.
  """
  batch = x_start.shape[0]
  x_start = jnp.asarray(x_start, jnp.float32)

  def body(t, x):
    t_b = jnp.full((batch,), t, dtype=jnp.int32)
    return ddim_reverse_sample(d, model_fn, x, t_b, clip_denoised)["sample"]

  return jax.lax.fori_loop(0, d.num_timesteps, body, x_start)


# ---------------------------------------------------------------------------
# Respacing


def _is_count(text: str) -> bool:
  # ASCII digits, spaces around them allowed: int() would also take '5_0',
  # '+5', '-3' and '٥٠'.
  text = text.strip()
  return text.isascii() and text.isdigit()


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
  """The timesteps kept when respacing T steps, as in improved DDPM.

  Args:
    num_timesteps: T of the original process.
    section_counts: "ddimK" (K evenly strided steps, DDIM style); an int or
      "K" (K steps spread evenly); or "a,b,c" / a sequence (the T steps are
      cut into equal sections and section i keeps a_i evenly spaced steps).

  Returns:
    The sorted list of kept 0-based timesteps.
  """
  spec = section_counts
  if isinstance(spec, str):
    if spec.startswith("ddim"):
      if not _is_count(spec[len("ddim"):]):
        raise ValueError(
            f"Bad respacing {spec!r}: 'ddim' must be followed by a step count, "
            "as in 'ddim50'.")
      wanted = int(spec[len("ddim"):])
      if wanted < 2:
        # Strides below T, as in improved DDPM: one step (t = 0 alone) would
        # denoise pure noise at the lowest noise level.
        raise ValueError(f"Bad respacing {spec!r}: 'ddimK' needs K >= 2 steps.")
      if wanted > num_timesteps:
        raise ValueError(
            f"Respacing {spec!r} asks for {wanted} steps but the process has "
            f"only T={num_timesteps}.")
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == wanted:
          return list(range(0, num_timesteps, stride))
      raise ValueError(
          f"Cannot take exactly {wanted} evenly strided steps of "
          f"T={num_timesteps} for {spec!r}; pick another count or use "
          f"'{wanted}' (even spacing).")
    if not all(_is_count(s) for s in spec.split(",")):
      raise ValueError(
          f"Bad respacing {spec!r}: use 'K', 'a,b,c' or 'ddimK' with integer "
          "step counts.")
    counts = [int(s) for s in spec.split(",")]
  else:
    values = [spec] if np.ndim(spec) == 0 else list(spec)
    # No bools, and no floats: int(2.7) would keep 2 steps silently.
    if not all(np.asarray(c).dtype.kind in "iu" for c in values):
      raise ValueError(f"Bad respacing {spec!r}: step counts must be "
                       "integers.")
    counts = [int(c) for c in values]
  if not counts or any(c < 1 for c in counts):
    raise ValueError(f"Bad respacing {spec!r}: step counts must be >= 1.")
  if sum(counts) > num_timesteps:
    raise ValueError(
        f"Respacing {spec!r} asks for {sum(counts)} steps but the process has "
        f"only T={num_timesteps}; allowed: 1..{num_timesteps} in total.")
  size_per, extra = divmod(num_timesteps, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(
          f"Respacing {spec!r}: section {i} has {size} steps, cannot keep "
          f"{count} of them.")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    # A running float sum, rounded half to even, exactly as improved DDPM
    # does: round(j * stride) differs where the sum's rounding error crosses
    # a .5 (T=50, K=25 keeps 25 there, 24 here).
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return sorted(set(kept))


def respace(d: GaussianDiffusion, section_counts):
  """A process over a subset of the timesteps of `d`, for faster sampling.

  The kept steps' betas are recomputed as beta_i = 1 - abar_{k_i} /
  abar_{k_{i-1}}, with the alpha-bars the float64 cumulative product of `d`'s
  float32 betas, so the marginals q(x_t | x_0) of the kept steps are those of
  `d` to float32 precision; the model is fed the original timesteps. (Where
  1 - beta is small, as in the cosine schedule's last steps, the float32
  betas hold fewer digits of it: there the alpha-bars can differ from `d`'s
  stored ones by ~1e-5 relative. Taking those instead would cost the small
  betas near t = 0 three digits, which the bound's first terms need.)

  Args:
    d: a concrete (not traced) process, possibly itself respaced.
    section_counts: see `space_timesteps`.

  Returns:
    (the respaced `GaussianDiffusion`, int32 `[K]` map from its steps to the
    timesteps of the process the model was trained on). The map is stored in
    the process too, and every function here applies it before calling
    `model_fn`: pass the model itself, never a model_fn that maps again.
  """
  kept = space_timesteps(d.num_timesteps, section_counts)
  # float64 from the stored float32 betas (exactly the process `d` runs).
  abar = np.cumprod(1.0 - np.asarray(d.betas, dtype=np.float64))
  betas, last = [], 1.0
  for k in kept:
    betas.append(1.0 - abar[k] / last)
    last = abar[k]
  timestep_map = np.asarray(d.timestep_map)[kept]
  new = GaussianDiffusion.create(
      np.asarray(betas), model_mean_type=d.model_mean_type,
      model_var_type=d.model_var_type, loss_type=d.loss_type,
      timestep_map=timestep_map,
      original_num_timesteps=d.original_num_timesteps)
  return new, new.timestep_map
