"""A tiny digits model with random (non-zero-head) weights, shared by CLI tests."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import digits
from ddpm_jax import models


def tiny_config(num_classes=0):
  """digits.py:test with T = 20: seconds to sample or evaluate."""
  config = digits.get_config("test")
  config.diffusion.num_timesteps = 20
  config.model.num_classes = num_classes
  return config


def random_params(config, seed=0):
  """Random params of the right shapes, with a non-zero (not zero-init) head.

  Drawn directly rather than by `model.init`, whose compilation takes tens of
  seconds on a busy 2-core machine: kernels ~ N(0, 1/fan_in), norm scales
  ~ 1 + N(0, 0.05^2), biases and embeddings ~ N(0, 0.05^2).
  """
  model = models.create_model(config)
  x = jnp.zeros((1, config.data.image_size, config.data.image_size,
                 config.data.channels))
  cond = {}
  low_res_size = config.model.get("low_res_size", 0)
  if low_res_size:  # a super-resolution model
    cond = dict(low_res=jnp.zeros((1, low_res_size, low_res_size,
                                   config.data.channels)),
                aug_t=jnp.zeros((1,), jnp.int32))
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), x, jnp.zeros((1,), jnp.int32), None, **cond))["params"]
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  leaves = []
  for path, leaf in flat:
    name = str(path[-1].key)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "kernel":
      leaves.append(noise / np.sqrt(np.prod(leaf.shape[:-1])))
    elif name == "scale":
      leaves.append(1.0 + 0.05 * noise)
    else:
      leaves.append(0.05 * noise)
  return jax.tree.unflatten(treedef, [jnp.asarray(v) for v in leaves])
