"""The pure diffusion math against independent float64 computations and oracles."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import diffusion as D
from ddpm_jax import range_checks
from ddpm_jax import schedules
from oracles import (discretized_entropy_bits, discretized_gaussian_data,
                     gaussian_oracle)

T = 1000


def make(mean="eps", var="fixedlarge", loss="mse", schedule="linear", steps=T):
  return D.GaussianDiffusion.create(
      schedules.get_beta_schedule(schedule, steps), model_mean_type=mean,
      model_var_type=var, loss_type=loss)


def ref_constants(betas):
  """float64 constants written out independently of the library."""
  betas = np.asarray(betas, np.float64)
  abar = np.array([np.prod(1.0 - betas[:i + 1]) for i in range(len(betas))])
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  return betas, abar, abar_prev, post_var


# ---------------------------------------------------------------------------
# Schedules


def test_schedules_match_their_formulas():
  t = 1000
  i = np.arange(t, dtype=np.float64)
  np.testing.assert_allclose(schedules.get_beta_schedule("linear", t),
                             1e-4 + i * (0.02 - 1e-4) / (t - 1), rtol=1e-12)
  np.testing.assert_allclose(
      schedules.get_beta_schedule("quad", t),
      (1e-2 + i * (math.sqrt(0.02) - 1e-2) / (t - 1))**2, rtol=1e-12)
  np.testing.assert_allclose(schedules.get_beta_schedule("jsd", t),
                             1.0 / (t - i), rtol=1e-12)
  np.testing.assert_array_equal(schedules.get_beta_schedule("const", t), 0.02)
  w10 = schedules.get_beta_schedule("warmup10", t)
  np.testing.assert_allclose(w10[:100], np.linspace(1e-4, 0.02, 100))
  np.testing.assert_array_equal(w10[100:], 0.02)
  w50 = schedules.get_beta_schedule("warmup50", t)
  np.testing.assert_allclose(w50[:500], np.linspace(1e-4, 0.02, 500))
  np.testing.assert_array_equal(w50[500:], 0.02)
  for name in schedules.SCHEDULES:
    assert schedules.get_beta_schedule(name, t).dtype == np.float64


def test_cosine_schedule_reproduces_its_alpha_bar():
  t, s = 1000, 0.008
  betas = schedules.get_beta_schedule("cosine", t)
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2)**2
  abar = np.cumprod(1.0 - betas)
  expected = np.array([f((k + 1) / t) / f(0.0) for k in range(t)])
  uncapped = betas < 0.999
  assert betas.max() == pytest.approx(0.999)  # the cap bites at the very end
  np.testing.assert_allclose(abar[uncapped], expected[uncapped], rtol=1e-9)


def test_schedule_errors_name_the_value():
  with pytest.raises(ValueError, match="'sigmoid'.*linear"):
    schedules.get_beta_schedule("sigmoid", 10)
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.get_beta_schedule("linear", 0)
  with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
    schedules.get_beta_schedule("linear", 10, beta_end=1.5)
  # cosine's own parameters are named, not linear's beta_start/beta_end.
  with pytest.raises(ValueError, match=r"max_beta must lie in \(0, 1\], got 0.0"):
    schedules.get_beta_schedule("cosine", 10, max_beta=0.0)
  for bad in (-1.0, float("nan")):
    with pytest.raises(ValueError, match=r"cosine_s must be >= 0.*got"):
      schedules.get_beta_schedule("cosine", 10, cosine_s=bad)
  with pytest.raises(ValueError, match=r"got \[1.5, nan\] at index \[1, 3\]"):
    D.GaussianDiffusion.create(np.array([0.1, 1.5, 0.2, np.nan]))


# ---------------------------------------------------------------------------
# Constants and closed forms


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_constants_are_float64_values_stored_as_float32(schedule):
  betas = schedules.get_beta_schedule(schedule, T)
  d = D.GaussianDiffusion.create(betas)
  betas, abar, abar_prev, post_var = ref_constants(betas)
  checks = {
      "alphas_cumprod": abar,
      "alphas_cumprod_prev": abar_prev,
      "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / abar - 1),
      "posterior_variance": post_var,
      "posterior_log_variance_clipped":
          np.log(np.concatenate([[post_var[1]], post_var[1:]])),
      "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1 - abar),
      "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
      "fixedlarge_variance": np.concatenate([[post_var[1]], betas[1:]]),
  }
  for name, ref in checks.items():
    got = getattr(d, name)
    assert got.dtype == jnp.float32, name
    # float32 rounding of a float64 value, not float32 arithmetic drift.
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-7,
                               atol=1e-30, err_msg=name)


def test_q_marginal_equals_composed_one_step_transitions():
  d = make(schedule="cosine")
  betas = schedules.get_beta_schedule("cosine", T)
  x0 = np.array([0.7, -0.3])
  mean, var = x0.copy(), 0.0  # q(x_{t}|x_0) built from q(x_t | x_{t-1})
  t_all = np.arange(T)
  means, variances = [], []
  for b in betas:
    mean, var = math.sqrt(1 - b) * mean, (1 - b) * var + b
    means.append(mean)
    variances.append(var)
  x0_b = jnp.broadcast_to(jnp.asarray(x0, jnp.float32), (T, 2))
  m, v, logv = D.q_mean_variance(d, x0_b, jnp.asarray(t_all))
  np.testing.assert_allclose(m, np.stack(means), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(v[:, 0], variances, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(logv[:, 0], np.log(variances), rtol=1e-5,
                             atol=1e-5)


def test_posterior_is_bayes_rule():
  d = make()
  betas, abar, abar_prev, _ = ref_constants(schedules.get_beta_schedule("linear", T))
  rng = np.random.default_rng(0)
  t = np.array([1, 2, 10, 250, 600, 999])
  x0 = rng.uniform(-1, 1, (len(t), 3))
  xt = rng.normal(size=(len(t), 3))
  # q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
  prec = (1 - betas[t]) / betas[t] + 1 / (1 - abar_prev[t])
  var = 1 / prec
  mean = var[:, None] * (np.sqrt(1 - betas[t])[:, None] * xt / betas[t][:, None] +
                         np.sqrt(abar_prev[t])[:, None] * x0 /
                         (1 - abar_prev[t])[:, None])
  m, v, logv = D.q_posterior_mean_variance(
      d, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32),
      jnp.asarray(t))
  np.testing.assert_allclose(m, mean, rtol=1e-4, atol=2e-6)
  np.testing.assert_allclose(v[:, 0], var, rtol=1e-5)
  np.testing.assert_allclose(logv[:, 0], np.log(var), rtol=1e-5)
  # At t = 0 the posterior is a point mass at x_0; the log-variance is clipped.
  m0, v0, logv0 = D.q_posterior_mean_variance(
      d, jnp.asarray(x0[:1], jnp.float32), jnp.asarray(xt[:1], jnp.float32),
      jnp.array([0]))
  np.testing.assert_allclose(m0, x0[:1], rtol=1e-6)
  assert float(v0[0, 0]) == 0.0
  np.testing.assert_allclose(logv0[0, 0], np.log(var[0] * 0 + (
      betas[1] * (1 - abar_prev[1]) / (1 - abar[1]))), rtol=1e-6)


def test_parameterisations_round_trip():
  d = make()
  key = jax.random.key(0)
  x0 = jax.random.uniform(key, (5, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 3, 100, 500, 999])
  xt = D.q_sample(d, x0, t, eps)
  np.testing.assert_allclose(D.predict_xstart_from_eps(d, xt, t, eps), x0,
                             atol=2e-3)  # 1/sqrt(abar) ~ 160 at t = 999
  np.testing.assert_allclose(D.predict_eps_from_xstart(d, xt, t, x0), eps,
                             atol=5e-4)
  v = D.get_v(d, x0, eps, t)
  np.testing.assert_allclose(D.predict_xstart_from_v(d, xt, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(D.predict_eps_from_v(d, xt, t, v), eps, atol=1e-5)


def test_the_three_mean_types_agree_given_consistent_outputs():
  key = jax.random.key(2)
  x0 = jax.random.uniform(key, (4, 6), minval=-1, maxval=1)
  eps = jax.random.normal(jax.random.key(3), x0.shape)
  t = jnp.array([1, 50, 400, 900])
  outs = {}
  for mean_type in D.MEAN_TYPES:
    d = make(mean=mean_type)
    xt = D.q_sample(d, x0, t, eps)
    raw = {"eps": eps, "x0": x0, "v": D.get_v(d, x0, eps, t)}[mean_type]
    outs[mean_type] = D.p_mean_variance(d, raw, xt, t, clip_denoised=False)
  for k in ("mean", "pred_xstart"):
    np.testing.assert_allclose(outs["eps"][k], outs["x0"][k], atol=1e-4)
    np.testing.assert_allclose(outs["v"][k], outs["x0"][k], atol=1e-4)


def test_variance_types_against_float64():
  betas, abar, abar_prev, post_var = ref_constants(
      schedules.get_beta_schedule("linear", T))
  t = np.array([0, 1, 10, 999])
  x = jnp.zeros((4, 2, 2, 1))
  eps = jnp.zeros_like(x)
  d_large = make(var="fixedlarge")
  d_small = make(var="fixedsmall")
  large = D.p_mean_variance(d_large, eps, x, jnp.asarray(t))
  small = D.p_mean_variance(d_small, eps, x, jnp.asarray(t))
  ref_large = np.where(t == 0, post_var[1], betas[t])
  ref_small = np.where(t == 0, post_var[1], post_var[t])
  np.testing.assert_allclose(large["variance"].ravel(), ref_large, rtol=1e-5)
  np.testing.assert_allclose(small["log_variance"].ravel(), np.log(ref_small),
                             rtol=1e-5)
  np.testing.assert_allclose(small["variance"].ravel(),
                             np.where(t == 0, 0.0, post_var[t]), rtol=1e-5)
  # learned_range: v in [-1, 1] interpolates log posterior var .. log beta.
  d_range = make(var="learned_range", loss="hybrid")
  v = np.array([-1.0, 0.0, 0.5, 1.0])
  out = jnp.concatenate(
      [eps, jnp.broadcast_to(jnp.asarray(v, jnp.float32)[:, None, None, None],
                             x.shape)], axis=-1)
  lr = D.p_mean_variance(d_range, out, x, jnp.asarray(t))
  frac = (v + 1) / 2
  ref = frac * np.log(betas[t]) + (1 - frac) * np.log(ref_small)
  np.testing.assert_allclose(lr["log_variance"][:, 0, 0, 0], ref, rtol=1e-5)
  # learned: the output is the log-variance itself.
  d_learned = make(var="learned", loss="kl")
  lv = D.p_mean_variance(d_learned, out, x, jnp.asarray(t))
  np.testing.assert_allclose(lv["log_variance"][:, 0, 0, 0], v)


# ---------------------------------------------------------------------------
# Likelihood terms


def test_normal_kl_closed_form():
  rng = np.random.default_rng(1)
  m1, m2 = rng.normal(size=10), rng.normal(size=10)
  s1, s2 = rng.uniform(0.1, 2, 10), rng.uniform(0.1, 2, 10)
  ref = np.log(s2 / s1) + (s1**2 + (m1 - m2)**2) / (2 * s2**2) - 0.5
  got = D.normal_kl(jnp.asarray(m1, jnp.float32),
                    jnp.asarray(2 * np.log(s1), jnp.float32),
                    jnp.asarray(m2, jnp.float32),
                    jnp.asarray(2 * np.log(s2), jnp.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.5), (0.93, 0.01), (-1.0, 0.002),
                                        (0.3, 3.0)])
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean, scale):
  bins = np.arange(256) / 127.5 - 1.0
  x = jnp.asarray(bins, jnp.float32)[None]
  logp = D.discretized_gaussian_log_likelihood(
      x, jnp.float32(mean), jnp.float32(math.log(scale)))
  p = np.exp(np.asarray(logp, np.float64)[0])
  assert p.sum() == pytest.approx(1.0, abs=1e-4)
  # Each bin against scipy in float64; edge bins take the tails.
  edges = np.concatenate([[-np.inf], bins[:-1] + 1 / 255, [np.inf]])
  ref = np.diff(stats.norm.cdf(edges, loc=mean, scale=scale))
  mask = ref > 1e-6  # below that the 1e-12 floor and float32 dominate
  np.testing.assert_allclose(p[mask], ref[mask], rtol=2e-3, atol=1e-6)


# ---------------------------------------------------------------------------
# Oracle models


def point_oracle(d, c):
  """The exact eps-predictor when all data is the single point c."""
  def model_fn(x_t, t):
    n = x_t.ndim
    return ((x_t - D.extract(d.sqrt_alphas_cumprod, t, n) * c) /
            D.extract(d.sqrt_one_minus_alphas_cumprod, t, n))
  return model_fn


def test_point_data_oracle_has_zero_loss_and_vanishing_kl():
  c = jnp.full((8, 3), 0.25)
  t = jnp.array([0, 1, 2, 10, 100, 500, 900, 999])
  noise = jax.random.normal(jax.random.key(4), c.shape)
  d = make(var="fixedsmall")
  losses = D.training_losses(d, point_oracle(d, c), c, t, noise)
  np.testing.assert_allclose(losses["loss"], 0.0, atol=1e-8)
  # The true bound term L_t of the oracle with fixed-small variance is 0 for t > 0.
  d_kl = make(var="fixedsmall", loss="kl")
  kl = D.training_losses(d_kl, point_oracle(d_kl, c), c, t, noise)["loss"]
  np.testing.assert_allclose(kl[1:], 0.0, atol=1e-6)
  # An imperfect model is penalised: the test can fail.
  wrong = lambda x, t: point_oracle(d_kl, c)(x, t) + 0.1
  assert np.all(np.asarray(
      D.training_losses(d_kl, wrong, c, t, noise)["loss"][1:]) > 1e-5)


def test_bound_of_the_exact_reverse_process_equals_the_data_entropy():
  d = make(mean="x0", var="learned", loss="kl")
  x0 = discretized_gaussian_data(jax.random.key(5), (4096, 8))
  out = jax.jit(lambda x, k: D.calc_bpd_loop(
      d, gaussian_oracle(d, learned_var=True), x, k))(x0, jax.random.key(6))
  assert out["vb"].shape == (4096, T) and out["total_bpd"].shape == (4096,)
  bpd = out["total_bpd"]
  h = discretized_entropy_bits()
  # E[bound] >= H(data); the exact reverse process makes it tight. The
  # tolerance is 4 Monte Carlo standard errors (about 0.01 bits each).
  se = float(bpd.std()) / math.sqrt(bpd.shape[0])
  assert float(bpd.mean()) == pytest.approx(h, abs=4 * se), (bpd.mean(), h, se)
  np.testing.assert_allclose(bpd, out["vb"].sum(axis=1) + out["prior_bpd"],
                             rtol=1e-6)
  assert float(out["prior_bpd"].mean()) < 1e-4
  # Fixed variances give looser bounds on the same data and noise (paired).
  for var, min_gap in (("fixedsmall", 0.5), ("fixedlarge", 0.05)):
    d_fixed = make(mean="eps", var=var)
    loose = D.calc_bpd_loop(d_fixed, gaussian_oracle(d_fixed), x0,
                            jax.random.key(6))["total_bpd"]
    assert float((loose - bpd).mean()) > min_gap, var


def test_calc_bpd_loop_terms_equal_direct_evaluation():
  d = make(var="fixedsmall", steps=20)
  x0 = discretized_gaussian_data(jax.random.key(7), (4, 3))
  model = gaussian_oracle(d)
  rng = jax.random.key(8)
  out = D.calc_bpd_loop(d, model, x0, rng)
  for t in (0, 7, 19):
    noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape)
    tb = jnp.full((4,), t)
    xt = D.q_sample(d, x0, tb, noise)
    vb, pred = D.vb_terms_bpd(d, model(xt, tb), x0, xt, tb)
    np.testing.assert_allclose(out["vb"][:, t], vb, rtol=1e-5)
    np.testing.assert_allclose(out["xstart_mse"][:, t],
                               ((pred - x0)**2).mean(axis=1), rtol=1e-5)


def test_hybrid_loss_is_mse_plus_scaled_vb_with_mean_gradient_stopped():
  d = make(var="learned_range", loss="hybrid")
  x0 = jax.random.uniform(jax.random.key(9), (3, 4, 4, 2), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(10), x0.shape)
  t = jnp.array([0, 40, 700])
  w = jnp.float32(0.3)

  def loss_parts(w_mean, w_var):
    model = lambda x, t: jnp.concatenate([w_mean * x, w_var * x], axis=-1)
    return D.training_losses(d, model, x0, t, noise)

  parts = loss_parts(w, w)
  mse = ((noise - w * D.q_sample(d, x0, t, noise))**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(parts["mse"], mse, rtol=1e-5)
  np.testing.assert_allclose(parts["loss"], parts["mse"] + parts["vb"])
  d_kl = d.replace(loss_type="kl")
  vb = D.training_losses(d_kl, lambda x, t: jnp.concatenate(
      [w * x, w * x], axis=-1), x0, t, noise)["loss"]
  np.testing.assert_allclose(parts["vb"], vb * T / 1000, rtol=1e-6)
  # d loss / d w_mean comes from the MSE alone.
  g_total = jax.grad(lambda a: loss_parts(a, w)["loss"].sum())(w)
  g_mse = jax.grad(lambda a: loss_parts(a, w)["mse"].sum())(w)
  np.testing.assert_allclose(g_total, g_mse, rtol=1e-6)
  assert abs(float(jax.grad(lambda b: loss_parts(w, b)["loss"].sum())(w))) > 0


def test_mse_targets_for_each_mean_type():
  x0 = jax.random.uniform(jax.random.key(11), (4, 5), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(12), x0.shape)
  t = jnp.array([0, 10, 100, 999])
  zero = lambda x, t: jnp.zeros_like(x)
  for mean_type, target in (("eps", noise), ("x0", x0)):
    d = make(mean=mean_type)
    np.testing.assert_allclose(
        D.training_losses(d, zero, x0, t, noise)["loss"],
        (np.asarray(target)**2).mean(axis=1), rtol=1e-6)
  d = make(mean="v")
  a = np.asarray(d.alphas_cumprod, np.float64)[np.asarray(t)][:, None]
  v = np.sqrt(a) * np.asarray(noise) - np.sqrt(1 - a) * np.asarray(x0)
  np.testing.assert_allclose(D.training_losses(d, zero, x0, t, noise)["loss"],
                             (v**2).mean(axis=1), rtol=1e-5)


# ---------------------------------------------------------------------------
# Transformations, shapes and bad input


@pytest.mark.parametrize("shape", [(6,), (6, 5), (6, 4, 4, 3)])
def test_jit_vmap_grad_and_shapes(shape):
  d = make()
  x0 = jax.random.uniform(jax.random.key(13), shape, minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(14), shape)
  t = jnp.arange(6) * 150

  def loss(w, x0, noise):
    return D.training_losses(d, lambda x, t: w * x, x0, t, noise)["loss"].mean()

  eager = loss(0.5, x0, noise)
  np.testing.assert_allclose(jax.jit(loss)(0.5, x0, noise), eager, rtol=1e-6)
  # d/dw of mean((noise - w x_t)^2) in closed form.
  xt = D.q_sample(d, x0, t, noise)
  ref_grad = np.mean(-2 * np.asarray(xt) * (np.asarray(noise) - 0.5 * np.asarray(xt)))
  np.testing.assert_allclose(jax.grad(loss)(0.5, x0, noise), ref_grad,
                             rtol=1e-4)
  # vmap over an outer axis (e.g. several data sets at once).
  batched = jax.vmap(loss, in_axes=(None, 0, 0))(
      0.5, jnp.stack([x0, -x0]), jnp.stack([noise, noise]))
  np.testing.assert_allclose(batched[0], eager, rtol=1e-6)
  np.testing.assert_allclose(batched[1], loss(0.5, -x0, noise), rtol=1e-6)


def test_diffusion_is_a_pytree_that_jit_accepts():
  d = make(var="fixedsmall")
  leaves, treedef = jax.tree_util.tree_flatten(d)
  assert all(leaf.shape[0] == T for leaf in leaves)
  d2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert d2.model_var_type == "fixedsmall" and d2.num_timesteps == T
  f = jax.jit(lambda d, x: D.q_sample(d, x, jnp.zeros((2,), jnp.int32), x))
  np.testing.assert_allclose(f(d, jnp.ones((2, 3))),
                             math.sqrt(1 - 1e-4) + math.sqrt(1e-4), rtol=1e-6)


def test_bad_names_raise_with_allowed_values():
  betas = schedules.get_beta_schedule("linear", 10)
  with pytest.raises(ValueError, match="'epsilon'.*eps, x0, v"):
    D.GaussianDiffusion.create(betas, model_mean_type="epsilon")
  with pytest.raises(ValueError, match="'large'.*fixedlarge"):
    D.GaussianDiffusion.create(betas, model_var_type="large")
  with pytest.raises(ValueError, match="'l2'.*mse, kl, hybrid"):
    D.GaussianDiffusion.create(betas, loss_type="l2")
  with pytest.raises(ValueError, match="hybrid"):
    D.GaussianDiffusion.create(betas, model_var_type="learned_range")


def test_bad_timesteps_and_outputs_raise():
  d = make(steps=10)
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"t out of range.*\[10\].*0\.\.9"):
    D.q_sample(d, x, jnp.array([0, 10]), x)
  with pytest.raises(ValueError, match=r"\[-1\]"):
    D.training_losses(d, lambda x, t: x, x, jnp.array([-1, 0]), x)
  with pytest.raises(ValueError, match="integer"):
    D.q_sample(d, x, jnp.array([0.0, 1.0]), x)
  with pytest.raises(ValueError, match="shape"):
    D.q_sample(d, x, jnp.array([0, 1, 2]), x)
  d_l = make(var="learned_range", loss="hybrid", steps=10)
  with pytest.raises(ValueError, match="2C = 6 channels"):
    D.p_mean_variance(d_l, x, x, jnp.array([1, 2]))
  with pytest.raises(ValueError, match="2C"):  # also at trace time under jit
    jax.jit(lambda x: D.training_losses(
        d_l, lambda x, t: x, x, jnp.array([1, 2]), x))(x)


def test_q_variance_keeps_float64_precision_where_abar_is_near_one():
  for schedule in ("linear", "cosine"):
    d = make(schedule=schedule)
    _, abar, _, _ = ref_constants(schedules.get_beta_schedule(schedule, T))
    t = jnp.array([0, 1, 500, T - 1])
    _, var, logvar = D.q_mean_variance(d, jnp.zeros((4, 2)), t)
    ref = 1.0 - abar[np.asarray(t)]
    np.testing.assert_allclose(np.asarray(var)[:, 0], ref, rtol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(logvar, np.float64))[:, 0], ref,
                               rtol=1e-6)


def test_discretized_likelihood_is_symmetric_far_from_the_mean():
  """A bin above the mean is as precise as its mirror image below (scipy, float64)."""
  offsets = np.array([0.012, 0.018, 0.024, 0.03])  # 0.036 is below the 1e-12 floor
  x = jnp.asarray(np.concatenate([-offsets, offsets]), jnp.float32)
  log_scale = math.log(0.004)
  got = np.asarray(D.discretized_gaussian_log_likelihood(
      x, jnp.float32(0.0), jnp.float32(log_scale)), np.float64)
  centred = np.asarray(x, np.float64)
  ref = np.log(stats.norm.cdf(centred + 1 / 255, scale=0.004) -
               stats.norm.cdf(centred - 1 / 255, scale=0.004))
  ref_above = np.log(stats.norm.sf(centred - 1 / 255, scale=0.004) -
                     stats.norm.sf(centred + 1 / 255, scale=0.004))
  ref = np.where(centred > 0, ref_above, ref)
  np.testing.assert_allclose(got, ref, rtol=1e-4)
  np.testing.assert_allclose(got[:4], got[4:], rtol=1e-5)


def test_a_last_beta_of_one_needs_x0_or_v_prediction():
  """jsd's last beta is 1: eps prediction is refused; x0/v give finite chains and bounds."""
  betas = schedules.get_beta_schedule("jsd", 10)
  assert betas[-1] == 1.0
  with pytest.raises(ValueError, match="last beta is 1.*'x0' or 'v'"):
    D.GaussianDiffusion.create(betas)
  from ddpm_jax import sampling as S
  for mean in ("x0", "v"):
    d = D.GaussianDiffusion.create(betas, model_mean_type=mean)
    model = lambda x, t: 0.5 * x
    key = jax.random.key(0)
    for chain in (S.p_sample_loop(d, model, (2, 2, 2, 1), key),
                  S.ddim_sample_loop(d, model, (2, 2, 2, 1), key)):
      assert np.all(np.isfinite(np.asarray(chain)))
    bpd = D.calc_bpd_loop(d, model, jnp.zeros((2, 2, 2, 1)), key)
    assert np.all(np.isfinite(np.asarray(bpd["total_bpd"])))
    # eps from x_0 at abar_T = 0 is x_T itself.
    x_t = jax.random.normal(key, (2, 3))
    eps = D.predict_eps_from_xstart(d, x_t, jnp.array([9, 9]), jnp.ones((2, 3)))
    np.testing.assert_allclose(eps, x_t, rtol=1e-6)


