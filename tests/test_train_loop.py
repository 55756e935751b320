"""The training loop in-process: exact resume, NaN stop, checkpoints, errors."""
import json
import os
import re

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
  with pytest.raises(trainer.NonFiniteError,
                     match=r"at step 5: .* the last good checkpoint \(step 4\) is "
                     r"kept\. Try a lower optim\.lr, a smaller optim\.grad_clip "
                     r"\(now 1\.0\) or"):
    _train(config, workdir, data_iterator=_batches(nan_at=4))
  assert checkpointing.existing_steps(workdir) == [2, 4]
  _, params, step = checkpointing.load_params(workdir, which="params")
  assert step == 4
  assert all(np.isfinite(x).all() for x in _leaves(params))


def test_nan_before_any_checkpoint_says_so(tmp_path):
  config = _config(8, **{"optim.grad_clip": 0.0})
  with pytest.raises(trainer.NonFiniteError,
                     match=r"at step 2: .* no checkpoint was saved yet\. Try a "
                     r"lower optim\.lr, optim\.grad_clip > 0 or"):
    _train(config, str(tmp_path), data_iterator=_batches(nan_at=1))
  assert checkpointing.existing_steps(str(tmp_path)) == []


@pytest.mark.parametrize("overrides, match", [
    ({"model.num_classes": 5}, r"model\.num_classes=5 but the data carries "
     r"data\.num_classes=10"),
    ({"model.num_classes": 10, "data.num_classes": 0},
     r"model\.num_classes=10 but the data carries data\.num_classes=0"),
    ({"training.label_dropout": 0.3},
     r"training\.label_dropout=0\.3 applies to a class-conditional model only"),
    ({"model.noise_aug_max": 0.5},
     r"model\.noise_aug_max=0\.5 applies to a super-resolution model only"),
    ({"optim.grad_clip": -5.0}, r"optim\.grad_clip must be >= 0"),
    ({"training.num_sample_images": 0, "training.sample_every_steps": 2},
     r"training\.num_sample_images must be >= 1"),
    ({"training.num_sample_images": -1, "training.sample_every_steps": 2},
     r"training\.num_sample_images must be >= 1"),
])
def test_settings_that_would_be_ignored_or_fail_late_are_refused(
    tmp_path, overrides, match):
  """Before anything is written or compiled (they used to train silently,
  or fail at step 1 or at the first sample grid)."""
  with pytest.raises(ValueError, match=match):
    _train(_config(4, **overrides), str(tmp_path), model=None)
  assert os.listdir(tmp_path) == []
  # Consistent settings of the same keys train.
  trainer.validate_config(_config(4, **{"model.num_classes": 10,
                                         "training.label_dropout": 0.3,
                                         "optim.grad_clip": 0.0}))


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
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"already holds a run \(config.json, checkpoints; "
                     r"checkpoints at steps \[0\]\)"):
    checkpointing.save_pretrained(workdir, config, params)
  # A run that crashed before its first checkpoint keeps its config.json.
  crashed = tmp_path / "crashed"
  crashed.mkdir()
  (crashed / "config.json").write_text("{}")
  with pytest.raises(checkpointing.CheckpointError, match=r"already holds a run \(config.json\)"):
    checkpointing.save_pretrained(str(crashed), config, params)
  assert (crashed / "config.json").read_text() == "{}"
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(checkpointing.CheckpointError, match="a_file is a file"):
    checkpointing.save_pretrained(str(tmp_path / "a_file"), config, params)
  # Parameters are stored as float32 whatever their dtype, as training keeps them.
  half = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
  checkpointing.save_pretrained(str(tmp_path / "half"), config, half)
  _, loaded_half, _ = checkpointing.load_params(str(tmp_path / "half"))
  for a, b in zip(_leaves(half), _leaves(loaded_half)):
    assert b.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)
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


def _files(path):
  return {os.path.join(dp, f): os.path.getmtime(os.path.join(dp, f))
          for dp, _, fs in os.walk(path) for f in fs}


