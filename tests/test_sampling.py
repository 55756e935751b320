"""Samplers and respacing, checked with exact denoisers of Gaussian data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as D
from ddpm_jax import sampling as S
from ddpm_jax import schedules
from oracles import MU, S2_EFF, gaussian_oracle

T = 1000
N = 8192  # Monte Carlo samples (scalar data)


def make(mean="eps", var="fixedlarge", loss="mse", steps=T):
  return D.GaussianDiffusion.create(
      schedules.get_beta_schedule("linear", steps), model_mean_type=mean,
      model_var_type=var, loss_type=loss)


def assert_moments(x, mean, var, n_se=5.0):
  """Sample mean and variance within n_se Monte Carlo standard errors."""
  x = np.asarray(x, np.float64).ravel()
  n = x.size
  assert abs(x.mean() - mean) < n_se * np.sqrt(var / n), (x.mean(), mean)
  # Var of the sample variance of a normal: 2 var^2 / (n - 1).
  assert abs(x.var() - var) < n_se * var * np.sqrt(2 / (n - 1)), (x.var(), var)


def test_ancestral_sampling_of_the_exact_reverse_process_gives_the_data():
  d = make(mean="x0", var="learned", loss="kl")
  x = jax.jit(lambda k: S.p_sample_loop(
      d, gaussian_oracle(d, learned_var=True), (N, 1), k,
      clip_denoised=False))(jax.random.key(0))
  assert_moments(x, MU, S2_EFF)


def chain_moments(kept, sampler, var="fixedlarge", eta=0.0):
  """Exact mean and variance of a sampler's output in float64.

  With the optimal denoiser of Gaussian data every step is linear-Gaussian,
  x' = A x + B + sigma z, so the moments propagate in closed form. Written
  from the formulas, independently of the library.
  """
  betas = schedules.get_beta_schedule("linear", T)
  abar = np.cumprod(1.0 - betas)[np.asarray(kept)]
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  beta = 1.0 - abar / abar_prev
  post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
  m, v = 0.0, 1.0
  for i in reversed(range(len(kept))):
    a, ap = abar[i], abar_prev[i]
    var_t = a * S2_EFF + 1.0 - a
    c1, c0 = np.sqrt(a) * S2_EFF / var_t, (1.0 - a) * MU / var_t  # E[x0|x]
    if sampler == "ancestral":
      k1 = beta[i] * np.sqrt(ap) / (1.0 - a)
      k2 = (1.0 - ap) * np.sqrt(1.0 - beta[i]) / (1.0 - a)
      A, B = k1 * c1 + k2, k1 * c0
      if i == 0:
        noise_var = 0.0
      elif var == "fixedlarge":
        noise_var = beta[i]
      else:
        noise_var = post_var[i]
    else:  # ddim: x' = sqrt(ap) x0 + sqrt(1 - ap - sig^2) eps + sig z
      sig2 = 0.0 if i == 0 else eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
      r = np.sqrt(1.0 - ap - sig2) / np.sqrt(1.0 / a - 1.0)
      A = np.sqrt(ap) * c1 + r * (1.0 / np.sqrt(a) - c1)
      B = np.sqrt(ap) * c0 - r * c0
      noise_var = sig2
    m, v = A * m + B, A * A * v + noise_var
  return m, v


@pytest.mark.parametrize("var", ["fixedlarge", "fixedsmall"])
def test_ancestral_sampling_with_the_optimal_eps_predictor(var):
  d = make(var=var)
  x = jax.jit(lambda k: S.p_sample_loop(d, gaussian_oracle(d), (N, 1), k,
                                        clip_denoised=False))(jax.random.key(1))
  mean, v = chain_moments(np.arange(T), "ancestral", var)
  assert_moments(x, mean, v)
  # With T = 1000 the fixed-variance chain is close to the data itself.
  assert abs(mean - MU) < 1e-3 and abs(v / S2_EFF - 1) < 0.05


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_on_50_respaced_steps(eta):
  d = make()
  d50, tmap = S.respace(d, "ddim50")
  np.testing.assert_array_equal(tmap, np.arange(0, T, 20))
  # The oracle is indexed by the ORIGINAL process's timesteps: a respaced
  # sampler that fed the model its own step index would fail here.
  x = jax.jit(lambda k: S.ddim_sample_loop(
      d50, gaussian_oracle(d), (N, 1), k, eta=eta, clip_denoised=False))(
          jax.random.key(2))
  assert_moments(x, *chain_moments(np.asarray(tmap), "ddim", eta=eta))
  # 1000 deterministic steps reach the data's own moments.
  mean, v = chain_moments(np.arange(T), "ddim")
  assert abs(mean - MU) < 1e-3 and abs(v / S2_EFF - 1) < 0.02


def test_respaced_ancestral_sampling():
  d = make(var="fixedsmall")
  d100, tmap = S.respace(d, "100")
  x = S.p_sample_loop(d100, gaussian_oracle(d), (N, 1), jax.random.key(3),
                      clip_denoised=False)
  assert_moments(x, *chain_moments(np.asarray(tmap), "ancestral", "fixedsmall"))


def test_ddim_eta0_is_deterministic_and_invertible():
  d = make()
  model = gaussian_oracle(d)
  x0 = MU + np.sqrt(S2_EFF) * jax.random.normal(jax.random.key(4), (256, 3))
  errors = {}
  for spec in ("1000", "ddim100"):
    dr, _ = S.respace(d, spec)
    encoded = S.ddim_reverse_sample_loop(dr, model, x0)
    a = S.ddim_sample_loop(dr, model, x0.shape, jax.random.key(5),
                           clip_denoised=False, noise=encoded)
    b = S.ddim_sample_loop(dr, model, x0.shape, jax.random.key(6),
                           clip_denoised=False, noise=encoded)
    np.testing.assert_array_equal(a, b)  # eta = 0: the key does not matter
    errors[spec] = float(jnp.abs(a - x0).max())
  # Decoding the encoding gives the data back, up to the discretisation error
  # of the ODE, which shrinks with the step count.
  assert errors["1000"] < 0.02 and errors["1000"] < errors["ddim100"] / 3, errors
  noise = jax.random.normal(jax.random.key(7), x0.shape)
  c = S.ddim_sample_loop(d, model, x0.shape, jax.random.key(6), eta=1.0,
                         clip_denoised=False, noise=noise)
  c2 = S.ddim_sample_loop(d, model, x0.shape, jax.random.key(8), eta=1.0,
                          clip_denoised=False, noise=noise)
  assert float(jnp.abs(c - c2).max()) > 0.1  # with eta > 0 the key matters


def test_chunked_chain_equals_the_whole_chain():
  d = make(steps=100)
  model = gaussian_oracle(d)
  key = jax.random.key(7)
  whole = S.p_sample_loop(d, model, (16, 2), key)
  x = S.prior_sample(d, key, (16, 2))
  step = jax.jit(lambda x, hi, lo: S.sample_steps(d, model, x, key, hi, lo))
  for hi in range(100, 0, -30):  # 100 -> 70 -> 40 -> 10 -> 0, one compile
    x = step(x, hi, max(hi - 30, 0))
  # Same keys, same steps: equal up to float32 rounding of other fusions.
  np.testing.assert_allclose(x, whole, rtol=0, atol=1e-6)


def test_per_example_keys_make_samples_independent_of_the_batch():
  d = make(steps=50)
  model = gaussian_oracle(d)
  keys = jax.random.split(jax.random.key(8), 6)
  full = S.p_sample_loop(d, model, (6, 3), keys)
  part = S.p_sample_loop(d, model, (2, 3), keys[3:5])
  np.testing.assert_allclose(part, full[3:5], rtol=1e-6)
  # Raw uint32 keys work the same way.
  raw = jax.random.key_data(keys)
  np.testing.assert_array_equal(S.p_sample_loop(d, model, (6, 3), raw), full)
  assert float(jnp.abs(full[0] - full[1]).max()) > 0.01


def test_last_step_adds_no_noise_and_clipping_applies():
  d = make(mean="x0", steps=10)
  x = jnp.full((4, 2), 0.5)
  big = lambda x, t: jnp.full_like(x, 3.0)  # predicts x0 = 3, outside [-1, 1]
  out = S.p_sample(d, big, x, jnp.zeros((4,), jnp.int32), jax.random.key(9))
  # At t = 0 the posterior mean is the (clipped) predicted x0, exactly.
  np.testing.assert_array_equal(out["sample"], 1.0)
  out = S.p_sample(d, big, x, jnp.zeros((4,), jnp.int32), jax.random.key(9),
                   clip_denoised=False)
  np.testing.assert_allclose(out["sample"], 3.0, rtol=1e-6)
  noisy = S.p_sample(d, big, x, jnp.full((4,), 5), jax.random.key(9))
  assert float(jnp.std(noisy["sample"])) > 0


def test_respacing_keeps_the_marginals():
  d = make(var="learned_range", loss="hybrid")
  for spec, count in (("250", 250), ("10,10,20", 40), ("ddim50", 50), (7, 7),
                      ([5, 5], 10)):
    dr, tmap = S.respace(d, spec)
    assert dr.num_timesteps == count and tmap.shape == (count,)
    np.testing.assert_allclose(dr.alphas_cumprod,
                               np.asarray(d.alphas_cumprod)[np.asarray(tmap)],
                               rtol=2e-6)
    assert dr.model_var_type == "learned_range"
    assert dr.original_num_timesteps == T
  # Respacing a respaced process composes the maps.
  d250, _ = S.respace(d, "250")
  d25, m = S.respace(d250, "25")
  np.testing.assert_array_equal(
      m, np.asarray(d250.timestep_map)[S.space_timesteps(250, "25")])


def test_space_timesteps_follows_the_section_rule():
  # 10 steps of 100: stride 99/9 = 11, so 0, 11, ..., 99.
  assert S.space_timesteps(100, "10") == list(range(0, 100, 11))
  # Sections of sizes 34, 33, 33 keep 2, 3, 1 steps each.
  assert S.space_timesteps(100, "2,3,1") == [0, 33, 34, 50, 66, 67]
  assert S.space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
  assert len(S.space_timesteps(1000, "250")) == 250


def test_bad_sampler_input():
  d = make(steps=100)
  with pytest.raises(ValueError, match="only T=100"):
    S.respace(d, "150")
  with pytest.raises(ValueError, match="section 1"):
    S.space_timesteps(100, "10,60")
  with pytest.raises(ValueError, match="exactly 45"):
    S.space_timesteps(100, "ddim45")
  with pytest.raises(ValueError, match="ddimK"):
    S.respace(d, "fast")
  with pytest.raises(ValueError, match="'euler'.*ancestral, ddim"):
    S.sample_steps(d, lambda x, t: x, jnp.zeros((1, 1)), jax.random.key(0),
                   100, 0, sampler="euler")
  with pytest.raises(ValueError, match="t_start=101"):
    S.sample_steps(d, lambda x, t: x, jnp.zeros((1, 1)), jax.random.key(0),
                   101, 0)


def improved_ddpm_sections(num_timesteps, counts):
  """improved DDPM's section rule, written out: a running float sum, rounded."""
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = num_timesteps // len(counts) + (i < num_timesteps % len(counts))
    stride, position = (1 if count <= 1 else (size - 1) / (count - 1)), 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return sorted(set(kept))


