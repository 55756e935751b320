"""Random model parameters without compiling an init, shared by the tests."""
import flax
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
  shapes = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw),
                          models.init_kwargs(config, 1))["params"]
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


def init_random(config, batch=2, abstract=False):
  """(model, params): random numpy params, or shapes only when `abstract`.

  Every leaf gets N(0, 0.1^2) values (GroupNorm scales 1 + that), so no part
  of the network is zero as in the real initialisation and the checks below
  are not vacuous; no init program is compiled (that takes ~15 s here).
  """
  model = models.create_model(config)
  init = lambda kw: model.init({"params": jax.random.key(0)}, **kw)  # noqa: E731
  shapes = jax.eval_shape(init, models.init_kwargs(config, batch))["params"]
  if abstract:
    return model, shapes
  rng = np.random.default_rng(0)
  flat = flax.traverse_util.flatten_dict(shapes)
  return model, flax.traverse_util.unflatten_dict({
      k: jnp.asarray((k[-1] == "scale") + 0.1 * rng.normal(size=v.shape),
                     jnp.float32) for k, v in flat.items()})


class TinyFeatures(flax.linen.Module):
  """Stands in for `metrics.InceptionV3` where only the plumbing is tested:
  its outputs ('pool3' [B, 6], 'logits' [B, 4]) from a 9x9 subsample of the
  299x299 input, in milliseconds."""

  @flax.linen.compact
  def __call__(self, x):
    h = x[:, ::37, ::37, :].reshape(len(x), -1)
    return {"pool3": flax.linen.Dense(6)(h), "logits": flax.linen.Dense(4)(h)}


def tiny_features_params():
  h = 9 * 9 * 3
  rng = np.random.default_rng(7)
  dense = lambda n: {"kernel": jnp.asarray(rng.standard_normal((h, n)) / np.sqrt(h),
                                           jnp.float32),
                     "bias": jnp.asarray(rng.standard_normal(n), jnp.float32)}
  return {"Dense_0": dense(6), "Dense_1": dense(4)}