def test_max_to_keep_below_one_is_refused_and_none_keeps_all(tmp_path):
  """orbax deletes every checkpoint, old ones too, for max_to_keep=0."""
  workdir = str(tmp_path)
  _train(_config(2), workdir)
  for bad in (0, -1):
    with pytest.raises(ValueError, match=r"training\.max_to_keep must be >= 1"):
      _train(_config(4, **{"training.max_to_keep": bad}), workdir)
  assert checkpointing.existing_steps(workdir) == [2]
  _train(_config(10, **{"training.max_to_keep": None}), workdir)
  assert checkpointing.existing_steps(workdir) == [2, 4, 6, 8, 10]


@pytest.mark.parametrize("key, value, message", [
    ("optim.ema_decay", 1.5, r"optim\.ema_decay must be in \[0, 1\), got 1\.5"),
    ("optim.ema_decay", 1.0, r"optim\.ema_decay must be in \[0, 1\)"),
    ("optim.beta2", -0.1, r"optim\.beta2 must be in \[0, 1\)"),
    ("optim.eps", 0.0, r"optim\.eps must be > 0"),
    ("training.checkpoint_every_steps", 0,
     r"training\.checkpoint_every_steps must be >= 1, got 0\.$"),
])
def test_optimiser_and_interval_settings_are_checked(tmp_path, key, value, message):
  """An EMA decay above 1 diverged (or was silently capped by the warm-up)."""
  with pytest.raises(ValueError, match=message):
    trainer.validate_config(_config(2, **{key: value}))


def test_unusable_workdir_fails_before_compiling(tmp_path, monkeypatch):
  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before checking the workdir")
  monkeypatch.setattr(trainer.train_step_lib, "jit_train_step", no_compile)
  (tmp_path / "file").write_text("x")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"--workdir .*file exists and is not a directory"):
    _train(_config(2), tmp_path / "file")
  with pytest.raises(checkpointing.CheckpointError, match="--workdir is empty"):
    _train(_config(2), "")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").write_text("x")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"run/checkpoints exists and is not a directory"):
    _train(_config(2), tmp_path / "run")
  assert os.listdir(tmp_path / "run") == ["checkpoints"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only directory")
def test_read_only_checkpoints_fails_before_compiling(tmp_path, monkeypatch):
  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before checking the workdir")
  monkeypatch.setattr(trainer.train_step_lib, "jit_train_step", no_compile)
  (tmp_path / "checkpoints").mkdir()
  os.chmod(tmp_path / "checkpoints", 0o555)
  try:
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"cannot write to .*checkpoints: Permission denied"):
      _train(_config(2), tmp_path)
  finally:
    os.chmod(tmp_path / "checkpoints", 0o755)


def test_resume_with_another_config_is_refused_untouched(tmp_path):
  workdir = str(tmp_path)
  _train(_config(2), workdir)
  before = _files(workdir)
  config_json = open(tmp_path / "config.json").read()
  changed = {"optim.lr": 5e-4, "diffusion.beta_schedule": "cosine",
             "training.batch_size": 32, "training.seed": 1}
  with pytest.raises(checkpointing.CheckpointError) as e:
    _train(_config(4, **changed), workdir)
  message = str(e.value)
  for line in ("optim.lr: 0.001 (saved) -> 0.0005 (new)",
               "diffusion.beta_schedule: 'linear' (saved) -> 'cosine' (new)",
               "training.batch_size: 16 (saved) -> 32 (new)",
               "training.seed: 0 (saved) -> 1 (new)", "new --workdir"):
    assert line in message
  assert "num_train_steps" not in message.split("Use a new")[0]
  # The keys listed as free: data.worker_count is tied to the checkpoint.
  free = re.search(r"Only (.*) may change on resume", message).group(1)
  assert "training.num_train_steps" in free and "data.data_dir" in free
  assert "worker_count" not in free
  assert _files(workdir) == before
  assert open(tmp_path / "config.json").read() == config_json
  # Logging, checkpointing and the step count may change; config.json follows.
  state = _train(_config(4, **{"training.log_every_steps": 1,
                               "training.max_to_keep": 5}), workdir)
  assert int(state.step) == 4
  saved = checkpointing.read_config(workdir)
  assert saved.training.log_every_steps == 1 and saved.training.num_train_steps == 4
  # Fewer steps than the run has done: nothing to train, nothing written.
  before = _files(workdir)
  config_json = open(tmp_path / "config.json").read()
  assert int(_train(_config(2), workdir).step) == 4
  assert _files(workdir) == before
  assert open(tmp_path / "config.json").read() == config_json