def test_space_timesteps_rounds_as_improved_ddpm():
  # 12 * 49/24 is 24.5: the running sum lands above it (25), a product on it (24).
  assert S.space_timesteps(50, "25")[12] == 25
  for t in (50, 100, 250, 500, 1000, 2000, 4000):
    for spec in ("7", "25", "50", "10,15,20", "3,1,4,1,5"):
      counts = [int(c) for c in spec.split(",")]
      if max(counts) <= t // len(counts):
        assert S.space_timesteps(t, spec) == improved_ddpm_sections(t, counts), (t, spec)
  for spec in ("ddim1", "ddim0"):
    with pytest.raises(ValueError, match="needs K >= 2"):
      S.space_timesteps(100, spec)
  # Spaces are fine; signs, underscores and other digits than ASCII are not.
  assert S.space_timesteps(100, "ddim 10") == S.space_timesteps(100, "ddim10")
  assert S.space_timesteps(100, "2, 3 ,1") == S.space_timesteps(100, "2,3,1")
  for spec in ("ddim-3", "ddim+5", "ddim5_0", "ddim\u0665"):
    with pytest.raises(ValueError, match="'ddim' must be followed by a step count"):
      S.space_timesteps(100, spec)
  for spec in ("5_0", "+5", "10,-2", "\u0665", "10,,5", ""):
    with pytest.raises(ValueError, match="with integer step counts"):
      S.space_timesteps(100, spec)
  # Counts given as numbers: floats and bools are not truncated to steps.
  assert S.space_timesteps(100, np.int64(10)) == S.space_timesteps(100, "10")
  assert S.space_timesteps(100, jnp.array([2, 3, 1])) == S.space_timesteps(100, "2,3,1")
  for spec in ([2.7], 2.5, True, [True, 3]):
    with pytest.raises(ValueError, match="step counts must be integers"):
      S.space_timesteps(100, spec)
  with pytest.raises(ValueError, match="asks for 150 steps but the process has only T=100"):
    S.space_timesteps(100, "ddim150")


