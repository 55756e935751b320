"""Damaged run directories: clear errors that say what to do, nothing deleted."""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types

import pytest

from ddpm_jax import checkpointing
from ddpm_jax import cli
from test_train_loop import _config, _train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 4-step run of the tiny net, checkpoints at steps 2 and 4 (copy it)."""
  workdir = str(tmp_path_factory.mktemp("trained_run"))
  _train(_config(4), workdir)
  assert checkpointing.existing_steps(workdir) == [2, 4]
  return workdir


def _copy(run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(run, workdir)
  return workdir


def _snapshot(path):
  """{file: (mtime, sha1)} of everything under `path`."""
  out = {}
  for dp, _, fs in os.walk(path):
    for f in fs:
      name = os.path.join(dp, f)
      with open(name, "rb") as fh:
        out[name] = (os.path.getmtime(name), hashlib.sha1(fh.read()).hexdigest())
  return out


def test_truncated_array_data_names_the_step_and_what_to_do(trained_run, tmp_path,
                                                            monkeypatch):
  workdir = _copy(trained_run, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  data_files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert data_files
  for name in data_files:
    with open(name, "r+b") as f:
      f.truncate(10)
  before = _snapshot(workdir)
  reports = []  # what Python would print as "Exception ignored ..." tracebacks
  monkeypatch.setattr(sys, "unraisablehook", reports.append)
  cli.quiet_orbax()  # as the commands do

  with pytest.raises(checkpointing.CheckpointError) as e:
    checkpointing.load_params(workdir)
  message = str(e.value)
  assert re.match(r"Step 4 in .*checkpoints could not be read: OUT_OF_RANGE: .*"
                  r"not valid for value of size 10\. ", message), message
  assert "--step N (existing steps: 2, 4)" in message
  assert "Nothing was deleted." in message
  assert "\n" not in message and "tensorstore_spec" not in message
  assert checkpointing.load_params(workdir, step=2)[2] == 2

  with pytest.raises(checkpointing.CheckpointError,
                     match=r"Step 4 in .*could not be read: OUT_OF_RANGE: .* To resume "
                           r"from step 2, move its folder out of .*checkpoints: `mv "
                           r".*checkpoints/4 .*broken_step_4`\. Nothing was deleted\."):
    _train(_config(6), workdir)
  # Orbax gave up on reads still in flight; as each ends (in TensorStore's
  # threads, at any time) it reports "Event loop is closed": no traceback.
  time.sleep(1)
  for error in (RuntimeError("Event loop is closed"), RuntimeError("other")):
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=error,
                                             exc_traceback=None, err_msg=None,
                                             object=None))
  assert [str(r.exc_value) for r in reports] == ["other"]
  assert _snapshot(workdir) == before

  # The advice works: with the step moved aside, the run resumes from step 2.
  shutil.move(step_dir, os.path.join(workdir, "broken_step_4"))
  assert int(_train(_config(6), workdir).step) == 6
  assert checkpointing.existing_steps(workdir) == [2, 4, 6]


@pytest.mark.parametrize("removed", ["state", os.path.join("state", "_METADATA")])
def test_step_without_its_train_state_names_the_step_and_what_to_do(
    trained_run, tmp_path, removed):
  workdir = _copy(trained_run, tmp_path)
  path = os.path.join(workdir, "checkpoints", "4", removed)
  if os.path.isdir(path):
    shutil.rmtree(path)
  else:
    os.remove(path)
  before = _snapshot(workdir)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"Step 4 in .*checkpoints could not be read: .*state.*"
                           r"Load an older step with --step N \(existing steps: 2, 4\)"):
    checkpointing.load_params(workdir)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"Step 4 in .*could not be read: .* To resume from step 2, "
                           r"move its folder out of .*checkpoints: `mv "):
    _train(_config(6), workdir)
  assert _snapshot(workdir) == before


def test_config_json_without_a_section_or_required_key_is_refused(trained_run,
                                                                  tmp_path):
  workdir = _copy(trained_run, tmp_path)
  path = os.path.join(workdir, "config.json")
  saved = json.load(open(path))

  def write(config):
    with open(path, "w") as f:
      json.dump(config, f)

  # Keys newer than some runs are read with their defaults: still loads.
  old = json.loads(json.dumps(saved))
  for section, key in [("model", "num_heads"), ("model", "attention_algorithm"),
                       ("model", "low_res_size"), ("model", "conv_algorithm"),
                       ("data", "worker_count"), ("data", "data_dir"),
                       ("optim", "beta1")]:
    old[section].pop(key, None)
  write(old)
  assert checkpointing.load_params(workdir)[2] == 4

  no_model = {k: v for k, v in saved.items() if k != "model"}
  write(no_model)
  before = _snapshot(workdir)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"run/config.json lacks the 'model' section: "):
    checkpointing.load_params(workdir)
  with pytest.raises(checkpointing.CheckpointError) as e:
    _train(_config(6), workdir)
  assert "config.json lacks the 'model' section" in str(e.value)
  assert "(saved)" not in str(e.value)
  assert _snapshot(workdir) == before

  no_ch = json.loads(json.dumps(saved))
  del no_ch["model"]["ch"], no_ch["diffusion"]["num_timesteps"]
  write(no_ch)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"config.json lacks diffusion.num_timesteps, model.ch: "):
    checkpointing.load_params(workdir)
  write([saved])
  with pytest.raises(checkpointing.CheckpointError, match="no JSON object"):
    checkpointing.load_params(workdir)


def test_how_the_same_function_is_computed_may_change_on_resume(tmp_path):
  """conv_algorithm and attention_algorithm keep parameters and function; a
  change of what is computed (here the head count) is refused."""
  checkpointing.write_config(str(tmp_path), _config(2))
  checkpointing.check_resume_config(
      str(tmp_path), _config(2, **{"model.conv_algorithm": "direct",
                                   "model.attention_algorithm": "cudnn"}))
  with pytest.raises(checkpointing.CheckpointError, match="model.num_heads"):
    checkpointing.check_resume_config(str(tmp_path), _config(2, **{"model.num_heads": 2}))


def test_a_step_without_its_data_position_is_not_resumed_silently(trained_run, tmp_path):
  """It resumed with a fresh data iterator: other batches than an uninterrupted
  run's. Loading its weights for sampling still works."""
  workdir = _copy(trained_run, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4", "data"))
  before = _snapshot(workdir)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"Step 4 in .*could not be read: it has no data/ folder.*"
                           r"To resume from step 2, move its folder out of"):
    _train(_config(6), workdir)
  assert _snapshot(workdir) == before
  assert checkpointing.load_params(workdir)[2] == 4