def test_key_missing_from_an_old_config_counts_as_its_default(tmp_path):
  workdir = str(tmp_path)
  _train(_config(2), workdir)
  saved = json.load(open(tmp_path / "config.json"))
  del saved["optim"]["beta1"]  # 0.9 in the new config: the default
  del saved["optim"]["ema_warmup"]  # True in the new config; default False
  json.dump(saved, open(tmp_path / "config.json", "w"))
  with pytest.raises(checkpointing.CheckpointError) as e:
    _train(_config(4), workdir)
  assert "optim.ema_warmup: False (saved) -> True (new)" in str(e.value)
  assert "beta1" not in str(e.value)
  assert int(_train(_config(4, **{"optim.ema_warmup": False}), workdir).step) == 4


def _save_step_zero(workdir, config, state):
  """A step-0 run as convert and save_pretrained write it: config.json + state."""
  checkpointing.write_config(workdir, config)
  manager = checkpointing.create_manager(workdir)
  checkpointing.save(manager, state)
  manager.wait_until_finished()
  manager.close()


def test_step_zero_run_fine_tunes_with_another_config(tmp_path):
  """A converted (save_pretrained) run holds no training yet: any config."""
  from ddpm_jax import train_state as ts
  workdir = str(tmp_path)
  config = _config(2)
  _save_step_zero(workdir, config,
                  ts.create_train_state(config, jax.random.PRNGKey(0), TinyNet()))
  tuned = _config(2, **{"optim.lr": 2e-5, "training.batch_size": 8})
  assert int(_train(tuned, workdir).step) == 2
  assert checkpointing.read_config(workdir).optim.lr == 2e-5


def test_step_zero_weights_fine_tune_without_clipping(tmp_path):
  """Another optimiser (no clipping: improved DDPM's recipe) has another state
  tree; orbax refused to restore the step-0 one. The weights are the saved
  ones, not a fresh initialisation."""
  from ddpm_jax import train_state as ts
  workdir = str(tmp_path)
  config = _config(2)
  saved = ts.create_train_state(config, jax.random.PRNGKey(123), TinyNet())
  _save_step_zero(workdir, config, saved)
  tuned = _config(2, **{"optim.grad_clip": 0.0})
  state = _train(tuned, workdir)
  assert int(state.step) == 2
  fresh = ts.create_train_state(tuned, jax.random.PRNGKey(0), TinyNet())
  for ema, start, other in zip(_leaves(state.ema_params), _leaves(saved.params),
                               _leaves(fresh.params)):
    np.testing.assert_allclose(ema, start, atol=5e-3)  # two steps: barely moved
    if np.abs(start - other).max() > 0.05:  # a leaf that init draws at random
      assert np.abs(ema - other).max() > 0.04


def test_resume_after_a_crash_drops_later_metrics_records(tmp_path):
  import shutil
  workdir = str(tmp_path)
  config = _config(4, **{"training.log_every_steps": 1})
  _train(config, workdir)
  # A crash after step 4's records but before its checkpoint completed.
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')  # cut off mid-line
  _train(config, workdir)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]


def test_format_duration_counts_days():
  assert trainer.format_duration(51 * 3600 + 19 * 60 + 42) == "2d 03:19:42"
  assert trainer.format_duration(86399) == "23:59:59"
  assert trainer.format_duration(86400) == "1d 00:00:00"
  assert trainer.format_duration(59.6) == "00:01:00"


