"""Tests of the DDPM U-Net: parameter counts, initialisation, conditioning, dtypes."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import celebahq256, cifar10, default
from configs import lsun_bedroom256, lsun_cat256, lsun_church256
from ddpm_jax import models
from ddpm_jax.models import layers


def tiny_config(**model_overrides):
  """A 16x16 U-Net with attention at 8x8 (down, middle and up paths)."""
  config = default.get_config()
  config.data.image_size = 16
  config.data.channels = 3
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0
  for k, v in model_overrides.items():
    config.model[k] = v
  return config


def count_params(config):
  model = models.create_model(config)
  size = config.data.image_size
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)},
                         jnp.zeros((1, size, size, config.data.channels)),
                         jnp.zeros((1,), jnp.int32)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def jit_apply(model):
  # Eager Flax dispatches op by op; one compiled program is much faster.
  return jax.jit(model.apply, static_argnames="train")


def init(config, batch=2, y=None):
  """Really initialises a model (slow to compile: use once per test module)."""
  model = models.create_model(config)
  size = config.data.image_size
  x = jnp.zeros((batch, size, size, config.data.channels))
  t = jnp.zeros((batch,), jnp.int32)
  params = jax.jit(model.init)({"params": jax.random.key(0)}, x, t, y)["params"]
  return model, params


def random_params(config, seed=1):
  """Parameters of the right shapes, every one random (no zero layers).

  Filled with numpy from the shapes that ``init`` would produce, which avoids
  compiling ``init``; kernels get std 1/sqrt(fan_in) so activations stay O(1).
  """
  model = models.create_model(config)
  size = config.data.image_size
  y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)},
                         jnp.zeros((1, size, size, config.data.channels)),
                         jnp.zeros((1,), jnp.int32), y))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape)
    if name == "kernel":
      noise /= np.sqrt(math.prod(leaf.shape[:-1]))
    elif name == "scale":
      noise = 1.0 + 0.1 * noise
    elif name == "bias":
      noise *= 0.1
    return jnp.asarray(noise, jnp.float32)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def random_inputs(config, batch, seed=2):
  kx, kt = jax.random.split(jax.random.key(seed))
  size = config.data.image_size
  x = jax.random.uniform(kx, (batch, size, size, config.data.channels),
                         minval=-1, maxval=1)
  t = jax.random.randint(kt, (batch,), 0, config.diffusion.num_timesteps)
  return x, t


@pytest.mark.parametrize("get_config, expected", [
    (cifar10.get_config, 35_746_307),
    (celebahq256.get_config, 113_673_219),
    (lsun_church256.get_config, 113_673_219),
    (lsun_bedroom256.get_config, 113_673_219),
    (lsun_cat256.get_config, 113_673_219),
])
def test_paper_parameter_counts(get_config, expected):
  assert count_params(get_config()) == expected


def test_learned_variance_doubles_output_channels():
  config = cifar10.get_config()
  config.diffusion.model_var_type = "learned_range"
  assert models.create_model(config).out_ch == 6
  # Only conv_out grows: 128 * 9 * 3 weights and 3 biases more.
  assert count_params(config) == 35_746_307 + 128 * 9 * 3 + 3


def test_timestep_embedding_matches_float64_formula():
  t = np.array([0, 1, 17, 999])
  dim = 16
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
  expected = np.concatenate(
      [np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  got = layers.timestep_embedding(jnp.asarray(t, jnp.int32), dim)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=2e-4)


def test_output_is_zero_at_init_and_only_the_documented_layers_are_zero():
  config = tiny_config()
  model, params = init(config)
  x, t = random_inputs(config, 2)
  apply = jit_apply(model)
  out = apply({"params": params}, x, t)
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)

  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  zero_kernels = sorted(
      "/".join(k.key for k in path[:-1]) for path, leaf in flat
      if path[-1].key == "kernel" and not np.any(np.asarray(leaf)))
  blocks = ["down_0_block_0", "down_1_block_0", "mid_block_0", "mid_block_1",
            "up_0_block_0", "up_0_block_1", "up_1_block_0", "up_1_block_1"]
  attns = ["down_1_attn_0", "mid_attn", "up_1_attn_0", "up_1_attn_1"]
  expected = sorted([f"{b}/conv_1" for b in blocks]
                    + [f"{a}/proj_out" for a in attns] + ["conv_out"])
  assert zero_kernels == expected

  # Every other kernel: the original DDPM code's Glorot-uniform, i.e.
  # U(-b, b) with b = sqrt(6 / (fan_in + fan_out)), fans counting the 3x3
  # receptive field: inside the bound, its variance b^2 / 3, and a uniform's
  # kurtosis 1.8 (a (truncated) normal has 2.5-3).
  checked = 0
  for path, leaf in flat:
    w = np.asarray(leaf, np.float64)
    if path[-1].key != "kernel" or not np.any(w):
      continue
    receptive = int(np.prod(w.shape[:-2])) if w.ndim > 2 else 1
    fan_in, fan_out = receptive * w.shape[-2], receptive * w.shape[-1]
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    name = "/".join(k.key for k in path)
    assert np.abs(w).max() <= bound, name
    if w.size >= 4096:
      checked += 1
      np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.1, err_msg=name)
      kurtosis = np.mean((w - w.mean())**4) / w.var()**2
      assert 1.7 < kurtosis < 1.9, (name, kurtosis)
  assert checked >= 10, checked

  # The zeros come from those layers alone: make them random and it moves.
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(1)  # numpy: eager jax ops would compile per shape
  perturbed = jax.tree.unflatten(treedef, [
      np.where(np.asarray(leaf) == 0,
               0.05 * rng.standard_normal(leaf.shape).astype(np.float32), leaf)
      for leaf in leaves])
  out = apply({"params": perturbed}, x, t)
  assert np.abs(np.asarray(out)).mean() > 1e-2


def test_downsample_is_tf_same_padding():
  # TF 'SAME' with stride 2 on an even size pads bottom/right only, so it
  # equals a stride-1 conv with padding 1 read at odd positions.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  down = layers.Downsample(with_conv=True)
  variables = down.init(jax.random.key(1), x)
  kernel = np.asarray(variables["params"]["conv"]["kernel"], np.float64)
  bias = np.asarray(variables["params"]["conv"]["bias"], np.float64)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  full = np.zeros((2, 8, 8, 4))
  for i in range(8):
    for j in range(8):
      full[:, i, j] = np.einsum("bhwc,hwco->bo", xp[:, i:i + 3, j:j + 3],
                                kernel) + bias
  expected = full[:, 1::2, 1::2]
  np.testing.assert_allclose(down.apply(variables, x), expected, atol=1e-4)


def test_upsample_is_nearest():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 2))
  up = layers.Upsample(with_conv=False)
  out = np.asarray(up.apply({}, x))
  xn = np.asarray(x)
  for i in range(6):
    for j in range(4):
      np.testing.assert_array_equal(out[0, i, j], xn[0, i // 2, j // 2])


def test_dropout_only_in_training():
  config = tiny_config(dropout=0.5)
  model, params = random_params(config)
  x, t = random_inputs(config, 2)
  apply = jit_apply(model)

  def run(train, seed):
    return np.asarray(apply({"params": params}, x, t, train=train,
                            rngs={"dropout": jax.random.key(seed)}))

  eval_a, eval_b = run(False, 0), run(False, 1)
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_allclose(  # without rngs: compiled separately
      eval_a, np.asarray(apply({"params": params}, x, t)), atol=1e-5)
  train_a, train_b = run(True, 0), run(True, 1)
  assert np.abs(train_a - train_b).max() > 1e-3
  assert np.abs(train_a - eval_a).max() > 1e-3
  np.testing.assert_array_equal(train_a, run(True, 0))  # keyed, not hidden RNG
  with pytest.raises(Exception, match="dropout"):
    model.apply({"params": params}, x, t, train=True)


def test_class_conditioning():
  config = tiny_config(num_classes=3)
  model, params = random_params(config)
  assert params["class_embed"]["embedding"].shape == (4, 128)
  x, t = random_inputs(config, 2)
  apply = jit_apply(model)

  def run(y):
    return np.asarray(apply({"params": params}, x, t, y))

  out_0 = run(jnp.array([0, 0], jnp.int32))
  out_1 = run(jnp.array([1, 1], jnp.int32))
  assert np.abs(out_0 - out_1).max() > 1e-3
  # None means "no class", which is id num_classes.
  np.testing.assert_array_equal(run(None), run(jnp.array([3, 3], jnp.int32)))
  assert np.abs(run(None) - out_0).max() > 1e-3
  # Labels are per example.
  mixed = run(jnp.array([0, 1], jnp.int32))
  np.testing.assert_allclose(mixed[0], out_0[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], out_1[1], atol=1e-5)

  uncond, uncond_params = random_params(tiny_config())
  with pytest.raises(ValueError, match="num_classes"):
    uncond.apply({"params": uncond_params}, x, t, jnp.array([0, 1]))
  # Ids outside 0..3 are refused: 4 read NaN from the embedding, -1 wrapped
  # to "no class" (jit traces y, so the check runs on concrete ids).
  for bad in ([4, 0], [-1, 0]):
    with pytest.raises(ValueError, match=rf"class ids \[{bad[0]}\] outside 0\.\.3"):
      model.apply({"params": params}, x, t, jnp.array(bad, jnp.int32))
  with pytest.raises(ValueError, match="integer class ids, got dtype float32"):
    model.apply({"params": params}, x, t, jnp.array([0.0, 1.0]))
  with pytest.raises(ValueError, match=r"NHWC images \[B, H, W, C\], got shape \(16, 16, 3\)"):
    model.apply({"params": params}, x[0], t[:1])


def test_bfloat16_compute_close_to_float32():
  config = tiny_config()
  model32, params = random_params(config)
  config.model.dtype = "bfloat16"
  model16 = models.create_model(config)
  x, t = random_inputs(config, 2)
  out32 = np.asarray(jit_apply(model32)({"params": params}, x, t))
  out16 = jit_apply(model16)({"params": params}, x, t)
  assert out16.dtype == jnp.float32
  # Parameters created under bfloat16 compute stay float32.
  p16 = jax.eval_shape(model16.init, {"params": jax.random.key(0)}, x, t)
  p16 = p16["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(p16)} == {jnp.dtype("float32")}
  err = np.abs(np.asarray(out16) - out32).max() / np.abs(out32).max()
  assert err < 5e-2, err
  assert err > 0  # it really computed in bfloat16


def test_any_batch_size_and_examples_are_independent():
  config = tiny_config()
  model, params = random_params(config)
  x, t = random_inputs(config, 3)
  apply = jit_apply(model)
  out3 = np.asarray(apply({"params": params}, x, t))
  for i in range(3):
    out1 = np.asarray(apply({"params": params}, x[i:i + 1], t[i:i + 1]))
    np.testing.assert_allclose(out1[0], out3[i], atol=1e-5)
  # Different timesteps give different outputs; a scalar t broadcasts.
  assert np.abs(out3[0] - np.asarray(
      apply({"params": params}, x[:1], t[1:2]))[0]).max() > 1e-4
  np.testing.assert_allclose(
      apply({"params": params}, x, t[0]),
      apply({"params": params}, x, jnp.full((3,), t[0])), atol=1e-6)


def test_remat_gives_same_values_and_gradients():
  # With dropout on: the recomputed forward must draw the same masks.
  config = tiny_config(dropout=0.3)
  model, params = random_params(config)
  config.model.remat = True
  remat_model = models.create_model(config)
  x, t = random_inputs(config, 2)

  def loss(m, seed):
    return lambda p: jnp.mean(m.apply(
        {"params": p}, x, t, train=True,
        rngs={"dropout": jax.random.key(seed)}) ** 2)

  v1, g1 = jax.jit(jax.value_and_grad(loss(model, 0)))(params)
  v2, g2 = jax.jit(jax.value_and_grad(loss(remat_model, 0)))(params)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  v3 = jax.jit(loss(remat_model, 1))(params)
  assert abs(float(v3) - float(v1)) > 1e-4 * abs(float(v1))  # masks matter
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_without_resampling_convs():
  config = tiny_config(resamp_with_conv=False)
  model, params = random_params(config)
  assert not any("sample" in k for k in params)  # avg-pool and plain repeat
  out = jit_apply(model)({"params": params},
                    *random_inputs(config, 1))
  assert out.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("section, key, value, match", [
    ("data", "image_size", 15, "divisible by"),
    ("model", "ch", 48, "multiple of 32"),
    ("model", "attn_resolutions", (16, 6), "never occur"),
    ("model", "ch_mult", (), "ch_mult"),
    ("model", "num_res_blocks", 0, "num_res_blocks"),
    ("model", "dropout", 1.0, "dropout"),
    ("model", "dtype", "float64", "model.dtype"),
    ("model", "name", "dit", "model.name"),
    ("model", "num_classes", -1, "num_classes"),
    ("diffusion", "model_var_type", "learnt", "model_var_type"),
])
def test_bad_config_raises_clear_error(section, key, value, match):
  config = tiny_config()
  config[section][key] = value
  with pytest.raises(ValueError, match=match):
    models.create_model(config)


def test_bad_input_shapes_raise():
  config = tiny_config()
  model, params = random_params(config)
  with pytest.raises(ValueError, match="divisible"):
    model.apply({"params": params}, jnp.zeros((1, 9, 9, 3)),
                jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match=r"\[B\]"):
    model.apply({"params": params}, jnp.zeros((2, 16, 16, 3)),
                jnp.zeros((3,), jnp.int32))


def test_create_diffusion_uses_the_config_schedule():
  pytest.importorskip("ddpm_jax.diffusion")
  config = tiny_config()
  config.diffusion.num_timesteps = 50
  config.diffusion.beta_start = 1e-3
  config.diffusion.beta_end = 0.05
  d = models.create_diffusion(config)
  assert d.num_timesteps == 50
  np.testing.assert_allclose(np.asarray(d.betas),
                             np.linspace(1e-3, 0.05, 50), rtol=1e-6)


# ---------------------------------------------------------------------------
# Improved DDPM's architecture options, against float64 numpy.


def _group_norm_f64(x, p):
  from test_groupnorm import numpy_group_norm  # pylint: disable=g-import-not-at-top
  return numpy_group_norm(x, np.asarray(p["scale"], np.float64),
                          np.asarray(p["bias"], np.float64), 32, 1e-6)


def _dense_f64(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _swish_f64(x):
  return x / (1 + np.exp(-x))


def _randomised(params, seed):
  """Every leaf replaced by N(0, 0.3^2) noise (zero-initialised layers included)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: (0.3 * rng.standard_normal(p.shape)).astype(np.float32), params)