def test_chains_run_in_float32_from_any_float_state():
  d = make(steps=20)
  model = lambda x, t: 0.1 * x
  noise = jax.random.normal(jax.random.key(1), (2, 4, 4, 1)).astype(jnp.bfloat16)
  out = S.ddim_sample_loop(d, model, noise.shape, jax.random.key(0), noise=noise)
  ref = S.ddim_sample_loop(d, model, noise.shape, jax.random.key(0),
                           noise=noise.astype(jnp.float32))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, ref)
  steps = S.sample_steps(d, model, noise, jax.random.key(0), 20, 10)
  assert steps.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(steps)))
  enc = S.ddim_reverse_sample_loop(d, model, noise)
  assert enc.dtype == jnp.float32
  with pytest.raises(ValueError, match="t_end=10 > t_start=3"):
    S.sample_steps(d, model, noise, jax.random.key(0), 3, 10)


def test_rng_must_be_a_key_old_or_new_style():
  d = make(steps=5)
  model = lambda x, t: 0.1 * x
  typed = S.p_sample_loop(d, model, (2, 3), jax.random.key(7))
  raw = S.p_sample_loop(d, model, (2, 3), jax.random.PRNGKey(7))
  np.testing.assert_array_equal(typed, raw)  # the same threefry key
  per_example = S.p_sample_loop(d, model, (2, 3),
                                jax.random.split(jax.random.key(7), 2))
  np.testing.assert_array_equal(
      per_example, S.p_sample_loop(d, model, (2, 3),
                                   jax.random.split(jax.random.PRNGKey(7), 2)))
  for bad in (7, jnp.array([0, 7], jnp.int32), jnp.zeros((2,)),
              jax.random.split(jax.random.PRNGKey(7), (2, 1)),
              jnp.zeros((3,), jnp.uint32), jnp.zeros((2, 3), jnp.uint32)):
    with pytest.raises(TypeError, match=r"rng must be a PRNG key.*jax\.random\.key"):
      S.p_sample_loop(d, model, (2, 3), bad)
  with pytest.raises(ValueError, match=r"typed keys of shape \(2, 1\)"):
    S.p_sample_loop(d, model, (2, 3),
                    jax.random.split(jax.random.key(7), (2, 1)))
  with pytest.raises(TypeError, match="rng must be a PRNG key"):
    D.calc_bpd_loop(d, model, jnp.zeros((2, 3)), 0)