def test_console_line_shows_accuracy_when_present():
  summary = {"loss": 0.5, "images_per_sec": 300.0, "eta_sec": 90.0}
  assert "accuracy" not in trainer._console_line(2, 4, summary)
  line = trainer._console_line(2, 4, dict(summary, accuracy=0.875))
  assert "loss 0.50000  accuracy 0.8750  300.0 img/s  ETA 00:01:30" in line


def test_compile_is_logged_and_left_out_of_the_throughput(tmp_path, caplog, monkeypatch):
  caplog.set_level("INFO")
  bars = []  # (description, steps done, total) of each progress bar at its end

  class RecordingBar(trainer.tqdm):
    def close(self):
      bars.append((self.desc, self.n, self.total))
      super().close()

  monkeypatch.setattr(trainer, "tqdm", RecordingBar)
  config = _config(4, **{"training.log_every_steps": 1,
                         "training.sample_every_steps": 4})
  _train(config, str(tmp_path))
  assert set(bars) == {("sample grid", 100, 100)}  # the grid's chain, every step
  messages = [r.getMessage() for r in caplog.records]
  compiling = messages.index("compiling the train step...")
  first_line = next(i for i, m in enumerate(messages) if m.startswith("step 1/4"))
  grid = messages.index("sampling a grid of 8 images (100 steps)...")
  assert compiling < first_line < grid
  wrote = next(i for i, m in enumerate(messages)
               if m.startswith(f"Wrote {tmp_path / 'samples' / 'step_4.png'} ("))
  assert grid < wrote
  ours = [r.getMessage() for r in caplog.records if r.filename == "trainer.py"]
  assert ours[-1] == f"Finished: step 4 of 4 in {tmp_path}."
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  # Step 1's window is the compilation: no throughput; the others have one.
  assert "images_per_sec" not in lines[0] and "ETA" not in messages[first_line]
  assert all(l["images_per_sec"] > 0 for l in lines[1:])
  assert os.path.exists(tmp_path / "samples" / "step_4.png")


def test_chunked_grid_matches_the_one_loop_sampler():
  from ddpm_jax import models, parallel, sampling
  config = _config(2, **{"training.num_sample_images": 4})
  diffusion = models.create_diffusion(config)
  model = TinyNet()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)),
                      jnp.zeros((1,), jnp.int32))["params"]
  rng = jax.random.PRNGKey(3)
  got = trainer.make_sample_fn(config, model, diffusion, parallel.create_mesh())(params, rng)
  want = sampling.p_sample_loop(
      diffusion, lambda x, t: model.apply({"params": params}, x, t), (4, 8, 8, 1), rng)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_sigterm_during_the_sample_grid_stops_it_and_saves(tmp_path, monkeypatch):
  """The grid checks for SIGTERM between chunks (a grid can outlast the grace period)."""
  import signal
  checks = []
  real = trainer.make_sample_fn

  def make_sample_fn(*args):
    sample = real(*args)

    def interrupted(params, rng, should_stop=None):
      def stop():  # SIGTERM arrives while the first chunk runs
        checks.append(1)
        if len(checks) == 2:
          signal.raise_signal(signal.SIGTERM)
        return should_stop()
      return sample(params, rng, should_stop=stop)
    return interrupted

  monkeypatch.setattr(trainer, "make_sample_fn", make_sample_fn)
  config = _config(6, **{"training.sample_every_steps": 2,
                         "training.checkpoint_every_steps": 6})
  state = _train(config, str(tmp_path))
  assert int(state.step) == 2
  assert len(checks) == 2  # stopped at the first check after the signal, of 20
  assert checkpointing.existing_steps(str(tmp_path)) == [2]
  assert not os.path.exists(tmp_path / "samples" / "step_2.png")


