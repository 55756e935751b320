"""The training loop in-process: exact resume, NaN stop, checkpoints, errors."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from ddpm_jax import checkpointing
from ddpm_jax import trainer


class TinyNet(nn.Module):
  """Stands in for the U-Net so each run compiles in seconds."""
  features: int = 8

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    temb = nn.Dense(self.features)(jnp.sin(t.astype(jnp.float32)[:, None] / 100.0))
    h = nn.Conv(self.features, (3, 3), name="conv_in")(x) + temb[:, None, None, :]
    h = nn.Dropout(0.1, deterministic=not train)(nn.swish(h))
    return nn.Conv(x.shape[-1], (3, 3))(h)


def _train(config, workdir, **kwargs):
  kwargs.setdefault("model", TinyNet())
  return trainer.train_and_evaluate(config, str(workdir), **kwargs)


def _config(num_steps, **overrides):
  config = digits.get_config("test")
  config.training.num_train_steps = num_steps
  for k, v in overrides.items():
    section, key = k.split(".")
    config[section][key] = v
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_resume_is_bitwise_identical_and_checkpoints_are_complete(tmp_path):
  """6 steps straight == 3 steps, stop, resume for 3 more (params, EMA, Adam, data)."""
  straight = _train(
      _config(6, **{"training.checkpoint_every_steps": 3, "training.log_every_steps": 3}),
      str(tmp_path / "a"))
  part = _train(
      _config(3, **{"training.checkpoint_every_steps": 3, "training.log_every_steps": 3}),
      str(tmp_path / "b"))
  assert int(part.step) == 3
  # A half-written step (orbax's temp name) must be ignored on resume.
  os.makedirs(tmp_path / "b" / "checkpoints" / "5.orbax-checkpoint-tmp-1" / "state")
  assert checkpointing.existing_steps(str(tmp_path / "b")) == [3]
  resumed = _train(
      _config(6, **{"training.checkpoint_every_steps": 3, "training.log_every_steps": 3}),
      str(tmp_path / "b"))
  assert int(resumed.step) == 6
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # ...and the difference would show: 3 steps differ from 6.
  assert any(not np.array_equal(a, b)
             for a, b in zip(_leaves(straight.params), _leaves(part.params)))
  assert checkpointing.existing_steps(str(tmp_path / "b")) == [3, 6]
  config, ema, step = checkpointing.load_params(str(tmp_path / "b"))
  assert step == 6 and config.model.ch == 32 and config.model.ch_mult == (1, 2)
  for a, b in zip(_leaves(ema), _leaves(resumed.ema_params)):
    np.testing.assert_array_equal(a, b)
  lines = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [3, 6]
  assert all(np.isfinite(l["loss"]) and l["images_per_sec"] > 0 for l in lines)


def _batches(nan_at):
  rs = np.random.RandomState(0)
  i = 0
  while True:
    x = rs.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
    if i == nan_at:
      x[0, 0, 0, 0] = np.nan
    yield {"image": x, "label": np.zeros((16,), np.int32)}
    i += 1


def test_nan_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = _config(8)  # checkpoints every 2 steps
  with pytest.raises(trainer.NonFiniteError, match="at step 5"):
    _train(config, workdir, data_iterator=_batches(nan_at=4))
  assert checkpointing.existing_steps(workdir) == [2, 4]
  _, params, step = checkpointing.load_params(workdir, which="params")
  assert step == 4
  assert all(np.isfinite(x).all() for x in _leaves(params))


def test_workdir_with_other_model_shape_is_refused_untouched(tmp_path):
  workdir = str(tmp_path)
  _train(_config(2), workdir)
  before = {p: os.path.getmtime(os.path.join(dp, p))
            for dp, _, fs in os.walk(workdir) for p in fs}
  config_json = open(tmp_path / "config.json").read()
  with pytest.raises(checkpointing.CheckpointError, match=r"different shape[\s\S]*conv_in"):
    _train(_config(4), workdir, model=TinyNet(features=16))
  after = {p: os.path.getmtime(os.path.join(dp, p))
           for dp, _, fs in os.walk(workdir) for p in fs}
  assert before == after
  assert open(tmp_path / "config.json").read() == config_json


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    _train(_config(2, **{"training.batch_size": 12}), tmp_path)
  assert not os.listdir(tmp_path)


def test_load_params_errors(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match="not a run directory"):
    checkpointing.load_params(str(tmp_path))
  checkpointing.write_config(str(tmp_path), _config(2))
  with pytest.raises(checkpointing.CheckpointError, match="No complete checkpoint"):
    checkpointing.load_params(str(tmp_path))


def test_save_pretrained_round_trip_and_fine_tune(tmp_path):
  from ddpm_jax import models
  from ddpm_jax import train_state as ts
  config = _config(2)
  model = models.create_model(config)
  params = ts.create_train_state(config, jax.random.PRNGKey(7), model).params
  workdir = str(tmp_path / "run")
  checkpointing.save_pretrained(workdir, config, params)
  loaded_config, loaded, step = checkpointing.load_params(workdir)
  assert step == 0 and loaded_config.to_dict() == config.to_dict()
  for a, b in zip(_leaves(params), _leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(checkpointing.CheckpointError, match="already holds checkpoints"):
    checkpointing.save_pretrained(workdir, config, params)
  bad = jax.tree.map(lambda x: x, params)
  bad["conv_in"]["kernel"] = np.zeros((3, 3, 1, 5), np.float32)
  with pytest.raises(checkpointing.CheckpointError, match="conv_in/kernel"):
    checkpointing.save_pretrained(str(tmp_path / "other"), config, bad)
  # The step-0 run resumes like any run: the full state restores.
  manager = checkpointing.create_manager(workdir)
  abstract = jax.eval_shape(lambda: ts.create_train_state(config, jax.random.PRNGKey(0), model))
  state, _ = checkpointing.restore(manager, 0, abstract)
  manager.close()
  assert int(state.step) == 0
  for a, b in zip(_leaves(params), _leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)