_FAILING_SAVE_SCRIPT = """
import resource, signal, sys, time
import flax, jax.numpy as jnp, numpy as np
from ddpm_jax import checkpointing

@flax.struct.dataclass
class State:
  step: jnp.ndarray
  w: jnp.ndarray

manager = checkpointing.create_manager(sys.argv[1], max_to_keep=None)
# A full disk, as far as the save's data files go (4 MB that do not compress).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
w = np.random.default_rng(0).standard_normal((1000, 1000), np.float32)
checkpointing.save(manager, State(step=jnp.array(1), w=jnp.asarray(w)))
deadline = time.time() + 120
while True:  # what the trainer does at every log step, with no further save
  try:
    checkpointing.check_saves(manager)
  except checkpointing.CheckpointError as e:
    print(e)
    break
  assert time.time() < deadline, "the failed save was never reported"
  time.sleep(0.2)
"""


def test_a_failed_background_save_is_reported_before_the_next_save(tmp_path):
  """Training stops at the next log step, not a checkpoint interval later."""
  script = tmp_path / "save.py"
  script.write_text(_FAILING_SAVE_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  message = r.stdout.strip()
  assert message.startswith(f"Writing a checkpoint into {tmp_path / 'ckpt' / 'checkpoints'} "
                            "failed: "), message
  assert message.endswith("Training stopped. Fix the cause (e.g. free disk "
                          "space) and run the same command again: no step was "
                          "saved yet, so it starts afresh."), message


_SHARED_WORKDIR_SCRIPT = """
import sys
from ddpm_jax import checkpointing, parallel
address, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
parallel.initialize_distributed(address, 2, process_id)
checkpointing.check_writable(workdir)
try:
  checkpointing.check_shared_workdir(workdir)
  print("shared")
except checkpointing.CheckpointError as e:
  print(e)
"""


@pytest.mark.parametrize("shared", [True, False])
def test_every_process_must_see_the_same_workdir(tmp_path, shared):
  """Checked at start-up on every process, not at the first save."""
  script = tmp_path / "check.py"
  script.write_text(_SHARED_WORKDIR_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  address = f"127.0.0.1:{20000 + (os.getpid() + 11 + shared) % 20000}"
  procs = [subprocess.Popen(
      [sys.executable, str(script), address, str(i),
       str(tmp_path / ("run" if shared else f"host{i}"))],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    if shared:  # (gloo prints its own lines too)
      assert out.strip().splitlines()[-1] == "shared", out
    else:
      assert "is not the same directory on every process: process(es) 1 do not " \
             "see the file process 0 wrote there" in out, out
  # The marker is removed; nothing else is left.
  names = [n for d in ("run", "host0", "host1") if (tmp_path / d).exists()
           for n in os.listdir(tmp_path / d)]
  assert names == ["checkpoints"] * len(names)
