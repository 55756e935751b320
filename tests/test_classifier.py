"""The noise-aware classifier: architecture, validation, training, checkpoints."""
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_classifier
from tiny_models import init_random
from ddpm_jax import checkpointing
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import models
from ddpm_jax import train_state as ts
from ddpm_jax import train_step as step_lib
from ddpm_jax.data import digits as digits_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def test_create_model_gives_classifier_logits():
  config = digits_classifier.get_config("test")
  model, params = init_random(config)
  assert isinstance(model, models.Classifier)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  t = jnp.array([0, 50, 99], jnp.int32)
  apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
  logits = apply(params, x, t)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # Noise-aware: the same image at another t gets other logits.
  other = apply(params, x, jnp.array([99, 0, 50], jnp.int32))
  assert np.max(np.abs(np.asarray(other) - np.asarray(logits))) > 1e-4


def test_head_is_dense_of_global_average_pool():
  # Recompute the head in float64 numpy from the captured swish(GroupNorm)
  # features: logits = mean_{H,W}(features) @ W + b.
  config = digits_classifier.get_config("test")
  model, params = init_random(config)
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  t = jnp.array([3, 70], jnp.int32)
  logits, state = jax.jit(lambda p: model.apply(
      {"params": p}, x, t,
      capture_intermediates=lambda mdl, _: mdl.name == "norm_out",
      mutable=["intermediates"]))(params)
  normed = np.asarray(state["intermediates"]["norm_out"]["__call__"][0],
                      np.float64)
  feats = normed / (1.0 + np.exp(-normed))  # swish
  pooled = feats.mean(axis=(1, 2))
  w = np.asarray(params["head"]["kernel"], np.float64)
  b = np.asarray(params["head"]["bias"], np.float64)
  np.testing.assert_allclose(np.asarray(logits), pooled @ w + b, atol=1e-5)


def test_encoder_parameters_match_the_unet_down_path():
  # Same blocks and names as the U-Net's down path and middle, so the
  # encoder is the U-Net's (and could be initialised from one).
  config = digits_classifier.get_config("test")
  _, cls_params = init_random(config, abstract=True)
  unet_config = digits_classifier.get_config("test")
  unet_config.model.name = "unet"
  unet_config.model.num_classes = 0
  _, unet_params = init_random(unet_config, abstract=True)
  cls_shapes = {k: v.shape for k, v in
                flax.traverse_util.flatten_dict(cls_params).items()
                if k[0] not in ("head", "norm_out")}
  unet_shapes = {k: v.shape for k, v in
                 flax.traverse_util.flatten_dict(unet_params).items()}
  for k, shape in cls_shapes.items():
    assert unet_shapes[k] == shape, k
  assert {k[0] for k in cls_shapes} == {
      k[0] for k in unet_shapes
      if not k[0].startswith("up_") and k[0] not in ("conv_out", "norm_out")}


@pytest.mark.parametrize("num_classes", [0, 1, -3])
def test_bad_num_classes(num_classes):
  config = digits_classifier.get_config("test")
  config.model.num_classes = num_classes
  with pytest.raises(ValueError, match="model.num_classes.*>= 2"):
    models.create_model(config)


def test_num_classes_must_match_the_data():
  config = digits_classifier.get_config("test")
  config.model.num_classes = 5
  with pytest.raises(ValueError, match="data.num_classes=10"):
    models.create_model(config)