def _attention_f64(x, params, heads):
  """AttnBlock's output in float64 numpy: x `[B, H, W, C]`, its parameters."""
  b, height, width, c = x.shape
  n, d = height * width, c // heads
  h = _group_norm_f64(x.astype(np.float64), params["norm"]).reshape(b, n, c)
  q, k, v = (_dense_f64(h, params[name]).reshape(b, n, heads, d) for name in "qkv")
  logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhij,bjhd->bihd", weights, v).reshape(b, n, c)
  return x + _dense_f64(out, params["proj_out"]).reshape(x.shape)


@pytest.mark.parametrize("heads", [1, 4])
def test_multi_head_attention_matches_float64(heads):
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 64)).astype(np.float32)
  block = layers.AttnBlock(num_heads=heads)
  params = _randomised(block.init(jax.random.key(0), x)["params"], seed=heads)
  got = jax.jit(block.apply)({"params": params}, x)

  want = _attention_f64(x, params, heads)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("heads", [1, 4])
def test_cudnn_attention_is_wired_as_jax_nn_expects(heads, monkeypatch):
  """'cudnn' hands jax.nn.dot_product_attention [B, HW, heads, D] arrays.

  No GPU here: the call is redirected to jax.nn's XLA implementation (the same
  contract), after checking that cuDNN was asked for. Both algorithms, in
  bfloat16, match float64 to bfloat16's precision and share parameters.
  """
  calls = []
  reference = jax.nn.dot_product_attention

  def fake_cudnn(q, k, v, *, implementation):
    calls.append((implementation, q.shape, q.dtype))
    return reference(q, k, v, implementation="xla")

  x = np.random.default_rng(0).standard_normal((2, 4, 4, 64)).astype(np.float32)
  einsum = layers.AttnBlock(jnp.bfloat16, heads, "einsum")
  cudnn = layers.AttnBlock(jnp.bfloat16, heads, "cudnn")
  params = _randomised(einsum.init(jax.random.key(0), x)["params"], seed=heads)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
  assert jax.tree.map(np.shape, cudnn.init(jax.random.key(0), x)["params"]) == (
      jax.tree.map(np.shape, params))
  got = np.asarray(cudnn.apply({"params": params}, x), np.float64)
  assert calls and all(c == ("cudnn", (2, 16, heads, 64 // heads), jnp.bfloat16)
                       for c in calls)
  monkeypatch.undo()
  other = np.asarray(einsum.apply({"params": params}, x), np.float64)

  want = _attention_f64(x, params, heads)
  scale = np.abs(want).max()
  for result in (got, other):
    assert np.abs(result - want).max() < 0.03 * scale
  # The attention's share of the output is ten times the tolerance, so the
  # check above tells a wrongly wired attention from a right one.
  assert np.abs(want - x).max() > 0.3 * scale


def test_cudnn_attention_refuses_a_cpu_and_float32():
  x = np.zeros((1, 4, 4, 32), np.float32)
  with pytest.raises(ValueError, match="runs on an NVIDIA GPU; this backend is 'cpu'"):
    layers.AttnBlock(jnp.bfloat16, 1, "cudnn").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"model.attention_algorithm='bogus' is not one of"):
    models.create_model(tiny_config(attention_algorithm="bogus"))


def test_cudnn_attention_needs_half_precision(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x = np.zeros((1, 4, 4, 32), np.float32)
  with pytest.raises(ValueError, match="needs bfloat16 or float16 compute.*float32"):
    layers.AttnBlock(jnp.float32, 1, "cudnn").init(jax.random.key(0), x)


def test_heads_change_the_function_not_the_parameters():
  x = np.random.default_rng(1).standard_normal((1, 4, 4, 64)).astype(np.float32)
  one, four = layers.AttnBlock(num_heads=1), layers.AttnBlock(num_heads=4)
  params = _randomised(one.init(jax.random.key(0), x)["params"], seed=5)
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, four.init(jax.random.key(0), x)["params"])
  diff = np.abs(np.asarray(one.apply({"params": params}, x))
                - np.asarray(four.apply({"params": params}, x))).max()
  assert diff > 1e-2


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resnet_block_matches_float64(scale_shift):
  from oracles import conv3x3_f64  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 4, 4, 32)).astype(np.float32)
  temb = rng.standard_normal((2, 128)).astype(np.float32)
  block = layers.ResnetBlock(64, scale_shift=scale_shift, conv_algorithm="direct")
  params = _randomised(block.init(jax.random.key(0), x, temb, False)["params"], 3)
  assert params["temb_proj"]["kernel"].shape == (128, 128 if scale_shift else 64)
  got = jax.jit(block.apply, static_argnums=3)({"params": params}, x, temb, False)

  def conv(h, p):
    return conv3x3_f64(h, np.asarray(p["kernel"], np.float64),
                       np.asarray(p["bias"], np.float64))

  x64 = x.astype(np.float64)
  h = conv(_swish_f64(_group_norm_f64(x64, params["norm_0"])), params["conv_0"])
  e = _dense_f64(_swish_f64(temb.astype(np.float64)), params["temb_proj"])[:, None, None, :]
  if scale_shift:  # improved-diffusion: out_norm(h) * (1 + scale) + shift
    h = _group_norm_f64(h, params["norm_1"]) * (1 + e[..., :64]) + e[..., 64:]
  else:  # DDPM: the embedding is added before the second GroupNorm
    h = _group_norm_f64(h + e, params["norm_1"])
  h = conv(_swish_f64(h), params["conv_1"])
  want = _dense_f64(x64, params["shortcut"]) + h
  np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-4)


