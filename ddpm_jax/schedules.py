"""Noise schedules: the betas of the forward process, in float64.

The names and formulas follow the original DDPM code (Ho et al. 2020), plus the
cosine schedule of improved DDPM (Nichol & Dhariwal 2021). Everything here is
host-side numpy in float64; `GaussianDiffusion.create` derives its constants
from these betas, still in float64, before storing them as float32.
"""
import math

import numpy as np

SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")


def _warmup(beta_start: float, beta_end: float, num_timesteps: int,
            warmup_frac: float) -> np.ndarray:
  betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(
      beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
  """alpha_bar(u) = cos^2(pi/2 (u + s) / (1 + s)) for u in [0, 1] (unnormalised)."""
  return np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2


def get_beta_schedule(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
                      beta_end: float = 0.02, cosine_s: float = 0.008,
                      max_beta: float = 0.999) -> np.ndarray:
  """Returns the betas of a named schedule.

  Args:
    name: one of `SCHEDULES`.
    num_timesteps: T, the number of diffusion steps (> 0).
    beta_start, beta_end: endpoints of the linear/quad/warmup schedules;
      `const` uses `beta_end` everywhere. Ignored by `jsd` and `cosine`.
    cosine_s: the offset s of the cosine schedule.
    max_beta: the cap of the cosine schedule's betas (0.999 avoids the
      singularity at the end of the chain).

  Returns:
    float64 `[T]` array of betas in (0, 1].

  Raises:
    ValueError: an unknown name, T not a positive int, or endpoints that give
      betas outside (0, 1].
  """
  if name not in SCHEDULES:
    raise ValueError(
        f"Unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
  if (isinstance(num_timesteps, bool)  # True would be T = 1
      or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1):
    raise ValueError(
        f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
  t = int(num_timesteps)
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, t, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, t, dtype=np.float64)**2
  elif name == "const":
    betas = np.full(t, beta_end, dtype=np.float64)
  elif name == "jsd":
    # 1/T, 1/(T-1), ..., 1: the schedule of Sohl-Dickstein et al. 2015.
    betas = 1.0 / np.linspace(t, 1, t, dtype=np.float64)
  elif name == "warmup10":
    betas = _warmup(beta_start, beta_end, t, 0.1)
  elif name == "warmup50":
    betas = _warmup(beta_start, beta_end, t, 0.5)
  else:  # cosine
    if not 0.0 < max_beta <= 1.0:
      raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}.")
    if not cosine_s >= 0.0:
      raise ValueError(f"cosine_s must be >= 0 (improved DDPM: 0.008), got "
                       f"{cosine_s}.")
    u = np.arange(t + 1, dtype=np.float64) / t
    alpha_bar = cosine_alpha_bar(u, cosine_s)
    betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
  if not (np.all(betas > 0) and np.all(betas <= 1)):
    raise ValueError(
        f"Schedule {name!r} with beta_start={beta_start}, beta_end={beta_end} "
        "gives betas outside (0, 1]; use 0 < beta_start, beta_end <= 1.")
  return betas
