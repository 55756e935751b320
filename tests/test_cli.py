"""cli: one-line errors and exit codes shared by every entry point."""
import logging
import os
import subprocess
import sys
import time

import pytest
from absl import logging as absl_logging

from ddpm_jax import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise(error):
  raise error


@pytest.mark.parametrize("error,text", [
    (ValueError("bad --steps"), "error: bad --steps"),
    (FileNotFoundError("no such run"), "error: no such run"),
])
def test_user_errors_end_in_one_line(error, text, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.exit_on_user_error(_raise, error)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.strip() == text and "Traceback" not in err


_EXIT_SCRIPT = """
import atexit, sys, time
from ddpm_jax import cli, parallel
atexit.register(lambda: print("python shut down", flush=True))
kind, process_id = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:  # one of two processes
  parallel.initialize_distributed(sys.argv[3], 2, process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  gather = lambda: multihost_utils.process_allgather(np.ones(1))
  gather()  # both have joined the collectives
def fail():
  if len(sys.argv) > 3 and process_id == 0:
    gather()  # waits for process 1, which fails instead: this raises
  print("logged before", flush=False)  # flushed on the way out
  raise {"ctrl-c": KeyboardInterrupt, "user": ValueError("bad --steps"),
         "bug": RuntimeError("a bug")}[kind]
cli.exit_on_user_error(fail)
"""


def _run_exit_script(tmp_path, *args):
  script = tmp_path / "exit.py"
  script.write_text(_EXIT_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  return subprocess.Popen([sys.executable, str(script), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def test_ctrl_c_leaves_at_once_with_130(tmp_path):
  """Python's shutdown is skipped: it could crash in XLA's compiler threads."""
  p = _run_exit_script(tmp_path, "ctrl-c", "0")
  out, err = p.communicate(timeout=120)
  assert p.returncode == 130
  assert err.strip() == "interrupted"
  assert out.strip() == "logged before"  # flushed, and no atexit handler ran


@pytest.mark.parametrize("kind,message", [
    ("user", "error: bad --steps"),
    ("bug", "RuntimeError: a bug"),  # with its traceback
])
def test_one_failing_process_of_several_exits_at_once(tmp_path, kind, message):
  """Not after jax.distributed's 5-minute shutdown barrier. (How soon the
  other process notices depends on where it waits: 1-2 s in a running
  collective by hand, longer when the peer left before the collective began,
  so it is not timed here.)"""
  address = f"127.0.0.1:{20000 + (os.getpid() + 7 + len(kind)) % 20000}"
  waiting = _run_exit_script(tmp_path, kind, "0", address)
  try:
    failing = _run_exit_script(tmp_path, kind, "1", address)
    start = time.monotonic()
    out, err = failing.communicate(timeout=150)
    assert failing.returncode == 1, err
    assert message in err
    assert ("Traceback" in err) == (kind == "bug"), err
    assert time.monotonic() - start < 60
  finally:
    waiting.kill()
    waiting.communicate()


def test_other_errors_are_not_hidden():
  with pytest.raises(ZeroDivisionError):
    cli.exit_on_user_error(lambda: 1 / 0)


def test_quiet_orbax_drops_only_the_expected_lines():
  cli.quiet_orbax()
  handler = absl_logging.get_absl_handler()

  def shown(level, msg, path, args=None):
    record = logging.LogRecord("absl", level, path, 1, msg, args, None)
    return all(f.filter(record) for f in handler.filters)

  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not shown(logging.INFO, "Saving checkpoint", orbax)
  assert not shown(logging.WARNING, "Given directory is read only=/w/checkpoints", orbax)
  assert not shown(logging.WARNING, 'Item "%s" was found in the checkpoint, but could '
                   "not be restored.", orbax, ("data",))
  assert shown(logging.WARNING, "Checkpoint save failed", orbax)
  assert shown(logging.INFO, "step 10/100 loss 0.1", "/ddpm_jax/trainer.py")


def test_config_flag_errors_are_one_clear_line(tmp_path):
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def train(*args):
    return subprocess.run([sys.executable, "-m", "ddpm_jax.train", "--workdir",
                           str(tmp_path / "w"), *args], cwd=root, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=root))

  proc = train("--config", "configs/nope.py")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: --config configs/nope.py: no such file (configs/ holds the built-in "
      "ones, e.g. configs/digits.py)."]
  proc = train("--config", "configs/digits.py:test", "--config.training.batchsize=8")
  assert proc.returncode == 1
  assert proc.stderr.startswith(
      "error: unknown config key 'batchsize' Did you mean \"batch_size\" instead of "
      "\"batchsize\"? (in one of ['--config.training.batchsize']).")
  assert not (tmp_path / "w").exists()
  # Asking for help succeeds (absl's own exit status for it is 1).
  proc = train("--help")
  assert proc.returncode == 0, proc.stderr
  assert "`python -m ddpm_jax.train --config configs/digits.py --workdir DIR`" in proc.stdout
  assert "--workdir: Run directory: checkpoints, logs, samples." in proc.stdout


@pytest.mark.parametrize("source, message", [
    ("def get_config(:\n  pass\n",
     r"error: --config \S+bad\.py, line 1: invalid syntax: def get_config\(:"),
    ("X = 1\n", r"error: --config \S+bad\.py: the file must define get_config\(\)"),
    ("def get_config():\n  return {'training': {}}\n",
     r"error: --config \S+bad\.py: get_config\(\) returned a dict; it must return "
     r"an ml_collections\.ConfigDict"),
])
def test_a_broken_config_file_is_one_line(tmp_path, source, message):
  """Before: a traceback (syntax, a dict) or 'unknown config key' (no get_config)."""
  import re  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  (tmp_path / "bad.py").write_text(source)
  r = subprocess.run([sys.executable, "-m", "ddpm_jax.train", "--config",
                      str(tmp_path / "bad.py"), "--workdir", str(tmp_path / "run")],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and re.search(message, r.stderr), r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