def test_guidance_needs_a_classifier_of_the_same_noise_levels():
  """It reads x_t at the model's levels: the same T and the same betas."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from ddpm_jax import generation  # pylint: disable=g-import-not-at-top
  base = digits.get_config("test")
  classifier = digits_classifier.get_config("test")
  classifier.diffusion.num_timesteps = base.diffusion.num_timesteps
  options = generation.SamplerOptions(classifier_scale=1.0)
  check = lambda: generation.check_request(  # noqa: E731
      base, num_samples=2, batch_size=2, options=options,
      classifier_config=classifier)
  check()
  classifier.diffusion.beta_schedule = "cosine"
  with pytest.raises(ValueError, match=r"other noise levels than the model "
                     r"\(betas cosine .* against linear"):
    check()
  classifier.diffusion.beta_schedule = base.diffusion.beta_schedule
  classifier.diffusion.beta_end = 2 * base.diffusion.beta_end
  with pytest.raises(ValueError, match="other noise levels"):
    check()


def test_label_dropout_is_refused_for_a_classifier(tmp_path):
  from ddpm_jax import trainer  # pylint: disable=g-import-not-at-top
  config = digits_classifier.get_config("test")
  config.training.label_dropout = 0.2
  with pytest.raises(ValueError, match="label_dropout=0.2 applies to a "
                     "class-conditional diffusion model, not to a classifier"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_classifier_rejects_a_class_label_argument():
  config = digits_classifier.get_config("test")
  model, params = init_random(config, abstract=True)
  x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(TypeError, match="positional"):
    jax.eval_shape(lambda p: model.apply({"params": p}, x, t,
                                         jnp.zeros((2,), jnp.int32)), params)


def _test_digits():
  images, labels = digits_data.load_digits_uint8("test")
  return images.astype(np.float32) / 127.5 - 1.0, labels


def _accuracy(model, params, d, x0, labels, t_value, seed):
  t = jnp.full((x0.shape[0],), t_value, jnp.int32)
  noise = jax.random.normal(jax.random.key(seed), x0.shape)
  x_t = diffusion_lib.q_sample(d, jnp.asarray(x0), t, noise)
  logits = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(
      params, x_t, t)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


@pytest.mark.slow  # 20-60 s on 2 quiet cores: the default run stays under 15 min
def test_train_cli_classifier_is_accurate_and_noise_aware(tmp_path):
  # 200 updates of configs/digits_classifier.py (one ResNet block per level)
  # through the train CLI: about a minute on 2 loaded cores.
  workdir = tmp_path / "cls"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  overrides = {"model.num_res_blocks": 1, "training.num_train_steps": 200,
               "training.checkpoint_every_steps": 200,
               "training.log_every_steps": 100, "optim.lr": 2e-3,
               "optim.warmup_steps": 20, "optim.ema_decay": 0.99}
  r = subprocess.run(
      [sys.executable, "-m", "ddpm_jax.train", "--config",
       "configs/digits_classifier.py", "--workdir", str(workdir)]
      + [f"--config.{k}={v}" for k, v in overrides.items()],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  config, params, step = checkpointing.load_params(str(workdir))
  assert step == 200 and config.model.name == "classifier"
  assert params["head"]["kernel"].shape == (32 * 2, 10)
  assert not (workdir / "samples").exists()  # no sample grids
  last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert 0.0 <= last["accuracy"] <= 1.0

  model = models.create_model(config)
  d = models.create_diffusion(config)
  x0, labels = _test_digits()  # 297 held-out digits, 27..33 per class
  clean = _accuracy(model, params, d, x0, labels, 10, seed=0)
  noisy = _accuracy(model, params, d, x0, labels, 950, seed=1)
  print(f"classifier accuracy on test digits: t=10 {clean:.3f}, "
        f"t=950 {noisy:.3f}")
  # Chance is 0.1 (measured: 0.865 at t = 10, 0.091 at t = 950, where
  # abar ~ 5e-5 and the image is nearly pure noise).
  assert clean > 0.6, clean
  assert noisy < clean - 0.3, (clean, noisy)


def test_train_step_is_cross_entropy_on_noised_images():
  # A linear classifier records what the step feeds it; the step's loss and
  # accuracy must be the float64 cross-entropy / accuracy of those inputs,
  # and the inputs x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps
  # standard normal and no class label passed.
  seen = {}

  class Recorder(flax.linen.Module):
    @flax.linen.compact
    def __call__(self, x, t, *, train=False):
      jax.debug.callback(lambda a, b: seen.update(x=np.asarray(a),
                                                  t=np.asarray(b)), x, t)
      return flax.linen.Dense(10)(x.reshape(x.shape[0], -1))

  config = digits_classifier.get_config("test")  # T = 100
  d = models.create_diffusion(config)
  model = Recorder()
  state = ts.create_train_state(config, jax.random.PRNGKey(0), model)
  step = jax.jit(step_lib.make_train_step(config, model, d))
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (256, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 256).astype(np.int32)
  _, metrics = step(state, {"image": x0, "label": labels})
  jax.effects_barrier()  # the recording callback has run

  w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
  logits = seen["x"].reshape(256, -1).astype(np.float64) @ w + b
  logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + (
      logits.max(1))
  ce = np.mean(logz - logits[np.arange(256), labels])
  np.testing.assert_allclose(float(metrics["loss"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]),
                             np.mean(logits.argmax(1) == labels), atol=1e-7)
  abar = np.asarray(d.alphas_cumprod, np.float64)[seen["t"]][:, None, None, None]
  eps = (seen["x"] - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
  assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03
  assert seen["t"].min() >= 0 and seen["t"].max() < 100
  assert len(np.unique(seen["t"])) > 50  # t ~ U{0..99}