def test_rescaled_timesteps_embed_t_times_1000_over_T():
  config = tiny_config(rescale_timesteps=True)
  config.diffusion.num_timesteps = 4000
  plain = tiny_config()
  plain.diffusion.num_timesteps = 4000
  rescaled, model = models.create_model(config), models.create_model(plain)
  assert rescaled.time_scale == 0.25 and model.time_scale == 1.0
  x = np.random.default_rng(4).standard_normal((2, 16, 16, 3)).astype(np.float32)
  params = _randomised(init(plain)[1], seed=6)
  got = jit_apply(rescaled)({"params": params}, x, jnp.array([400, 3999], jnp.int32))
  want = jit_apply(model)({"params": params}, x, jnp.array([100.0, 999.75], jnp.float32))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  other = jit_apply(model)({"params": params}, x, jnp.array([400, 3999], jnp.int32))
  assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-3


def test_bad_architecture_options_name_the_key():
  with pytest.raises(ValueError, match=r"model.num_heads=3 does not divide .*\[32, 64\]"):
    models.create_model(tiny_config(num_heads=3))
  with pytest.raises(ValueError, match="model.num_heads must be an int >= 1"):
    models.create_model(tiny_config(num_heads=0))
  # Checked before the head count divides them (a string was a TypeError).
  for ch_mult in ((1, "a"), (), (1, True)):
    with pytest.raises(ValueError, match=r"model.ch_mult must be a non-empty sequence "
                                         r"of positive ints, e.g. \(1, 2, 2, 2\)"):
      models.create_model(tiny_config(ch_mult=ch_mult, num_heads=2))