def test_checkpoint_saving_is_not_counted_as_training_time(tmp_path, monkeypatch):
  """A slow save (3 s here) must not lower the next window's images/s."""
  import time  # pylint: disable=g-import-not-at-top
  real_save = checkpointing.save

  def slow_save(*args, **kwargs):
    time.sleep(3.0)
    return real_save(*args, **kwargs)

  monkeypatch.setattr(checkpointing, "save", slow_save)
  config = _config(6, **{"training.checkpoint_every_steps": 2,
                         "training.log_every_steps": 2})
  _train(config, str(tmp_path), data_iterator=_batches(nan_at=-1))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [2, 4, 6]
  # Steps 3-6 follow a save each: with it counted, 2 x 16 images / >= 3 s
  # would be under 11 images/s; two steps of this tiny net take milliseconds.
  assert all(l["images_per_sec"] > 40 for l in lines[1:]), lines


def _interrupting(batches, at, times=1):
  """`batches`, with Ctrl-C pressed `times` times as batch `at` is drawn."""
  import signal  # pylint: disable=g-import-not-at-top
  for i, batch in enumerate(batches):
    if i == at:
      for _ in range(times):
        signal.raise_signal(signal.SIGINT)
    yield batch


def test_ctrl_c_saves_the_current_step_then_interrupts(tmp_path):
  """The first Ctrl-C saves where training is, then raises KeyboardInterrupt."""
  import signal  # pylint: disable=g-import-not-at-top
  handler = signal.getsignal(signal.SIGINT)
  config = _config(20, **{"training.checkpoint_every_steps": 10})
  with pytest.raises(KeyboardInterrupt):
    _train(config, str(tmp_path), data_iterator=_interrupting(_batches(nan_at=-1), at=4))
  # Batch 4 is drawn for step 5; the loop notices after that step.
  assert checkpointing.existing_steps(str(tmp_path)) == [5]
  assert signal.getsignal(signal.SIGINT) is handler
  # The saved state is step 5 of an uninterrupted run.
  _, params, step = checkpointing.load_params(str(tmp_path), which="params")
  straight = _train(_config(5), str(tmp_path / "straight"), data_iterator=_batches(nan_at=-1))
  assert step == 5
  for a, b in zip(_leaves(params), _leaves(straight.params)):
    np.testing.assert_array_equal(a, b)


def test_second_ctrl_c_stops_without_saving(tmp_path):
  config = _config(20, **{"training.checkpoint_every_steps": 2})
  with pytest.raises(KeyboardInterrupt):
    _train(config, str(tmp_path),
           data_iterator=_interrupting(_batches(nan_at=-1), at=5, times=2))
  assert checkpointing.existing_steps(str(tmp_path)) == [2, 4]


def test_resume_with_another_process_count_names_the_fix(tmp_path):
  """grain saves one state file per process: a count mismatch is a clear error."""
  import pathlib  # pylint: disable=g-import-not-at-top
  data = pathlib.Path(tmp_path)
  for i in range(2):
    (data / f"process_{i}-of-2.json").write_text("{}")
  check = checkpointing._check_data_state  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"Step 4 was saved by 2 process\(es\), and this run has 1.*"
                           r"same number of processes"):
    check(data, 4, 0)
  (data / "process_0-of-1.json").write_text("{}")
  check(data, 4, 0)


def test_resume_with_another_worker_count_names_the_fix(tmp_path):
  """grain keeps a position per worker; its own error does not name the setting."""
  from test_train_cli import _tiny_run  # pylint: disable=g-import-not-at-top
  config = digits.get_config("test")
  _tiny_run(config, tmp_path)  # worker_count 0
  config.training.num_train_steps = 4
  config.data.worker_count = 1
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"Step 2 was saved with config.data.worker_count=0, "
                           r"and this run has 1.*--config.data.worker_count=0"):
    trainer.train_and_evaluate(config, str(tmp_path), model=TinyNet())
  assert checkpointing.existing_steps(str(tmp_path)) == [2]
