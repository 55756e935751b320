"""Winograd F(2x2, 3x3) convolutions against direct ones."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from tiny_models import random_params, tiny_config
from ddpm_jax import models
from ddpm_jax.models import layers
from ddpm_jax.models import winograd


def _direct(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Rounding of O(1) values through the transforms: relative to the output's
# scale (module docstring).
TOLERANCE = {2: 2e-5, 4: 1e-4}


@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("shape", [(2, 8, 8, 4, 5), (1, 5, 7, 3, 2),
                                   (3, 1, 1, 6, 4), (2, 2, 3, 32, 16),
                                   (1, 16, 16, 64, 64), (1, 6, 10, 8, 8)])
def test_equals_float64_convolution(shape, tile):
  b, h, w, cin, cout = shape
  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal((b, h, w, cin))
  kernel = rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)
  want = oracles.conv3x3_f64(x, kernel, 0.0)
  got = np.asarray(jax.jit(winograd.conv3x3, static_argnums=2)(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), tile))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=TOLERANCE[tile] * np.abs(want).max())


@pytest.mark.parametrize("tile", winograd.TILES)
def test_each_kernel_tap_lands_where_the_definition_says(tile):
  # A single 1 in the kernel at (di, dj) and a single 1 in the image at
  # (i, j): the output is 1 exactly at (i - di + 1, j - dj + 1).
  x = np.zeros((1, 6, 6, 1), np.float32)
  x[0, 2, 3, 0] = 1.0
  for di in range(3):
    for dj in range(3):
      k = np.zeros((3, 3, 1, 1), np.float32)
      k[di, dj] = 1.0
      y = np.asarray(winograd.conv3x3(jnp.asarray(x), jnp.asarray(k), tile))
      want = np.zeros_like(y)
      want[0, 2 - di + 1, 3 - dj + 1, 0] = 1.0
      np.testing.assert_allclose(y, want, atol=1e-6)


@pytest.mark.parametrize("tile", winograd.TILES)
def test_gradients_equal_the_direct_convolutions(tile):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 10, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 4)) / 8, jnp.float32)
  target = jnp.asarray(rng.standard_normal((2, 6, 10, 4)), jnp.float32)

  def loss(conv):
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k)) * target)

  conv = lambda x, k: winograd.conv3x3(x, k, tile)
  gx, gk = jax.grad(loss(conv), argnums=(0, 1))(x, kernel)
  wx, wk = jax.grad(loss(_direct), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(gx, wx, atol=TOLERANCE[tile] * np.abs(wx).max())
  np.testing.assert_allclose(gk, wk, atol=TOLERANCE[tile] * np.abs(wk).max())


def test_bfloat16_stays_close():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 8, 8, 32))
  kernel = rng.standard_normal((3, 3, 32, 32)) / np.sqrt(9 * 32)
  want = oracles.conv3x3_f64(x, kernel, 0.0)
  got = winograd.conv3x3(jnp.asarray(x, jnp.bfloat16),
                         jnp.asarray(kernel, jnp.bfloat16), 2)
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
  assert err < 0.03
  # F(4x4, 3x3) is not used in bfloat16 (its error there is ~8%).
  assert layers.winograd_tile("auto", 8, 32, 32, 128, 128, jnp.bfloat16) == 2
  assert layers.winograd_tile("winograd", 8, 32, 32, 128, 128,
                              jnp.bfloat16) == 2


def test_mismatched_kernel_is_refused():
  with pytest.raises(ValueError, match="does not fit"):
    winograd.conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 4, 8)))
  with pytest.raises(ValueError, match=r"NHWC x and HWIO kernel, got shapes \(4, 4, 3\)"):
    winograd.conv3x3(jnp.zeros((4, 4, 3)), jnp.zeros((3, 3, 3, 8)))
  for tile in (3, 4.0, True):  # 4.0 == 4 failed inside jnp.pad instead
    with pytest.raises(ValueError, match=f"tile must be one of .*got {tile!r}"):
      winograd.conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 8)), tile)
  x = np.random.default_rng(0).standard_normal((1, 4, 4, 3)).astype(np.float32)
  k = np.random.default_rng(1).standard_normal((3, 3, 3, 8)).astype(np.float32)
  np.testing.assert_array_equal(winograd.conv3x3(x, k, np.int64(4)),
                                winograd.conv3x3(x, k, 4))


def test_conv3x3_module_matches_flax_conv_for_both_algorithms():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 6)),
                  jnp.float32)
  ref = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)),
                kernel_init=layers.default_init)
  params = ref.init(jax.random.key(0), x)
  trained = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias too
  want = np.asarray(ref.apply(trained, x))
  for algorithm in ("direct", "winograd"):
    mod = layers.Conv3x3(5, algorithm=algorithm)
    # Same names, shapes and initial values as nn.Conv with the same
    # initialiser: checkpoints carry over.
    jax.tree.map(np.testing.assert_array_equal,
                 mod.init(jax.random.key(0), x), params)
    np.testing.assert_allclose(mod.apply(trained, x), want, atol=1e-5)


def test_algorithm_choice_by_backend_and_size(monkeypatch):
  # The cases below are worked out for these thresholds.
  assert layers.MIN_WINOGRAD_ROWS == layers.MIN_WINOGRAD_CHANNELS == 128
  cases = {(8, 32, 32, 128, 128): 4, (8, 16, 16, 512, 256): 4,
           (8, 8, 8, 256, 256): 2, (8, 4, 4, 256, 256): 0,
           (2, 32, 32, 128, 128): 4, (2, 16, 16, 256, 256): 2,
           (1, 5, 7, 128, 128): 0, (8, 32, 32, 3, 128): 0,
           (8, 32, 32, 128, 3): 0, (64, 16, 16, 64, 64): 0}
  assert jax.default_backend() == "cpu"
  for shape, tile in cases.items():
    assert layers.winograd_tile("auto", *shape) == tile, shape
    forced = 4 if shape[0] * -(-shape[1] // 4) * -(-shape[2] // 4) >= 128 else 2
    assert layers.winograd_tile("winograd", *shape) == forced, shape
    assert layers.winograd_tile("direct", *shape) == 0
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.winograd_tile("auto", 8, 32, 32, 128, 128) == 0
  assert layers.winograd_tile("winograd", 8, 32, 32, 128, 128) == 4
  with pytest.raises(ValueError, match="not one of"):
    layers.winograd_tile("fft", 8, 32, 32, 128, 128)
  config = tiny_config()
  config.model.conv_algorithm = "fft"
  with pytest.raises(ValueError, match="model.conv_algorithm"):
    models.create_model(config)


def test_unet_and_its_gradient_agree_across_algorithms():
  config = tiny_config(num_classes=3)
  params = random_params(config)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
  t = jnp.array([3, 17])
  y = jnp.array([0, 2])
  out, grads = {}, {}
  for algorithm in ("direct", "winograd"):
    config.model.conv_algorithm = algorithm
    model = models.create_model(config)

    def loss(p, model=model):
      eps = model.apply({"params": p}, x, t, y)
      return jnp.sum(eps ** 2), eps

    grads[algorithm], eps = jax.jit(jax.grad(loss, has_aux=True))(params)
    out[algorithm] = np.asarray(eps)
  scale = np.abs(out["direct"]).max()
  assert scale > 0.1
  np.testing.assert_allclose(out["winograd"], out["direct"], atol=1e-5 * scale)
  # Relative to the largest gradient: some leaves are zero up to rounding
  # (a conv bias that feeds a one-channel-per-group GroupNorm).
  top = max(np.abs(g).max() for g in jax.tree.leaves(grads["direct"]))
  assert top > 0.1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * top),
               grads["winograd"], grads["direct"])