def test_range_checks_name_the_values_outside_only_when_concrete():
  assert range_checks.outside(np.array([[3, -1], [12, 5]]), 0, 9) == [-1, 12]
  assert range_checks.outside(jnp.arange(30), 0, 9) == list(range(10, 18))
  assert range_checks.outside(jnp.zeros((0,), jnp.int32), 0, 9) == []
  seen = []  # traced: the values exist only when the program runs
  jax.jit(lambda t: seen.append(range_checks.outside(t, 0, 9)) or t)(
      jnp.array([10]))
  assert seen == [[]]


def test_conversions_check_their_timesteps():
  d = make(steps=10)
  x = jnp.ones((1, 4))
  for fn in (D.predict_xstart_from_eps, D.predict_eps_from_xstart,
             D.predict_xstart_from_v, D.predict_eps_from_v):
    with pytest.raises(ValueError, match=r"t out of range.*\[10\]"):
      fn(d, x, jnp.array([10]), x)
    with pytest.raises(ValueError, match="shape"):
      fn(d, x, jnp.array([1, 2]), x)
  with pytest.raises(ValueError, match=r"\[-1\]"):
    D.get_v(d, x, x, jnp.array([-1]))


def test_hybrid_loss_needs_a_learned_variance_when_created():
  with pytest.raises(ValueError, match="hybrid.*'fixedlarge'.*'mse'"):
    make(loss="hybrid", steps=10)


