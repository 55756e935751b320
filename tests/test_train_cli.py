"""`python -m ddpm_jax.train` end to end: data paths, errors, SIGTERM, multi-host."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import digits
from ddpm_jax import checkpointing
from ddpm_jax import models
from ddpm_jax import train_state as ts
from ddpm_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices=8):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
  return env


def _cli(args, timeout=600, **kwargs):
  return subprocess.run([sys.executable, "-m", "ddpm_jax.train", *args], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def _tree_files(path):
  return {os.path.join(dp, f): os.path.getmtime(os.path.join(dp, f))
          for dp, _, fs in os.walk(path) for f in fs}


# ---------------------------------------------------------------------------
# Bad input: exit 1, a one-line reason, nothing touched.


def test_unknown_config_key_exits_1(tmp_path):
  r = _cli(["--config", "configs/digits.py:test", "--workdir", str(tmp_path / "w"),
            "--config.training.no_such_key=3"])
  assert r.returncode == 1
  assert "unknown config key" in r.stderr and "no_such_key" in r.stderr
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w").exists()


def test_config_by_path_from_another_directory_and_its_own_errors(tmp_path):
  """configs/X.py imports configs.default: found from any working directory.
  A config's own error (an unknown variant) is one line, not a traceback."""
  env = dict(_env(), PYTHONPATH="")  # the installed package, no checkout on the path
  r = subprocess.run(
      [sys.executable, "-m", "ddpm_jax.train", "--config",
       os.path.join(ROOT, "configs", "digits.py") + ":bogus", "--workdir",
       str(tmp_path / "w")], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=300)
  assert r.returncode == 1
  assert "unknown variant 'bogus'; use '' or 'test'" in r.stderr
  assert "Traceback" not in r.stderr and "No module named" not in r.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("dataset,match", [("no_such_dataset_xyz", "no_such_dataset_xyz"),
                                           ("folder:{empty}", "image")])
def test_bad_dataset_exits_1_without_touching_the_run(tmp_path, dataset, match):
  # An existing run must survive the failed start untouched.
  workdir = tmp_path / "run"
  config = digits.get_config("test")
  params = ts.create_train_state(config, jax.random.PRNGKey(0),
                                 models.create_model(config)).params
  checkpointing.save_pretrained(str(workdir), config, params)
  before = _tree_files(workdir)
  (tmp_path / "empty").mkdir()
  r = _cli(["--config", "configs/digits.py:test", "--workdir", str(workdir),
            f"--config.data.dataset={dataset.format(empty=tmp_path / 'empty')}"])
  assert r.returncode == 1, r.stderr[-2000:]
  assert "error:" in r.stderr and match in r.stderr.lower()
  assert "Traceback" not in r.stderr
  assert "Failed to load dataset" not in r.stderr  # tfds' log line before ours
  assert _tree_files(workdir) == before


def test_other_model_shape_exits_1_untouched(tmp_path):
  workdir = tmp_path / "run"
  config = digits.get_config("test")
  params = ts.create_train_state(config, jax.random.PRNGKey(0),
                                 models.create_model(config)).params
  checkpointing.save_pretrained(str(workdir), config, params)
  before = _tree_files(workdir)
  r = _cli(["--config", "configs/digits.py:test", "--workdir", str(workdir),
            "--config.model.ch=64"])
  assert r.returncode == 1
  assert "different shape" in r.stderr and "Traceback" not in r.stderr
  assert _tree_files(workdir) == before


@pytest.mark.parametrize("case", ["empty", "file", "checkpoints_file", "max_to_keep_0"])
def test_unusable_workdir_or_max_to_keep_exits_1_in_one_line(tmp_path, case):
  """Errno messages, a 300 s orbax timeout and deleted checkpoints before."""
  workdir, extra = str(tmp_path / "run"), []
  if case == "empty":
    workdir = ""
  elif case == "file":
    (tmp_path / "run").write_text("x")
  elif case == "checkpoints_file":
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
  else:
    extra = ["--config.training.max_to_keep=0"]
  before = _tree_files(tmp_path)
  r = _cli(["--config", "configs/digits.py:test", "--workdir", workdir, *extra],
           timeout=120)
  assert r.returncode == 1, r.stderr[-2000:]
  error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and "Traceback" not in r.stderr
  want = "training.max_to_keep" if case == "max_to_keep_0" else "--workdir"
  assert want in error[0] and "Errno" not in error[0]
  assert _tree_files(tmp_path) == before


# ---------------------------------------------------------------------------
# Data paths through the real input pipeline (a tiny net keeps compiles short).


def _tiny_run(config, workdir):
  from test_train_loop import TinyNet  # pylint: disable=g-import-not-at-top
  config.training.num_train_steps = 2
  config.training.log_every_steps = 1
  config.training.checkpoint_every_steps = 2
  config.training.sample_every_steps = 0
  config.training.batch_size = 8
  state = trainer.train_and_evaluate(config, str(workdir), model=TinyNet())
  assert int(state.step) == 2
  assert checkpointing.existing_steps(str(workdir)) == [2]
  assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == 2
  return state


def test_tfds_mock_data_trains(tmp_path):
  config = digits.get_config("test")
  config.data.dataset, config.data.image_size, config.data.channels = "cifar10", 32, 3
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    _tiny_run(config, tmp_path)


