"""Guidance and inpainting samplers, with exact oracles of Gaussian data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S
from ddpm_jax import schedules

T = 1000
N = 8192


def make(var="fixedsmall", steps=T):
  return D.GaussianDiffusion.create(
      schedules.get_beta_schedule("linear", steps), model_var_type=var,
      loss_type="hybrid" if var.startswith("learned") else "mse")


def test_classifier_free_guidance_mixes_in_one_batched_call():
  calls = []

  def apply_fn(x, t, y):
    calls.append(x.shape)
    # Output depends on the label: "no class" (10) gives 0, class k gives k.
    val = jnp.where(y == 10, 0.0, y.astype(jnp.float32) + 1.0)[:, None]
    return jnp.concatenate([x * 0 + val, x * 0 - 7.0], axis=-1)  # 2C channels

  y = jnp.array([0, 3])
  fn = S.classifier_free_guidance(apply_fn, y, null_label=10, scale=2.5)
  out = fn(jnp.ones((2, 3)), jnp.array([5, 6]))
  assert calls == [(4, 3)]  # one network call on the doubled batch
  # (1 + w) cond - w uncond on the mean channels; variance channels untouched.
  np.testing.assert_allclose(out[:, :3], np.broadcast_to([[3.5], [14.0]], (2, 3)))
  np.testing.assert_allclose(out[:, 3:], -7.0)
  fn0 = S.classifier_free_guidance(apply_fn, y, null_label=10, scale=0.0)
  np.testing.assert_allclose(fn0(jnp.ones((2, 3)), jnp.array([5, 6]))[:, 0],
                             [1.0, 4.0])


def test_classifier_guidance_gradient_of_a_linear_classifier():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 4)).astype(np.float32)
  x = rng.normal(size=(3, 2, 3)).astype(np.float32)
  y = np.array([0, 3, 1])
  classifier = lambda x, t: x.reshape(x.shape[0], -1) @ w
  g = S.classifier_guidance(classifier, jnp.asarray(y), 2.0)(
      jnp.asarray(x), jnp.zeros((3,), jnp.int32))
  logits = x.reshape(3, -1).astype(np.float64) @ w
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ref = 2.0 * (w[:, y].T - p @ w.T)  # s * d/dx log softmax(W^T x)_y
  np.testing.assert_allclose(g.reshape(3, -1), ref, rtol=1e-5, atol=1e-6)


def test_guidance_shifts_the_mean_by_the_variance_times_the_gradient():
  d = make()
  x = jax.random.normal(jax.random.key(0), (4, 3))
  t = jnp.array([0, 1, 50, 999])
  model = lambda x, t: 0.3 * x
  g = lambda x, t: jnp.full_like(x, 0.7)
  key = jax.random.key(1)
  plain = S.p_sample(d, model, x, t, key)["sample"]
  guided = S.p_sample(d, model, x, t, key, cond_fn=g)["sample"]
  var = np.asarray(d.posterior_variance)[np.asarray(t)]
  np.testing.assert_allclose(guided - plain, 0.7 * var[:, None] *
                             np.ones((4, 3)), rtol=1e-4, atol=1e-7)
  # DDIM: the score shift eps - sqrt(1 - abar) g (Dhariwal & Nichol, Alg. 2).
  dd = S.ddim_sample(d, model, x, t, key, clip_denoised=False, cond_fn=g)
  abar = np.asarray(d.alphas_cumprod, np.float64)[np.asarray(t)][:, None]
  abar_prev = np.asarray(d.alphas_cumprod_prev, np.float64)[np.asarray(t)][:, None]
  eps = 0.3 * np.asarray(x) - np.sqrt(1 - abar) * 0.7
  x0 = (np.asarray(x) - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
  ref = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev) * eps
  np.testing.assert_allclose(dd["sample"], ref, rtol=2e-4, atol=2e-4)


# Two classes of data, N(m_y, S^2) each, equally likely.
M = jnp.array([[-0.5, 0.5]])
SD = 0.2


def mixture_parts(d, x, t):
  """Per-class log N(x_t; sqrt(abar) m_y, abar S^2 + 1 - abar) and eps `[B, 2]`."""
  a = d.alphas_cumprod[t][:, None]
  v = a * SD**2 + 1 - a
  logp = -0.5 * (x - jnp.sqrt(a) * M)**2 / v - 0.5 * jnp.log(v)
  return logp, jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * M) / v


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_classifier_guidance_with_the_exact_classifier_samples_the_class(sampler):
  d = make()

  def uncond(x, t):  # the optimal eps of the mixture
    logp, eps = mixture_parts(d, x, t)
    return jnp.sum(jax.nn.softmax(logp, axis=1) * eps, axis=1, keepdims=True)

  classifier = lambda x, t: mixture_parts(d, x, t)[0]  # exact p(y | x_t)
  y = jnp.ones((N,), jnp.int32)
  cond_fn = S.classifier_guidance(classifier, y, 1.0)
  x = jax.jit(lambda k: S.sample_steps(
      d, uncond, S.prior_sample(d, k, (N, 1)), k, T, 0, sampler=sampler,
      clip_denoised=False, cond_fn=cond_fn))(jax.random.key(2))
  x = np.asarray(x, np.float64)
  # p(x | y) = N(0.5, 0.04): scale 1 with the exact classifier samples it.
  assert abs(x.mean() - 0.5) < 0.01 and abs(x.var() / SD**2 - 1) < 0.05
  unguided = S.sample_steps(d, uncond, S.prior_sample(d, jax.random.key(2),
                                                      (N, 1)),
                            jax.random.key(2), T, 0, sampler=sampler,
                            clip_denoised=False)
  assert abs(float((unguided > 0).mean()) - 0.5) < 0.03  # both classes


# Inpainting: 2-D correlated Gaussian data, the first coordinate known.
MU = jnp.array([0.2, -0.1])
S2, RHO = 0.3**2, 0.9
SIGMA = S2 * jnp.array([[1.0, RHO], [RHO, 1.0]])


def correlated_oracle(d):
  def model_fn(x, t):
    def one(xi, ai):
      a_mat = ai * SIGMA + (1 - ai) * jnp.eye(2)
      x0 = MU + jnp.sqrt(ai) * SIGMA @ jnp.linalg.solve(a_mat, xi - jnp.sqrt(ai) * MU)
      return (xi - jnp.sqrt(ai) * x0) / jnp.sqrt(1 - ai)
    return jax.vmap(one)(x, d.alphas_cumprod[t])
  return model_fn


def inpaint(d, resample, key):
  a0 = 0.5
  known = jnp.broadcast_to(jnp.array([a0, 0.0]), (N, 2))
  mask = jnp.array([[1.0, 0.0]])  # same rank as x, broadcast over the batch
  return jax.jit(lambda k: S.sample_steps(
      d, correlated_oracle(d), S.prior_sample(d, k, (N, 2)), k,
      d.num_timesteps, 0, clip_denoised=False, known=known, known_mask=mask,
      resample=resample))(key)


def test_inpainting_keeps_known_pixels_and_resampling_fills_the_conditional():
  d = make()
  cond_mean = float(MU[1] + RHO * (0.5 - MU[0]))  # 0.17
  cond_var = S2 * (1 - RHO**2)  # 0.0171
  plain = np.asarray(inpaint(d, 1, jax.random.key(3)), np.float64)
  np.testing.assert_array_equal(plain[:, 0], np.float32(0.5))  # exactly known
  repaint = np.asarray(inpaint(d, 5, jax.random.key(3)), np.float64)
  np.testing.assert_array_equal(repaint[:, 0], np.float32(0.5))
  # Plain replacement is known to ignore much of the correlation (measured:
  # mean 0.087 for 0.17); RePaint's resampling harmonises the two regions
  # (measured: mean 0.155, variance 0.0166 for 0.0171).
  assert abs(plain[:, 1].mean() - cond_mean) > 0.05
  assert abs(repaint[:, 1].mean() - cond_mean) < 0.025
  assert abs(repaint[:, 1].var() / cond_var - 1) < 0.1


def test_inpainting_input_errors():
  d = make(steps=10)
  x = jnp.zeros((2, 3))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="both"):
    S.sample_steps(d, lambda x, t: x, x, key, 10, 0, known=x)
  with pytest.raises(ValueError, match="resample=3"):
    S.sample_steps(d, lambda x, t: x, x, key, 10, 0, resample=3)
  with pytest.raises(ValueError, match=r"known has shape \(2, 4\)"):
    S.sample_steps(d, lambda x, t: x, x, key, 10, 0, known=jnp.zeros((2, 4)),
                   known_mask=jnp.ones((2, 4)))