def test_shapes_that_would_broadcast_are_refused():
  """noise/eps/v/x_start must match x: a [B, 1] or [D] array is not broadcast."""
  d = make(steps=10)
  x = jnp.ones((2, 5))
  t = jnp.array([3, 7])
  for bad in (jnp.ones((2, 1)), jnp.ones((5,)), jnp.ones((3, 5))):
    with pytest.raises(ValueError, match=r"noise must have the shape of x_start"):
      D.q_sample(d, x, t, bad)
    with pytest.raises(ValueError, match=r"noise must have the shape of x_start"):
      D.training_losses(d, lambda x, t: x, x, t, bad)
    with pytest.raises(ValueError, match=r"noise must have the shape"):
      D.get_v(d, x, bad, t)
    with pytest.raises(ValueError, match=r"x_start must have the shape of x_t"):
      D.q_posterior_mean_variance(d, bad, x, t)
    with pytest.raises(ValueError, match=r"x_start must have the shape of x_t"):
      D.vb_terms_bpd(d, x, bad, x, t)
    with pytest.raises(ValueError, match=r"eps must have the shape of x_t"):
      D.predict_xstart_from_eps(d, x, t, bad)
    with pytest.raises(ValueError, match=r"x_start must have the shape of x_t"):
      D.predict_eps_from_xstart(d, x, t, bad)
    for fn in (D.predict_xstart_from_v, D.predict_eps_from_v):
      with pytest.raises(ValueError, match=r"v must have the shape of x_t"):
        fn(d, x, t, bad)
  # The likelihood's Gaussian may broadcast to x (a scalar scale), not past it.
  x = jnp.zeros((2, 3, 3, 1))
  for means, scales in ((jnp.zeros((3, 2, 3, 3, 1)), jnp.zeros(())),
                        (x, jnp.zeros((2, 3, 3, 2)))):
    with pytest.raises(ValueError, match=r"must broadcast to x's shape \(2, 3, 3, 1\)"):
      D.discretized_gaussian_log_likelihood(x, means, scales)
  one = D.discretized_gaussian_log_likelihood(x, x, jnp.zeros(()))
  np.testing.assert_allclose(
      one, D.discretized_gaussian_log_likelihood(x, x, jnp.zeros_like(x)))


