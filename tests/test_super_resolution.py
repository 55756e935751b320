"""Cascaded super-resolution: conditioning math, the conditional U-Net, training."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_sr
import oracles
from tiny_models import init_random
from ddpm_jax import checkpointing
from ddpm_jax import models
from ddpm_jax import sampling
from ddpm_jax import schedules
from ddpm_jax import super_resolution as sr
from ddpm_jax import train_state as ts
from ddpm_jax import train_step as step_lib
from ddpm_jax import trainer
from ddpm_jax.data import digits as digits_data




@pytest.fixture(scope="module")
def sr_model():
  """The tiny 8 -> 16 SR U-Net with random (non-zero everywhere) params."""
  return init_random(digits_sr.get_config("test"))


def _count(params):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# Pure conditioning helpers against float64 numpy.


def test_downsample_area_is_the_block_mean():
  x = np.random.default_rng(0).normal(size=(2, 12, 12, 3))
  got = np.asarray(sr.downsample_area(jnp.asarray(x, jnp.float32), 4))
  want = np.zeros((2, 4, 4, 3))
  for i in range(4):
    for j in range(4):
      want[:, i, j] = x[:, 3 * i:3 * i + 3, 3 * j:3 * j + 3].mean(axis=(1, 2))
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="must divide"):
    sr.downsample_area(jnp.zeros((1, 12, 12, 1)), 5)


def test_augment_matches_the_forward_process_with_level_zero_clean():
  config = digits_sr.get_config("test")  # T = 100
  d = models.create_diffusion(config)
  abar = np.cumprod(1.0 - schedules.get_beta_schedule("linear", 100))
  rng = np.random.default_rng(1)
  lr = rng.uniform(-1, 1, size=(4, 8, 8, 1))
  noise = rng.normal(size=lr.shape)
  levels = np.array([0, 1, 37, 100])
  got = np.asarray(sr.augment(d, jnp.asarray(lr, jnp.float32),
                              jnp.asarray(levels, jnp.int32),
                              jnp.asarray(noise, jnp.float32)))
  a = np.array([1.0] + [abar[s - 1] for s in levels[1:]])[:, None, None, None]
  np.testing.assert_allclose(got, np.sqrt(a) * lr + np.sqrt(1 - a) * noise,
                             atol=1e-6)
  np.testing.assert_array_equal(got[0], lr[0].astype(np.float32))
  respaced = sampling.respace(d, 10)[0]
  with pytest.raises(ValueError, match="un-respaced"):
    sr.augment(respaced, jnp.asarray(lr), jnp.asarray(levels), jnp.asarray(noise))
  # Indexing would clamp level 101 to 100 and wrap -1 to level 100: refused.
  for bad in ([0, 1, 37, 101], [-1, 1, 37, 100]):
    with pytest.raises(ValueError, match=r"aug_t out of range.*0\.\.100"):
      sr.augment(d, jnp.asarray(lr), jnp.asarray(bad, jnp.int32),
                 jnp.asarray(noise))
  for bad in (jnp.asarray(levels[:3], jnp.int32), jnp.asarray(levels, jnp.float32), 3):
    with pytest.raises(ValueError, match=r"aug_t must be an integer array of shape \[B\] = \(4,\)"):
      sr.augment(d, jnp.asarray(lr), bad, jnp.asarray(noise))
  # Under jit the levels are not known, only their shape and dtype.
  jitted = jax.jit(lambda lv: sr.augment(d, jnp.asarray(lr, jnp.float32), lv,
                                         jnp.asarray(noise, jnp.float32)))
  np.testing.assert_allclose(jitted(jnp.asarray(levels, jnp.int32)), got,
                             atol=1e-6)


def test_max_aug_level():
  assert sr.max_aug_level(1000, 0.2) == 200
  assert sr.max_aug_level(100, 0.0) == 0
  assert sr.max_aug_level(100, 1.0) == 100
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match="noise_aug_max"):
      sr.max_aug_level(100, bad)


def test_training_condition_downsamples_and_draws_levels_in_range():
  config = digits_sr.get_config("test")
  d = models.create_diffusion(config)
  x0 = jax.random.uniform(jax.random.key(0), (512, 16, 16, 1), minval=-1,
                          maxval=1)
  low_res, aug_t = sr.training_condition(d, x0, 8, 20, jax.random.key(1))
  aug_t = np.asarray(aug_t)
  assert low_res.shape == (512, 8, 8, 1) and aug_t.dtype == np.int32
  assert aug_t.min() == 0 and aug_t.max() == 20  # U{0..20}, 512 draws
  clean = aug_t == 0
  np.testing.assert_allclose(
      np.asarray(low_res)[clean],
      np.asarray(sr.downsample_area(x0, 8))[clean], atol=1e-6)
  # No augmentation when noise_aug_max = 0.
  low_res, aug_t = sr.training_condition(d, x0, 8, 0, jax.random.key(1))
  assert not np.any(np.asarray(aug_t))
  np.testing.assert_allclose(low_res, sr.downsample_area(x0, 8), atol=1e-6)
  with pytest.raises(TypeError, match="rng must be a PRNG key"):
    sr.training_condition(d, x0, 8, 20, 0)
  with pytest.raises(ValueError, match="one PRNG key for the batch"):
    sr.training_condition(d, x0, 8, 20, jax.random.split(jax.random.key(1), 512))
  for bad in (-1, 101):
    with pytest.raises(ValueError, match=r"max_level must lie in 0\.\.T = 0\.\.100"):
      sr.training_condition(d, x0, 8, bad, jax.random.key(1))


# ---------------------------------------------------------------------------
# The conditional U-Net.


def test_sr_unet_adds_exactly_the_conditioning_parameters():
  config = digits_sr.get_config("test")
  _, params = init_random(config, abstract=True)
  plain = digits_sr.get_config("test")
  plain.model.low_res_size = 0
  _, plain_params = init_random(plain, abstract=True)
  ch, c = config.model.ch, config.data.channels
  emb = 4 * ch
  extra = 9 * c * ch + (ch * emb + emb) + (emb * emb + emb)
  assert _count(params) == _count(plain_params) + extra
  assert params["conv_in"]["kernel"].shape == (3, 3, 2 * c, ch)
  assert "aug_dense_0" not in plain_params


def test_low_res_is_nearest_upsampled_and_concatenated_after_x(sr_model):
  model, params = sr_model
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 16, 16, 1))
  lr = rng.uniform(-1, 1, size=(2, 8, 8, 1))
  _, state = jax.jit(lambda p, x, lr: model.apply(
      {"params": p}, x, jnp.array([5, 60]), low_res=lr,
      aug_t=jnp.array([0, 3]),
      capture_intermediates=lambda mdl, _: mdl.name == "conv_in",
      mutable=["intermediates"]))(params, jnp.asarray(x, jnp.float32),
                                  jnp.asarray(lr, jnp.float32))
  got = np.asarray(state["intermediates"]["conv_in"]["__call__"][0])
  up = lr.repeat(2, axis=1).repeat(2, axis=2)
  want = oracles.conv3x3_f64(np.concatenate([x, up], axis=-1),
                             np.asarray(params["conv_in"]["kernel"], np.float64),
                             np.asarray(params["conv_in"]["bias"], np.float64))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_output_depends_on_low_res_and_aug_level(sr_model):
  model, params = sr_model
  apply = jax.jit(lambda p, x, t, lr, s: model.apply(
      {"params": p}, x, t, low_res=lr, aug_t=s))
  x = jax.random.normal(jax.random.key(4), (2, 16, 16, 1))
  t = jnp.array([10, 50])
  lr = jax.random.uniform(jax.random.key(5), (2, 8, 8, 1), minval=-1)
  zero = jnp.zeros((2,), jnp.int32)
  base = np.asarray(apply(params, x, t, lr, zero))
  assert np.abs(base - np.asarray(apply(params, x, t, -lr, zero))).max() > 1e-3
  assert np.abs(base - np.asarray(
      apply(params, x, t, lr, jnp.array([20, 20])))).max() > 1e-3
  # aug_t=None means level 0.
  np.testing.assert_allclose(base, jax.jit(lambda p: model.apply(
      {"params": p}, x, t, low_res=lr))(params), atol=1e-5)


def test_make_model_fn_feeds_the_augmented_low_res():
  config = digits_sr.get_config("test")
  d = models.create_diffusion(config)
  seen = {}

  def apply_fn(x, t, low_res, aug_t):
    seen.update(low_res=low_res, aug_t=aug_t)
    return x * 0.0 + 1.0

  lr = jax.random.uniform(jax.random.key(6), (3, 8, 8, 1), minval=-1)
  noise = jax.random.normal(jax.random.key(7), lr.shape)
  model_fn = sr.make_model_fn(apply_fn, d, lr, aug_level=30, noise=noise)
  out = model_fn(jnp.zeros((3, 16, 16, 1)), jnp.array([1, 2, 3]))
  np.testing.assert_array_equal(out, 1.0)
  a = float(np.cumprod(1.0 - schedules.get_beta_schedule("linear", 100))[29])
  np.testing.assert_allclose(seen["low_res"],
                             np.sqrt(a) * lr + np.sqrt(1 - a) * noise, atol=1e-6)
  np.testing.assert_array_equal(seen["aug_t"], [30, 30, 30])
  model_fn = sr.make_model_fn(apply_fn, d, lr)  # default: level 0, as given
  model_fn(jnp.zeros((3, 16, 16, 1)), jnp.array([1, 2, 3]))
  np.testing.assert_array_equal(seen["low_res"], lr)
  np.testing.assert_array_equal(seen["aug_t"], [0, 0, 0])


def test_make_model_fn_errors():
  config = digits_sr.get_config("test")
  d = models.create_diffusion(config)
  lr = jnp.zeros((2, 8, 8, 1))
  fn = lambda x, t, l, s: x  # noqa: E731
  with pytest.raises(ValueError, match="needs standard normal `noise`"):
    sr.make_model_fn(fn, d, lr, aug_level=5)
  with pytest.raises(ValueError, match="aug_level must be an int in 0..100"):
    sr.make_model_fn(fn, d, lr, aug_level=101)
  with pytest.raises(ValueError, match=r"low_res must be \[B, s, s, C\]"):
    sr.make_model_fn(fn, d, jnp.zeros((8, 8, 1)))


def test_bad_low_res_size_in_config():
  for size, match in ((5, "proper divisor"), (16, "proper divisor"),
                      (-2, "proper divisor")):
    config = digits_sr.get_config("test")
    config.model.low_res_size = size
    with pytest.raises(ValueError, match=match):
      models.create_model(config)


def test_missing_or_misshapen_low_res_and_unwanted_low_res(sr_model):
  model, params = sr_model
  x, t = jnp.zeros((2, 16, 16, 1)), jnp.zeros((2,), jnp.int32)
  # Shape errors are raised while tracing: eval_shape needs no compile.
  apply = lambda *a, **kw: jax.eval_shape(  # noqa: E731
      lambda p: model.apply({"params": p}, *a, **kw), params)
  with pytest.raises(ValueError, match="needs low_res"):
    apply(x, t)
  with pytest.raises(ValueError, match=r"low_res must have shape \(2, 8, 8, 1\)"):
    apply(x, t, low_res=jnp.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match="aug_t must have shape"):
    apply(x, t, low_res=jnp.zeros((2, 8, 8, 1)),
          aug_t=jnp.zeros((3,), jnp.int32))
  plain = digits_sr.get_config("test")
  plain.model.low_res_size = 0
  plain.data.image_size = 8
  model, params = init_random(plain, abstract=True)
  with pytest.raises(ValueError, match="not a super-resolution model"):
    apply(jnp.zeros((2, 8, 8, 1)), t, low_res=jnp.zeros((2, 4, 4, 1)))


# ---------------------------------------------------------------------------
# Sampling through make_model_fn with an exact (oracle) upsampler.


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_oracle_upsampler_samples_downsample_to_their_low_res(sampler):
  # Data: x0 = nearest_up(lr) + N(0, S^2) per pixel given lr, so the exact
  # noise predictor is known in closed form. Through make_model_fn and the
  # samplers, each sample must keep its own low-res image: area-downsampling
  # gives lr + the mean of 4 N(0, S^2) residuals (std S / 2), and the
  # residual has variance S^2. This checks the conditioning plumbing of
  # sampling exactly; the trained-network check is the slow test below.
  s = 0.1
  config = digits_sr.get_config()  # T = 1000: x_T is N(0, I) to 1e-5
  d = models.create_diffusion(config)

  def oracle(x_t, t, low_res, aug_t):
    del aug_t
    mu = jnp.repeat(jnp.repeat(low_res, 2, axis=1), 2, axis=2)
    abar = d.alphas_cumprod[t][:, None, None, None]
    x0 = mu + jnp.sqrt(abar) * s**2 / (abar * s**2 + 1 - abar) * (
        x_t - jnp.sqrt(abar) * mu)
    return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)

  n = 256
  lr = jax.random.uniform(jax.random.key(0), (n, 4, 4, 1), minval=-0.5,
                          maxval=0.5)
  model_fn = sr.make_model_fn(oracle, d, lr)
  loop = (sampling.p_sample_loop if sampler == "ancestral"
          else sampling.ddim_sample_loop)
  out = np.asarray(jax.jit(lambda k: loop(d, model_fn, (n, 8, 8, 1), k))(
      jax.random.key(1)), np.float64)
  lr = np.asarray(lr, np.float64)
  down = np.asarray(sr.downsample_area(out, 4))
  resid = out - lr.repeat(2, axis=1).repeat(2, axis=2)
  np.testing.assert_allclose(np.std(down - lr), s / 2, rtol=0.1)
  np.testing.assert_allclose(np.std(resid), s, rtol=0.1)
  assert abs(np.mean(resid)) < 0.01
  # Against another sample's low-res image the error is far larger.
  other = lr[np.roll(np.arange(n), 1)]
  assert np.mean(np.abs(down - other)) > 4 * np.mean(np.abs(down - lr))


# ---------------------------------------------------------------------------
# Training a tiny 8 -> 16 digits upsampler.


def _digits_16(split):
  source = digits_data.DigitsSource(split, 16)
  x = np.stack([source[i]["image"] for i in range(len(source))])
  return x.astype(np.float32) / 127.5 - 1.0


@pytest.mark.slow
def test_trained_upsampler_output_downsamples_to_its_low_res_input(tmp_path):
  # Minutes on 2 CPU cores: the default run has the oracle check above.
  steps = 600
  config = digits_sr.get_config()  # T = 1000, augmentation up to 0.2 T
  config.model.num_res_blocks = 1
  config.training.batch_size = 32
  config.training.num_train_steps = steps
  config.training.checkpoint_every_steps = steps
  config.training.log_every_steps = 50
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 20
  config.optim.ema_decay = 0.99
  workdir = str(tmp_path / "sr")
  trainer.train_and_evaluate(config, workdir)

  config, params, _ = checkpointing.load_params(workdir)
  model = models.create_model(config)
  d = models.create_diffusion(config)
  hi = _digits_16("test")[:64]
  lr = np.asarray(sr.downsample_area(jnp.asarray(hi), 8))
  shuffled = lr[np.roll(np.arange(64), 1)]  # another digit's low-res

  @jax.jit
  def sample(lr, rng):
    # The augmentation refers to the training process d; the ancestral
    # sampler runs on 100 respaced steps of it. (Deterministic DDIM is worse
    # this early in training: the x_0 predicted at t near T are still poor,
    # and DDIM carries that error along; measured err 0.34 against 0.17.)
    model_fn = sr.make_model_fn(
        lambda x, t, l, s: model.apply({"params": params}, x, t, low_res=l,
                                       aug_t=s), d, lr)
    return sampling.p_sample_loop(sampling.respace(d, 100)[0], model_fn,
                                  hi.shape, rng)

  out = np.asarray(sample(jnp.asarray(lr), jax.random.key(0)))
  down = np.asarray(sr.downsample_area(jnp.asarray(out), 8))
  err = np.mean(np.abs(down - lr))          # to its own low-res input
  err_other = np.mean(np.abs(down - shuffled))  # to another digit's
  print(f"SR after {steps} steps: |down(out) - lr| = {err:.4f}, "
        f"vs another digit {err_other:.4f}")
  # Measured after 600 steps: 0.166 against 0.471. A longer run gets closer
  # (the denoising loss with the true low-res image is already 20x lower
  # than with another digit's at t = 100).
  assert err < 0.5 * err_other, (err, err_other)
  assert err < 0.25, err


def test_train_step_conditions_on_the_augmented_area_downsampled_batch():
  # A recording network: the step must pass low_res = the area-downsampled
  # batch, corrupted by q to the level aug_t ~ U{0..floor(0.5 T)} (0: clean).
  seen = {}

  class Recorder(flax.linen.Module):
    @flax.linen.compact
    def __call__(self, x, t, y=None, train=False, *, low_res=None, aug_t=None):
      jax.debug.callback(lambda a, b: seen.update(low_res=np.asarray(a),
                                                  aug_t=np.asarray(b)),
                         low_res, aug_t)
      return flax.linen.Conv(x.shape[-1], (1, 1))(x)

  config = digits_sr.get_config("test")  # T = 100
  config.model.noise_aug_max = 0.5
  d = models.create_diffusion(config)
  model = Recorder()
  state = ts.create_train_state(config, jax.random.PRNGKey(0), model)
  step = jax.jit(step_lib.make_train_step(config, model, d))
  x0 = np.random.default_rng(0).uniform(-1, 1, (256, 16, 16, 1))
  step(state, {"image": x0.astype(np.float32),
               "label": np.zeros(256, np.int32)})
  jax.effects_barrier()  # the recording callback has run

  s = seen["aug_t"]
  assert s.min() == 0 and s.max() == 50 and len(np.unique(s)) > 30
  down = x0.reshape(256, 8, 2, 8, 2, 1).mean(axis=(2, 4))
  abar = np.concatenate([[1.0], np.cumprod(
      1 - schedules.get_beta_schedule("linear", 100))])[s][:, None, None, None]
  np.testing.assert_allclose(seen["low_res"][s == 0], down[s == 0], atol=1e-6)
  noisy = s > 0
  eps = ((seen["low_res"][noisy] - np.sqrt(abar[noisy]) * down[noisy])
         / np.sqrt(1 - abar[noisy]))
  assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03
