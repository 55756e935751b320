"""Our sampling loops against diffusers' DDPM and DDIM schedulers (the peer).

The same eps network (one closed-form function, written in JAX and in torch),
the same x_T and the same noise at every step: a chain of `p_sample_loop` or
`ddim_sample_loop` and the scheduler's loop must end in the same images. This
checks the posterior, the three variance choices, x_0 clipping, the step
spacings of respacing and DDIM's eta against code written independently.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

from ddpm_jax import diffusion as D  # noqa: E402
from ddpm_jax import sampling, schedules  # noqa: E402

T = 1000
SHAPE = (2, 4, 4, 3)  # NHWC; the schedulers see NCHW
SEED = 7


def eps_jax(x, t):
  """A smooth eps 'network' of x and the original timestep t ([B] int)."""
  scale = 0.6 + t.astype(jnp.float32)[:, None, None, None] / 2000.0
  return jnp.tanh(1.3 * x) * scale


def eps_torch(x, t: int):
  return torch.tanh(1.3 * x) * (0.6 + t / 2000.0)


def learned_jax(x, t):
  """eps and the variance interpolation v in [-1, 1], channels last."""
  return jnp.concatenate([eps_jax(x, t), jnp.sin(2.0 * x)], axis=-1)


def learned_torch(x, t: int):
  return torch.cat([eps_torch(x, t), torch.sin(2.0 * x)], dim=1)


def nchw(a) -> torch.Tensor:
  return torch.from_numpy(np.asarray(a, np.float32).transpose(0, 3, 1, 2).copy())


def our_noise(step: int) -> torch.Tensor:
  """The noise our chains draw at step `step` (fold_in(rng, t), documented)."""
  key = jax.random.fold_in(jax.random.PRNGKey(SEED), step)
  return nchw(jax.random.normal(key, SHAPE))


def process(var: str, steps: str = ""):
  d = D.GaussianDiffusion.create(
      schedules.get_beta_schedule("linear", T), model_var_type=var,
      loss_type="hybrid" if var == "learned_range" else "mse")
  return sampling.respace(d, steps)[0] if steps else d


@pytest.mark.parametrize("var, theirs", [("fixedsmall", "fixed_small"),
                                         ("fixedlarge", "fixed_large"),
                                         ("learned_range", "learned_range")])
@pytest.mark.parametrize("steps, spacing", [("", None), ("ddim50", "leading"),
                                            ("50", "linspace")])
def test_ancestral_chain_equals_diffusers_ddpm_scheduler(var, theirs, steps,
                                                         spacing, monkeypatch):
  d = process(var, steps)
  model_jax, model_torch = ((learned_jax, learned_torch) if var == "learned_range"
                            else (eps_jax, eps_torch))
  ours = sampling.p_sample_loop(d, model_jax, SHAPE, jax.random.PRNGKey(SEED))

  scheduler = diffusers.DDPMScheduler(
      num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4,
      beta_end=0.02, variance_type=theirs, clip_sample=True,
      timestep_spacing=spacing or "leading")
  if steps:
    scheduler.set_timesteps(50)
  k = d.num_timesteps
  # Their timesteps are the original ones our respaced steps map to.
  np.testing.assert_array_equal(scheduler.timesteps.numpy(),
                                np.asarray(d.timestep_map)[::-1])
  # Step i of ours is their (k-1-i)-th; neither adds noise at the last step.
  noises = iter([our_noise(i) for i in range(k - 1, 0, -1)])
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                      lambda *args, **kwargs: next(noises))
  x = our_noise(k)  # x_T: prior_sample folds in T
  for t in scheduler.timesteps.tolist():
    x = scheduler.step(model_torch(x, t), t, x).prev_sample
  assert next(noises, None) is None  # every step's noise was used
  np.testing.assert_allclose(nchw(ours).numpy(), x.numpy(), rtol=0, atol=1e-4)
  assert float(np.abs(np.asarray(ours)).max()) > 0.5  # not a trivial chain


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_chain_equals_diffusers_ddim_scheduler(eta):
  """diffusers with use_clipped_model_output=True: like DDIM's and
  improved-diffusion's code, the step's eps is re-derived from the clipped x_0."""
  d = process("fixedlarge", "ddim50")
  ours = sampling.ddim_sample_loop(d, eps_jax, SHAPE, jax.random.PRNGKey(SEED),
                                   eta=eta)

  scheduler = diffusers.DDIMScheduler(
      num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4,
      beta_end=0.02, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
      timestep_spacing="leading")
  scheduler.set_timesteps(50)
  np.testing.assert_array_equal(scheduler.timesteps.numpy(),
                                np.asarray(d.timestep_map)[::-1])
  k = d.num_timesteps
  x = our_noise(k)
  for j, t in enumerate(scheduler.timesteps.tolist()):
    x = scheduler.step(eps_torch(x, t), t, x, eta=eta,
                       use_clipped_model_output=True,
                       variance_noise=our_noise(k - 1 - j)).prev_sample
  np.testing.assert_allclose(nchw(ours).numpy(), x.numpy(), rtol=0, atol=1e-4)
  assert float(np.abs(np.asarray(ours)).max()) > 0.5