def test_image_folder_trains(tmp_path):
  rs = np.random.RandomState(0)
  for i in range(10):
    Image.fromarray(rs.randint(0, 256, (20, 24, 3), np.uint8)).save(tmp_path / f"{i}.png")
  config = digits.get_config("test")
  config.data.dataset, config.data.channels, config.data.num_classes = (
      f"folder:{tmp_path}", 3, 0)
  _tiny_run(config, tmp_path / "run")


def test_relative_workdir_trains_and_resumes(tmp_path, monkeypatch):
  """`--workdir runs/digits` as in the README: orbax wants absolute paths."""
  monkeypatch.chdir(tmp_path)
  _tiny_run(digits.get_config("test"), os.path.join("runs", "digits"))
  assert checkpointing.load_params(os.path.join("runs", "digits"), which="ema")


# ---------------------------------------------------------------------------
# The real CLI with the U-Net (slow: a few U-Net compiles on 2 cores).


def _child_processes(pid: int) -> list[str]:
  """The pids (as strings) whose parent is `pid`, from /proc."""
  children = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
          children.append(entry)
    except (OSError, ValueError, IndexError):
      continue
  return children


@pytest.mark.slow
@pytest.mark.parametrize("sig, want_rc", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_digits_cli_trains_samples_and_stops_on_signal(tmp_path, sig, want_rc):
  """SIGTERM (pre-emption) and Ctrl-C both save the current step; Ctrl-C exits 130.

  Ctrl-C goes to the whole process group, as a terminal sends it, with a grain
  worker process in the group: the worker must leave it to the trainer.
  """
  workdir = tmp_path / "run"
  workers = f"--config.data.worker_count={int(sig == signal.SIGINT)}"
  proc = subprocess.Popen(
      [sys.executable, "-m", "ddpm_jax.train", "--config", "configs/digits.py:test",
       "--workdir", str(workdir), "--config.training.num_train_steps=100000",
       "--config.training.log_every_steps=2", "--config.training.checkpoint_every_steps=1000",
       workers],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 400
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "no progress"
    time.sleep(1)
  if sig == signal.SIGINT:
    children = _child_processes(proc.pid)
    assert children, "no grain worker process"
    os.killpg(proc.pid, sig)
  else:
    proc.send_signal(sig)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == want_rc, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  if sig == signal.SIGINT:
    time.sleep(2)
    alive = [c for c in children if os.path.exists(f"/proc/{c}")]
    assert not alive, f"grain workers {alive} outlived the trainer"
  steps = checkpointing.existing_steps(str(workdir))
  assert len(steps) == 1 and steps[0] >= 4 and steps[0] < 1000  # saved at the signal
  assert f"saved step {steps[0]}, stopping" in out, out[-3000:]
  # Resume to a few steps more, with a sample grid at the end.
  end = steps[0] + 2
  r = _cli(["--config", "configs/digits.py:test", "--workdir", str(workdir), workers,
            f"--config.training.num_train_steps={end}",
            f"--config.training.sample_every_steps={end}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert checkpointing.existing_steps(str(workdir))[-1] == end
  grid = np.asarray(Image.open(workdir / "samples" / f"step_{end}.png"))
  assert grid.ndim == 2 and grid.std() > 0


@pytest.mark.slow  # ~1-2.5 min on 2 cores: the default run stays under 15 min
def test_sigterm_during_the_last_save_keeps_it_and_exits_0(tmp_path):
  """The save runs in the background: SIGTERM must not cut it short."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "ddpm_jax.train", "--config", "configs/digits.py:test",
       "--workdir", str(workdir)],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "Saved checkpoint at step 4." in line:  # the last step: a background save
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert checkpointing.existing_steps(str(workdir)) == [2, 4]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # no tmp


_MULTIHOST_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from ddpm_jax import parallel
    parallel.initialize_distributed()
    import jax
    from configs import digits
    from ddpm_jax import trainer
    from test_train_loop import TinyNet, _config
    from test_train_cli import global_batches
    out, = sys.argv[1:]
    n, i = jax.process_count(), jax.process_index()
    local = ({k: np.split(v, n)[i] for k, v in b.items()} for b in global_batches())
    state = trainer.train_and_evaluate(_config(3), out + "/run", model=TinyNet(),
                                       data_iterator=local)
    params = jax.tree.leaves(jax.device_get(state.params))
    np.savez(f"{out}/params_{i}.npz", *params)
""")


def global_batches():
  rs = np.random.RandomState(3)
  while True:
    yield {"image": rs.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
           "label": rs.randint(0, 10, (16,)).astype(np.int32)}


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
  """2 processes x 2 CPU devices (gloo) == 1 process x 8 devices, tol 1e-5."""
  from test_train_loop import TinyNet, _config  # pylint: disable=g-import-not-at-top
  script = tmp_path / "worker.py"
  script.write_text(_MULTIHOST_SCRIPT)
  port = 20000 + os.getpid() % 20000
  procs = []
  for i in range(2):
    env = _env(devices=2)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  for p in procs:
    out, _ = p.communicate(timeout=500)
    assert p.returncode == 0, out[-3000:]
  ref = trainer.train_and_evaluate(_config(3), str(tmp_path / "single"), model=TinyNet(),
                                   data_iterator=global_batches())
  ref_leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(ref.params))]
  got = [np.load(tmp_path / f"params_{i}.npz") for i in range(2)]
  for j, r in enumerate(ref_leaves):
    np.testing.assert_array_equal(got[0][f"arr_{j}"], got[1][f"arr_{j}"])
    np.testing.assert_allclose(got[0][f"arr_{j}"], r, atol=1e-5)
  assert checkpointing.existing_steps(str(tmp_path / "run")) == [2, 3]