def test_sample_steps_checks_levels_given_as_arrays():
  d = make(steps=20)
  model = lambda x, t: 0.1 * x
  x = jnp.ones((2, 3))
  key = jax.random.key(0)
  ref = S.sample_steps(d, model, x, key, 20, 10)
  np.testing.assert_array_equal(
      S.sample_steps(d, model, x, key, jnp.array(20), np.int64(10)), ref)
  np.testing.assert_array_equal(  # traced levels: one function for every chunk
      jax.jit(lambda a, b: S.sample_steps(d, model, x, key, a, b))(20, 10), ref)
  with pytest.raises(ValueError, match=r"t_start=25 out of range 0\.\.20"):
    S.sample_steps(d, model, x, key, jnp.array(25), 10)
  with pytest.raises(ValueError, match=r"t_end=-1 out of range"):
    S.sample_steps(d, model, x, key, 20, jnp.array(-1))
  with pytest.raises(ValueError, match=r"t_end=12 > t_start=11"):
    S.sample_steps(d, model, x, key, jnp.array(11), jnp.array(12))
  for bad in (20.0, jnp.array([20]), jnp.array(20.0)):
    with pytest.raises(ValueError, match="t_start must be a scalar integer"):
      S.sample_steps(d, model, x, key, bad, 10)


