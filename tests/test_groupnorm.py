"""The U-Net's GroupNorm against an independent float64 numpy computation and
against flax.linen.GroupNorm (same parameters, same results)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import layers


def numpy_group_norm(x, scale, bias, groups, eps):
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
  return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


@pytest.mark.parametrize("shape, groups, offset", [
    ((2, 4, 4, 64), 32, 0.0),
    ((3, 8, 2, 96), 32, 0.0),
    ((2, 4, 4, 8), 4, 0.0),
    # A large common offset: E[x^2] - E[x]^2 in float32 would lose the variance.
    ((2, 4, 4, 64), 32, 1000.0),
])
def test_matches_float64_numpy(shape, groups, offset):
  kx, ks, kb = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, shape) * 2.0 + offset
  scale = 1.0 + 0.3 * jax.random.normal(ks, shape[-1:])
  bias = 0.3 * jax.random.normal(kb, shape[-1:])
  module = layers.GroupNorm(num_groups=groups, epsilon=1e-6)
  y = module.apply({"params": {"scale": scale, "bias": bias}}, x)
  expected = numpy_group_norm(x, scale, bias, groups, 1e-6)
  assert y.dtype == jnp.float32 and y.shape == shape
  np.testing.assert_allclose(np.asarray(y), expected, atol=2e-4 if offset else 2e-5, rtol=0)


def test_same_params_and_values_as_flax_group_norm():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 64)) * 3.0 + 0.5
  ours = layers.group_norm(jnp.float32, "norm")
  theirs = nn.GroupNorm(num_groups=32, epsilon=1e-6)
  p_ours = ours.init(jax.random.PRNGKey(2), x)["params"]
  p_theirs = theirs.init(jax.random.PRNGKey(2), x)["params"]
  assert jax.tree.map(lambda a: (a.shape, a.dtype), p_ours) == jax.tree.map(
      lambda a: (a.shape, a.dtype), p_theirs)
  params = {"scale": 1.0 + 0.1 * jnp.arange(64.0) / 64, "bias": jnp.linspace(-1.0, 1.0, 64)}
  np.testing.assert_allclose(np.asarray(ours.apply({"params": params}, x)),
                             np.asarray(theirs.apply({"params": params}, x)), atol=1e-5)
  # Gradients agree too (the train step differentiates through it).
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_theirs = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_bfloat16_output_float32_stats():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 64)) * 2.0 + 3.0
  module = layers.GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.bfloat16)
  params = {"scale": jnp.ones((64,)), "bias": jnp.zeros((64,))}
  y = module.apply({"params": params}, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  expected = numpy_group_norm(np.asarray(x.astype(jnp.bfloat16), np.float64),
                              params["scale"], params["bias"], 32, 1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.05)


def test_bad_channel_count():
  with pytest.raises(ValueError, match="do not split into 32 groups"):
    layers.GroupNorm(num_groups=32).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 48)))


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_one_pass_and_two_pass_centring_against_float64(offset):
  """Both forms (one pass runs on GPU/TPU, two passes on a CPU) against numpy
  float64, a large mean included, and their gradients agree."""
  x = (jax.random.normal(jax.random.PRNGKey(5), (3, 6, 5, 64)) * 2.0
       + jnp.linspace(-3.0, 3.0, 64)[None, None, None, :] + offset)
  g = np.asarray(x, np.float64).reshape(3, 6, 5, 16, 4)
  centred = (g - g.mean(axis=(1, 2, 4), keepdims=True)).reshape(3, 6, 5, 64)
  var = np.repeat(g.var(axis=(1, 2, 4)), 4, axis=1)  # [B, C]
  for centre in (layers.centre_one_pass, layers.centre_two_pass):
    c, v = centre(x, 16)
    assert c.shape == x.shape and v.shape == (3, 64)
    # At 1000 a float32 ulp is 6e-5: the mean itself is off by a few.
    np.testing.assert_allclose(np.asarray(c), centred, atol=5e-4 if offset else 2e-6)
    np.testing.assert_allclose(np.asarray(v), var, rtol=2e-4 if offset else 2e-6)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x, 16)[0])) + jnp.sum(jnp.cos(f(x, 16)[1]))
  g1 = jax.grad(loss(layers.centre_one_pass))(x)
  g2 = jax.grad(loss(layers.centre_two_pass))(x)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=2e-4 if offset else 1e-5)