def test_q_sample_of_sequences_against_float64():
  """[B, L, C] data (not images): each example scaled by its own t's constants."""
  betas = schedules.get_beta_schedule("cosine", 50)
  d = D.GaussianDiffusion.create(betas)
  _, abar, _, _ = ref_constants(betas)
  x0 = jax.random.uniform(jax.random.key(0), (3, 7, 2), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(1), (3, 7, 2))
  t = np.array([0, 25, 49])
  got = jax.jit(D.q_sample)(d, x0, jnp.asarray(t), noise)
  a = abar[t][:, None, None]
  ref = np.sqrt(a) * np.asarray(x0, np.float64) + np.sqrt(1 - a) * np.asarray(
      noise, np.float64)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_timesteps_that_are_not_an_int_array_say_what_to_pass():
  d = make(steps=10)
  x = jnp.ones((2, 3))
  for t in (3, [3, 4], jnp.int32(3)):
    with pytest.raises(ValueError, match=r"jnp\.full\(\(B,\), t, jnp\.int32\)"):
      D.q_sample(d, x, t, x)
  with pytest.raises(ValueError, match=r"got list \[3, 4\]"):
    D.training_losses(d, lambda x, t: x, x, [3, 4], x)


def test_learned_variances_need_a_channel_axis():
  """[B] data has no channel axis: its last axis is the batch, not channels."""
  d = make(var="learned_range", loss="hybrid", steps=10)
  x = jnp.linspace(-1.0, 1.0, 6)
  model = lambda x, t: jnp.concatenate([x, x])  # [2B]: would split the batch
  with pytest.raises(ValueError, match=r"shape \(6,\) has none.*\[B, 1\]"):
    D.training_losses(d, model, x, jnp.arange(6), x)
  with pytest.raises(ValueError, match="channel"):
    D.p_mean_variance(d, jnp.zeros(12), x, jnp.arange(6))
  # With a channel axis the same data works.
  x1 = x[:, None]
  out = D.training_losses(d, lambda x, t: jnp.concatenate([x, x], -1), x1,
                          jnp.arange(6), x1)
  assert out["loss"].shape == (6,)