def test_ddim_sample_loop_refuses_noise_of_another_shape():
  d = make(steps=5)
  with pytest.raises(ValueError, match=r"noise has shape \(2, 4\).*\(3, 4\)"):
    S.ddim_sample_loop(d, lambda x, t: x, (3, 4), jax.random.key(0),
                       noise=jnp.zeros((2, 4)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_single_steps_draw_float32_noise_for_half_precision_states(dtype):
  """A state exactly representable in half precision steps as in float32."""
  d = make(steps=20)
  model = lambda x, t: 0.1 * x.astype(jnp.float32)  # a float32 network
  x = jnp.array([[-1.0, 0.0, 0.5], [0.25, -0.5, 1.0]])
  t = jnp.array([5, 19])
  key = jax.random.key(4)
  for step in (lambda x: S.p_sample(d, model, x, t, key),
               lambda x: S.ddim_sample(d, model, x, t, key, eta=1.0)):
    ref = step(x)["sample"]
    got = step(x.astype(dtype))["sample"]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eta", [-0.5, 1.5])
def test_ddim_eta_outside_0_1_is_refused(eta):
  """Above 1, sqrt(1 - abar_prev - sigma^2) is NaN near t = 0 (the samples were
  NaN, and generate's uint8 images black); below 0 is meaningless."""
  d = D.GaussianDiffusion.create(schedules.get_beta_schedule("linear", 20))
  model = lambda x, t: jnp.zeros_like(x)
  with pytest.raises(ValueError, match=rf"eta={eta} is outside \[0, 1\]"):
    S.ddim_sample_loop(d, model, (2, 3), jax.random.key(0), eta=eta)
  with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
    S.ddim_sample(d, model, jnp.zeros((2, 3)), jnp.array([5, 5]),
                  jax.random.key(0), eta=eta)
  # One eta per example is not a thing: said by name, not numpy's TypeError.
  with pytest.raises(ValueError, match=r"eta must be a scalar.*shape \(2,\)"):
    S.ddim_sample_loop(d, model, (2, 3), jax.random.key(0),
                       eta=jnp.array([eta, 0.5]))
  # The limit is real: at eta = 1.5 the step's variance is NaN at small t.
  abar = np.cumprod(1 - np.asarray(d.betas, np.float64))
  sigma2 = 1.5**2 * (1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0])
  assert 1 - abar[0] - sigma2 < 0


def test_ddim_guidance_where_abar_is_zero_stays_finite():
  """jsd's last beta is 1 (abar_T-1 = 0): the guided x_0 from eps divided by
  sqrt(abar) = 0 made the first DDIM step NaN; the model's own x_0 is used."""
  d = D.GaussianDiffusion.create(schedules.get_beta_schedule("jsd", 10),
                                 model_mean_type="x0")
  x0_model = lambda x, t: 0.5 * jnp.tanh(x)
  cond = lambda x, t: jnp.ones_like(x)
  x = jax.random.normal(jax.random.key(0), (4, 3))
  step = S.ddim_sample(d, x0_model, x, jnp.full((4,), 9), jax.random.key(1),
                       cond_fn=cond)
  np.testing.assert_allclose(step["pred_xstart"], 0.5 * np.tanh(np.asarray(x)), rtol=1e-6)
  out = S.sample_steps(d, x0_model, x, jax.random.key(1), 10, 0, sampler="ddim",
                       cond_fn=cond)
  assert np.isfinite(np.asarray(out)).all()
  # Its gradient too: the unused guided branch once gave 0 * inf = NaN. The
  # gradient of a guided DDIM step (t = 9, abar = 0, and t = 3) with respect
  # to the model's scale against central differences.
  scaled = lambda w: lambda x, t: w * jnp.tanh(x)
  t = jnp.array([9, 3, 9, 3])
  f = lambda w: S.ddim_sample(d, scaled(w), x, t, jax.random.key(1),
                              cond_fn=cond)["sample"].sum()
  grad = float(jax.grad(f)(0.5))
  h = 1e-2
  numeric = (float(f(0.5 + h)) - float(f(0.5 - h))) / (2 * h)
  assert np.isfinite(grad) and abs(grad - numeric) < 1e-3 * max(1.0, abs(numeric)), (grad, numeric)


def test_inpainting_mask_and_resample_are_checked():
  d = D.GaussianDiffusion.create(schedules.get_beta_schedule("linear", 5))
  model = lambda x, t: jnp.zeros_like(x)
  x = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match=r"known_mask has shape \(3, 3\); it must have x's rank"):
    S.sample_steps(d, model, x, jax.random.key(0), 5, 0, known=x,
                   known_mask=jnp.ones((3, 3)))
  with pytest.raises(ValueError, match="resample must be an int, got 2.5"):
    S.sample_steps(d, model, x, jax.random.key(0), 5, 0, known=x,
                   known_mask=jnp.ones((2, 4, 4, 1)), resample=2.5)
