"""Oracle models with known answers, shared by the math and sampler tests."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ddpm_jax import diffusion as D

MU, S = 0.3, 0.2
# The data are discretised to the 256 bin centres; its variance grows by w^2/12.
S2_EFF = S**2 + (2 / 255)**2 / 12


def gaussian_oracle(d_train, learned_var=False):
  """The exact denoiser for data N(MU, S2_EFF) per dimension.

  With learned_var the model also outputs the exact log-variance of the true
  reverse step q(x_{t-1} | x_t) = ∫ q(x_{t-1} | x_t, x_0) q(x_0 | x_t) dx_0, so
  the reverse process is exact. Indexed by the original process's timesteps.
  """
  def model_fn(x_t, t):
    n = x_t.ndim
    abar = D.extract(d_train.alphas_cumprod, t, n)
    var_t = abar * S2_EFF + 1 - abar
    x0_mean = MU + jnp.sqrt(abar) * S2_EFF / var_t * (x_t - jnp.sqrt(abar) * MU)
    if not learned_var:
      eps = (x_t - jnp.sqrt(abar) * x0_mean) / jnp.sqrt(1 - abar)
      return eps
    x0_var = S2_EFF * (1 - abar) / var_t
    coef1 = D.extract(d_train.posterior_mean_coef1, t, n)
    post_var = D.extract(d_train.posterior_variance, t, n)
    log_var = jnp.log(post_var + coef1**2 * x0_var)
    return jnp.concatenate([x0_mean, jnp.broadcast_to(log_var, x0_mean.shape)],
                           axis=-1)
  return model_fn


def discretized_gaussian_data(key, shape):
  x = MU + S * jax.random.normal(key, shape)
  return jnp.clip(jnp.round((x + 1) * 127.5), 0, 255) / 127.5 - 1


def discretized_entropy_bits():
  bins = np.arange(256) / 127.5 - 1
  edges = np.concatenate([[-np.inf], bins[:-1] + 1 / 255, [np.inf]])
  p = np.diff(stats.norm.cdf(edges, loc=MU, scale=S))
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


def conv3x3_f64(x, kernel, bias):
  """SAME 3x3 convolution in float64 numpy: x [B,H,W,Ci], kernel [3,3,Ci,Co]."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for di in range(3):
    for dj in range(3):
      out += np.einsum("bhwc,cd->bhwd", xp[:, di:di + h, dj:dj + w],
                       kernel[di, dj])
  return out + bias