def test_calc_bpd_loop_draws_float32_noise_for_half_precision_data():
  """Data exactly representable in bfloat16 gives the float32 bound."""
  d = make(steps=10)
  x = jnp.array([[-1.0, 0.0, 0.5, 1.0], [0.25, -0.5, 1.0, -1.0]])
  model = lambda x, t: 0.1 * x
  key = jax.random.key(3)
  ref = D.calc_bpd_loop(d, model, x, key)
  for dtype in (jnp.bfloat16, jnp.float16):
    got = D.calc_bpd_loop(d, model, x.astype(dtype), key)
    np.testing.assert_allclose(got["total_bpd"], ref["total_bpd"], rtol=1e-6)
    np.testing.assert_allclose(got["mse"], ref["mse"], rtol=1e-6)


def test_discretized_likelihood_of_bfloat16_data_keeps_the_edge_bins():
  """In bfloat16, 0.999 rounds to 1: the +-1 pixels must still take the tails."""
  x = np.array([-1.0, -1.0, 1.0, 1.0, 0.0])
  means = np.array([-0.99, -0.9, 0.99, 0.9, 0.01])
  scale = 0.02
  lo, hi = x - 1 / 255, x + 1 / 255
  ref = np.where(x < -0.999, stats.norm.logcdf(hi, means, scale),
                 np.where(x > 0.999, stats.norm.logsf(lo, means, scale),
                          np.log(stats.norm.cdf(hi, means, scale) -
                                 stats.norm.cdf(lo, means, scale))))
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    got = D.discretized_gaussian_log_likelihood(
        jnp.asarray(x, dtype), jnp.asarray(means, jnp.float32),
        jnp.full((5,), math.log(scale), jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4, err_msg=str(dtype))


def test_half_precision_inputs_are_computed_in_float32():
  """bfloat16 data, noise and network output: the loss, the learned variance and
  the KL are float32 and equal float64 evaluated on the same bfloat16 values
  (before, they came back in bfloat16, ~3 significant digits)."""
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  rng = np.random.default_rng(7)
  x0 = bf(rng.uniform(-1, 1, (3, 4, 4, 2)))
  noise = bf(rng.standard_normal(x0.shape))
  out = bf(rng.standard_normal((3, 4, 4, 4)) * 0.5)
  t = jnp.array([5, 300, 900])
  d = make(var="learned", loss="hybrid")
  losses = D.training_losses(d, lambda x, t: out, x0, t, noise)
  assert losses["mse"].dtype == losses["loss"].dtype == jnp.float32
  want = ((f64(noise) - f64(out)[..., :2])**2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(losses["mse"], want, rtol=1e-6)

  x_t = bf(rng.standard_normal(x0.shape))
  p = D.p_mean_variance(d, out, x_t, t)
  assert p["variance"].dtype == p["log_variance"].dtype == jnp.float32
  np.testing.assert_allclose(p["variance"], np.exp(f64(out)[..., 2:]), rtol=1e-6)

  m1, l1, m2, l2 = (bf(rng.standard_normal(6)) for _ in range(4))
  kl = D.normal_kl(m1, l1, m2, l2)
  ref = 0.5 * (-1 + f64(l2) - f64(l1) + np.exp(f64(l1) - f64(l2))
               + (f64(m1) - f64(m2))**2 * np.exp(-f64(l2)))
  assert kl.dtype == jnp.float32
  np.testing.assert_allclose(kl, ref, rtol=1e-5, atol=1e-6)


def test_a_bool_is_not_a_number_of_timesteps():
  with pytest.raises(ValueError, match="num_timesteps must be a positive integer, got True"):
    schedules.get_beta_schedule("linear", True)


def test_the_readme_example_runs_as_written():
  """The README's Python block, executed; its loss checked against float64."""
  import os  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1, "a new README example: run it here too"
  scope = {}
  exec(blocks[0], scope)  # pylint: disable=exec-used
  x0, t, noise = (np.asarray(scope[k], np.float64) for k in ("x0", "t", "noise"))
  _, abar, _, _ = ref_constants(schedules.get_beta_schedule("linear", T))
  a = abar[t.astype(int)][:, None, None, None]
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  np.testing.assert_allclose(scope["losses"]["loss"],
                             ((noise - 0.1 * x_t)**2).mean(axis=(1, 2, 3)), rtol=1e-5)
  assert scope["x"].shape == (16, 32, 32, 3) and np.isfinite(scope["x"]).all()
  assert len(scope["timestep_map"]) == 50
