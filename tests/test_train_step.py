"""The sharded train step: device-count independence, scan, optimiser, EMA."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax import parallel
from ddpm_jax import schedules
from ddpm_jax import train_state as ts
from ddpm_jax import train_step as step_lib


class TinyNet(nn.Module):
  """A few-parameter conv net with a time embedding and dropout."""

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    temb = nn.Dense(8)(jnp.sin(t.astype(jnp.float32)[:, None] / 100.0))
    h = nn.Conv(8, (3, 3))(x) + temb[:, None, None, :]
    h = nn.Dropout(0.1, deterministic=not train)(nn.swish(h))
    return nn.Conv(x.shape[-1], (3, 3))(h)


def _config(**overrides):
  config = digits.get_config("test")
  config.optim.warmup_steps = 4
  config.optim.lr = 1e-2
  config.diffusion.num_timesteps = 50
  for k, v in overrides.items():
    section, key = k.split(".")
    config[section][key] = v
  return config


def _setup(config):
  model = TinyNet()
  betas = schedules.get_beta_schedule("linear", config.diffusion.num_timesteps)
  d = diffusion_lib.GaussianDiffusion.create(betas)
  state = ts.create_train_state(config, jax.random.PRNGKey(0), model)
  return model, d, state


def _batches(n, batch_size=16, seed=1):
  rs = np.random.RandomState(seed)
  return [{"image": rs.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32),
           "label": rs.randint(0, 10, (batch_size,)).astype(np.int32)} for _ in range(n)]


def _run(config, devices, batches, steps_per_call=1):
  model, d, state = _setup(config)
  mesh = parallel.create_mesh(devices)
  shardings = parallel.state_shardings(state, mesh, config.training.shard_params)
  state = jax.device_put(state, shardings)
  step = step_lib.jit_train_step(step_lib.make_train_step(config, model, d), mesh,
                                 shardings, steps_per_call)
  axis = 1 if steps_per_call > 1 else 0
  sharding = parallel.batch_sharding(mesh, axis)
  all_metrics = []
  for b in batches:
    gb = parallel.global_batch(b, sharding, b["image"].shape[axis], axis)
    state, metrics = step(state, gb)
    all_metrics.append(jax.device_get(metrics))
  return jax.device_get(state), all_metrics


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("shard_params", [False, True])
def test_one_device_equals_eight_devices(shard_params):
  """Same global batch and seed: 1 vs 8 devices agree after 3 steps.

  Tolerance 1e-5 absolute on params of size ~0.1-1: only the order of the
  cross-device float32 reductions differs.
  """
  config = _config(**{"training.shard_params": shard_params})
  batches = _batches(3)
  s1, m1 = _run(config, jax.devices()[:1], batches)
  s8, m8 = _run(config, jax.devices(), batches)
  assert len(jax.devices()) == 8
  assert int(s1.step) == int(s8.step) == 3
  assert _max_diff(s1.params, s8.params) < 1e-5
  assert _max_diff(s1.ema_params, s8.ema_params) < 1e-5
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-5)
  # The parameters really moved (the comparison is not vacuous).
  _, _, s0 = _setup(config)
  assert _max_diff(s0.params, s1.params) > 1e-3


def test_fsdp_shardings_split_large_leaves():
  mesh = parallel.create_mesh()
  tree = {"big": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
          "bias": jax.ShapeDtypeStruct((128,), jnp.float32),
          "odd": jax.ShapeDtypeStruct((129, 129), jnp.float32)}
  sh = parallel.state_shardings(tree, mesh, shard_params=True)
  assert sh["big"].spec == jax.sharding.PartitionSpec(None, None, None, "data")
  assert sh["bias"].spec == jax.sharding.PartitionSpec()
  assert sh["odd"].spec == jax.sharding.PartitionSpec()
  assert parallel.state_shardings(tree, mesh)["big"].spec == jax.sharding.PartitionSpec()


def test_scan_steps_per_call_equals_single_steps():
  config = _config()
  batches = _batches(3)
  s1, m1 = _run(config, jax.devices(), batches)
  config3 = _config(**{"training.steps_per_call": 3})
  stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  s3, m3 = _run(config3, jax.devices(), [stacked], steps_per_call=3)
  assert int(s3.step) == 3
  assert _max_diff(s1.params, s3.params) < 1e-6
  np.testing.assert_allclose(m3[0]["loss"], [m["loss"] for m in m1], rtol=1e-6)


def test_steps_per_call_unrolled_on_cpu():
  """XLA's CPU backend runs a weight-gradient convolution inside a loop body
  with its naive convolution (~40x slower): on a CPU the K steps are unrolled,
  each with its own convolutions."""
  model, d, state = _setup(_config())
  batch = _batches(1)[0]

  def convolutions(steps_per_call):
    config = _config(**{"training.steps_per_call": steps_per_call})
    step = step_lib.make_train_step(config, model, d)
    b = batch if steps_per_call == 1 else jax.tree.map(lambda a: np.stack([a] * 3), batch)
    return jax.jit(step).lower(state, b).compile().as_text().count("convolution(")

  one = convolutions(1)
  assert one >= 4  # two forward, their weight gradients, ...
  assert convolutions(3) == 3 * one


def test_first_update_is_adam_with_warmup_and_ema():
  """One step against closed forms in float64.

  Adam's first update is -lr_0 * g / (|g| + eps) (bias-corrected moments
  equal g and g^2), lr_0 = lr / warmup_steps; EMA with warm-up uses
  decay min(0.999, 1/10) at step 0.
  """
  config = _config()
  _, _, s0 = _setup(config)
  s1, m = _run(config, jax.devices(), _batches(1))
  lr0 = config.optim.lr / config.optim.warmup_steps
  assert m[0]["lr"] == pytest.approx(lr0, rel=1e-6)
  p0 = np.asarray(s0.params["Conv_0"]["kernel"], np.float64)
  p1 = np.asarray(s1.params["Conv_0"]["kernel"], np.float64)
  delta = np.abs(p1 - p0)
  # |g| >> eps = 1e-8 for every weight here, so each moves by lr0 (clipping
  # scales g but not g/|g|).
  np.testing.assert_allclose(delta, lr0, rtol=1e-3)
  decay = min(config.optim.ema_decay, 1.0 / 10.0)
  ema = np.asarray(s1.ema_params["Conv_0"]["kernel"], np.float64)
  np.testing.assert_allclose(ema, decay * p0 + (1 - decay) * p1, rtol=1e-5, atol=1e-7)
  counts = sum(m[0][f"loss_q{i}_count"] for i in range(4))
  assert counts == 16
  total = sum(m[0][f"loss_q{i}_sum"] for i in range(4)) / 16
  assert total == pytest.approx(float(m[0]["loss"]), rel=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_global_norm_and_clipping_against_float64(backend, monkeypatch):
  """The norm (per leaf on a CPU, one fused reduction on a GPU: the form is
  chosen when traced) and the clipping against numpy float64 and optax's own."""
  import optax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  tree = {"a": jax.random.normal(keys[0], (3, 5, 7)) * 3.0,
          "b": [jax.random.normal(keys[1], (11,)), jnp.float32(2.5)],
          "c": jax.random.normal(keys[2], (4, 4)).astype(jnp.bfloat16)}
  leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  expected = np.sqrt(sum(np.sum(v * v) for v in leaves))
  assert float(ts.global_norm(tree)) == pytest.approx(expected, rel=1e-6)
  assert float(jax.jit(ts.global_norm)(tree)) == pytest.approx(expected, rel=1e-6)
  assert float(ts.global_norm({})) == 0.0
  for max_norm in (expected / 4, expected * 2):  # clipped, then left alone
    ours, state = ts.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    assert isinstance(state, optax.EmptyState)
    factor = min(1.0, max_norm / expected)
    for o, v, x in zip(jax.tree.leaves(ours), leaves, jax.tree.leaves(tree)):
      assert o.dtype == x.dtype
      tol = 1e-2 if o.dtype == jnp.bfloat16 else 1e-6
      np.testing.assert_allclose(np.asarray(o, np.float64).ravel(), v * factor, rtol=tol,
                                 atol=tol * 1e-3)
    # optax's own clipping (float32 leaves only: its select rejects bfloat16).
    tree32 = {k: tree[k] for k in ("a", "b")}
    ours, _ = ts.clip_by_global_norm(max_norm).update(tree32, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(tree32, optax.EmptyState())
    for o, t in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(np.asarray(o), np.asarray(t), rtol=1e-6)
  # The optimiser state keeps optax's structure, so older checkpoints restore.
  config = _config()
  params = {"w": jnp.ones((3,))}
  assert (jax.tree.structure(ts.create_optimizer(config).init(params))
          == jax.tree.structure(optax.chain(
              optax.clip_by_global_norm(1.0),
              optax.adam(ts.create_learning_rate_fn(config))).init(params)))


def test_learning_rate_schedule_closed_form():
  config = _config()
  config.optim.lr, config.optim.warmup_steps = 2e-4, 5000
  config.optim.ema_warmup = False
  fn = ts.create_learning_rate_fn(config)
  for k, expected in [(0, 2e-4 / 5000), (2499, 1e-4), (4999, 2e-4), (10**6, 2e-4)]:
    assert float(fn(jnp.asarray(k))) == pytest.approx(expected, rel=1e-6)
  decays = [float(ts.ema_decay(config, jnp.asarray(k))) for k in (0, 10, 10**6)]
  assert decays == [pytest.approx(config.optim.ema_decay)] * 3  # no warm-up
  config.optim.ema_warmup = True
  assert float(ts.ema_decay(config, jnp.asarray(10))) == pytest.approx(11 / 20)


def test_label_dropout_replaces_labels_with_no_class_id():
  seen = []

  class Recorder(nn.Module):
    @nn.compact
    def __call__(self, x, t, y=None, train=False):
      jax.debug.callback(lambda v: seen.append(np.asarray(v)), y)
      return nn.Conv(x.shape[-1], (1, 1))(x)

  config = _config(**{"training.label_dropout": 0.5})
  config.model.num_classes = 10
  betas = schedules.get_beta_schedule("linear", 50)
  d = diffusion_lib.GaussianDiffusion.create(betas)
  model = Recorder()
  state = ts.create_train_state(config, jax.random.PRNGKey(0), model)
  step = jax.jit(step_lib.make_train_step(config, model, d))
  batch = {"image": np.zeros((64, 8, 8, 1), np.float32),
           "label": np.arange(64, dtype=np.int32) % 10}
  step(state, batch)
  y = seen[-1]
  dropped = y == 10
  assert 10 < dropped.sum() < 54  # ~ Binomial(64, 0.5)
  np.testing.assert_array_equal(y[~dropped], batch["label"][~dropped])


def test_a_typed_key_gives_the_raw_keys_state(tmp_path):
  """jax.random.key(0) and PRNGKey(0) are one threefry key: the same state, and
  `rng` is stored raw (uint32 [2]) either way, as checkpoints hold it."""
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config = _config()
  raw = ts.create_train_state(config, jax.random.PRNGKey(0), TinyNet())
  typed = ts.create_train_state(config, jax.random.key(0), TinyNet())
  assert typed.rng.dtype == jnp.uint32 and typed.rng.shape == (2,)
  for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(typed)):
    np.testing.assert_array_equal(a, b)
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, typed)
  manager.wait_until_finished()
  manager.close()
  assert checkpointing.existing_steps(str(tmp_path)) == [0]
