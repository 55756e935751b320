"""Launch scripts: shellcheck, --help, --dry-run output, and real runs against
fake `gcloud` / `srun` executables that execute what the scripts ask for.

The fakes run each remote command in a temporary "worker" home directory, so
these tests check the quoting of every argument end to end, not just the
printed text.
"""
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from test_evaluate import library_scores, random_inception_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
LOCAL = os.path.join(ROOT, "launch", "local.sh")

# Training arguments with the characters that break naive quoting.
TRAIN_ARGS = ["--config", "configs/cifar10.py", "--workdir", "/mnt/my runs/it's here",
              "--config.training.batch_size=64"]


def run(cmd, env=None, **kwargs):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  full_env.update(env or {})
  return subprocess.run(cmd, capture_output=True, text=True, env=full_env,
                        timeout=60, **kwargs)


def write_exe(path, text):
  with open(path, "w") as f:
    f.write(textwrap.dedent(text).lstrip())
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


# ---------------------------------------------------------------------------
# Static checks


@pytest.mark.parametrize("script", [TPU, SLURM, LOCAL])
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
  proc = run(["shellcheck", "--shell=bash", script])
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [TPU, SLURM, LOCAL])
def test_help(script):
  proc = run(["bash", script, "--help"])
  assert proc.returncode == 0, proc.stderr
  assert "Usage:" in proc.stdout and "--dry-run" in proc.stdout
  assert "set -euo" not in proc.stdout  # the usage text stops at the header


# ---------------------------------------------------------------------------
# tpu_pod.sh


def tpu_dry_run(*options):
  proc = run(["bash", TPU, "--tpu", "pod-a", "--zone", "us-central2-b", *options,
              "--dry-run", "--", *TRAIN_ARGS])
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def remote_command(step):
  assert step[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], step
  assert "--worker=all" in step and step[step.index("--zone") + 1] == "us-central2-b"
  return step[step.index("--command") + 1]


def test_tpu_dry_run_installs_then_trains_on_all_workers():
  steps = tpu_dry_run("--env", "TFDS_DATA_DIR=/mnt/tfds", "--project", "proj")
  assert len(steps) == 4
  archive, scp, install, train = steps
  assert archive[:3] == ["git", "-C", ROOT] and archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "pod-a:ddpm_jax_src.tar.gz"] and "--worker=all" in scp
  for step in (scp, install, train):
    assert step[step.index("--project") + 1] == "proj"
  assert "jax[tpu]" in shlex.split(remote_command(install))
  words = shlex.split(remote_command(train))
  i = words.index(".venv/bin/python")
  assert words[i:i + 3 + len(TRAIN_ARGS)] == [
      ".venv/bin/python", "-m", "ddpm_jax.train", *TRAIN_ARGS]
  assert "TFDS_DATA_DIR=/mnt/tfds" in words[:i]


def test_tpu_dry_run_options():
  steps = tpu_dry_run("--no-install", "--detach", "--remote-dir", "code/ddpm",
                      "--jax-spec", "jax[tpu]==0.10.2")
  assert len(steps) == 1
  words = shlex.split(remote_command(steps[0]))
  assert words[:3] == ["cd", "code/ddpm", "&&"] and words[3] == "nohup"
  assert "--project" not in steps[0]
  steps = tpu_dry_run("--jax-spec", "jax[tpu]==0.10.2")
  assert "jax[tpu]==0.10.2" in shlex.split(remote_command(steps[2]))


@pytest.mark.parametrize("options, message", [
    (["--zone", "z"], "--tpu NAME is required"),
    (["--tpu", "t"], "--zone ZONE is required"),
    (["--tpu", "t", "--zone", "z", "--bogus"], "unknown option '--bogus'"),
    (["--tpu", "t", "--zone", "z", "--env", "1BAD"], "--env takes VAR=VALUE"),
    (["--tpu", "--zone", "z"], "--tpu needs a value"),
    (["--tpu", "t", "--zone", "z", "--remote-dir", "a;b"], "--remote-dir"),
])
def test_tpu_bad_options(options, message):
  proc = run(["bash", TPU, *options, "--dry-run", "--", "--config", "c"])
  assert proc.returncode == 2
  assert message in proc.stderr and proc.stdout == ""


def test_tpu_needs_training_args():
  proc = run(["bash", TPU, "--tpu", "t", "--zone", "z", "--dry-run"])
  assert proc.returncode == 2 and "no training arguments" in proc.stderr


@pytest.mark.parametrize("detach", [False, True])
def test_tpu_module_runs_sample_or_evaluate_with_its_own_log(detach):
  steps = tpu_dry_run("--no-install", "--module", "sample", *(["--detach"] if detach else []))
  words = shlex.split(remote_command(steps[0]))
  i = words.index(".venv/bin/python")
  assert words[i:i + 3] == [".venv/bin/python", "-m", "ddpm_jax.sample"]
  assert "DDPM_JAX_DISTRIBUTED=1" in words[:i]
  assert "~/ddpm_sample.log" in words and "~/ddpm_train.log" not in words


@pytest.mark.parametrize("script, options", [
    (TPU, ["--tpu", "t", "--zone", "z"]), (SLURM, ["--gpus-per-node", "2"]), (LOCAL, [])])
def test_launchers_refuse_an_unknown_module(script, options):
  flag = "-m" if script == LOCAL else "--module"
  proc = run(["bash", script, *options, flag, "convert", "--dry-run", "--", "--workdir", "w"],
             env=SLURM_ENV)
  assert proc.returncode == 2
  assert f"{flag} takes train, sample or evaluate, got 'convert'" in proc.stderr


@pytest.fixture
def fake_pod(tmp_path):
  """A fake `gcloud` running tpu-vm scp/ssh on two local worker homes."""
  bin_dir = tmp_path / "bin"
  stubs = tmp_path / "stubs"
  workers = tmp_path / "workers"
  for d in (bin_dir, stubs, workers / "w0", workers / "w1"):
    d.mkdir(parents=True)
  log = tmp_path / "gcloud.log"
  write_exe(bin_dir / "gcloud", f"""
      #!/usr/bin/env bash
      # gcloud compute tpus tpu-vm (scp SRC NAME:DST | ssh NAME) --zone Z --worker=all ... [--command CMD]
      set -euo pipefail
      echo "$*" >> {log}
      [[ "$1 $2 $3" == "compute tpus tpu-vm" ]] || exit 90
      sub=$4; shift 4
      args=("$@"); cmd=''; all=0
      for ((i = 0; i < ${{#args[@]}}; i++)); do
        [[ "${{args[$i]}}" == --worker=all ]] && all=1
        [[ "${{args[$i]}}" == --command ]] && cmd=${{args[$((i + 1))]}}
      done
      ((all)) || exit 91
      for w in {workers}/*; do
        if [[ $sub == scp ]]; then cp "$1" "$w/${{2#*:}}"
        else (cd "$w" && HOME=$w PATH={stubs}:$PATH bash -c "$cmd"); fi
      done
      """)
  # The worker's python3 makes a "virtual environment" of recording stubs.
  write_exe(stubs / "python3", f"""
      #!/usr/bin/env bash
      if [[ "$1 $2" == "-m venv" ]]; then
        mkdir -p "$3/bin" && cp {stubs}/venv_python "$3/bin/python" && cp {stubs}/venv_pip "$3/bin/pip"
        exit 0
      fi
      exit 92
      """)
  write_exe(stubs / "venv_pip", """
      #!/usr/bin/env bash
      printf '%s\\n' "$@" >> "$HOME/pip_args.txt"
      """)
  write_exe(stubs / "venv_python", """
      #!/usr/bin/env bash
      printf '%s\\n' "$@" > "$HOME/train_args.txt"
      echo "TFDS_DATA_DIR=${TFDS_DATA_DIR:-}" > "$HOME/train_env.txt"
      echo "DDPM_JAX_DISTRIBUTED=${DDPM_JAX_DISTRIBUTED:-}" >> "$HOME/train_env.txt"
      echo "training on $(pwd)"
      """)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
  return workers, env, log


def test_tpu_real_run_with_fake_gcloud(fake_pod):
  if run(["git", "-C", ROOT, "rev-parse", "HEAD"]).returncode:
    pytest.skip("not a git checkout (the script copies `git archive HEAD`)")
  workers, env, log = fake_pod
  archives = lambda: {p for p in os.listdir("/tmp") if p.startswith("ddpm_jax_src_")}
  before = archives()
  proc = run(["bash", TPU, "--tpu", "pod-a", "--zone", "z", "--env",
              "TFDS_DATA_DIR=/mnt/a b", "--", *TRAIN_ARGS], env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert len(log.read_text().splitlines()) == 3  # scp, install, train
  for w in ("w0", "w1"):
    home = workers / w
    # The committed tree was unpacked and installed with jax[tpu].
    assert (home / "ddpm_jax" / "ddpm_jax" / "train.py").is_file()
    assert (home / "ddpm_jax" / "setup.cfg").is_file()
    pip_args = (home / "pip_args.txt").read_text().splitlines()
    assert "jax[tpu]" in pip_args and pip_args[-2:] == ["-e", "."]
    assert (home / "train_args.txt").read_text().splitlines() == [
        "-m", "ddpm_jax.train", *TRAIN_ARGS]
    # Every worker is told to call jax.distributed.initialize().
    assert (home / "train_env.txt").read_text().splitlines() == [
        "TFDS_DATA_DIR=/mnt/a b", "DDPM_JAX_DISTRIBUTED=1"]
    assert "training on" in (home / "ddpm_train.log").read_text()
  # The local archive is removed again.
  assert archives() == before


def test_tpu_real_run_fails_when_a_worker_fails(fake_pod):
  workers, env, _ = fake_pod
  # No virtual environment on the workers (install skipped): training fails.
  proc = run(["bash", TPU, "--tpu", "pod-a", "--zone", "z", "--no-install", "--",
              *TRAIN_ARGS], env=env)
  assert proc.returncode != 0
  assert not (workers / "w0" / "train_args.txt").exists()


# ---------------------------------------------------------------------------
# slurm_gpu.sbatch

SLURM_ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
             "SLURM_SUBMIT_DIR": ROOT}


def slurm_dry_run(*options, env=SLURM_ENV):
  """The srun command's words and the variables the dry run exports first."""
  proc = run(["bash", SLURM, *options, "--dry-run", "--", *TRAIN_ARGS], env=env)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  exports = dict(shlex.split(line)[1].split("=", 1) for line in lines[:-1])
  assert all(line.startswith("export ") for line in lines[:-1]), lines
  return shlex.split(lines[-1]), exports


def test_slurm_dry_run_one_process_per_gpu():
  words, exports = slurm_dry_run()
  assert words[0] == "srun"
  assert "--ntasks-per-node=4" in words and "--ntasks=8" in words and "--nodes=2" in words
  assert not [w for w in words if "JAX_LOCAL_DEVICE_IDS" in w]
  assert "JAX_LOCAL_DEVICE_IDS" not in exports
  i = words.index("-m")
  assert words[i:] == ["-m", "ddpm_jax.train", *TRAIN_ARGS]
  assert f"--chdir={ROOT}" in words


def test_slurm_dry_run_module():
  words, _ = slurm_dry_run("--module", "evaluate")
  assert words[words.index("-m"):] == ["-m", "ddpm_jax.evaluate", *TRAIN_ARGS]


def test_slurm_dry_run_one_process_per_node():
  words, exports = slurm_dry_run("--per-node")
  assert "--ntasks-per-node=1" in words and "--ntasks=2" in words
  assert exports["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  _, exports = slurm_dry_run("--per-node", "--gpus-per-node", "2")
  assert exports["JAX_LOCAL_DEVICE_IDS"] == "0,1"


@pytest.fixture
def fake_srun(tmp_path):
  """A fake `srun` that applies --export as Slurm does (a comma-separated
  list of ALL, NONE, VAR or VAR=VALUE) and records the task's environment
  and command line."""
  write_exe(tmp_path / "srun", """
      #!/usr/bin/env bash
      while [[ "$1" == --* ]]; do
        if [[ "$1" == --export=* ]]; then
          IFS=, read -ra items <<< "${1#--export=}"
          for item in "${items[@]}"; do [[ "$item" == *=* ]] && export "$item"; done
        fi
        printf '%s\\n' "$1" >> "$FAKE_OUT.args"
        shift
      done
      printf '%s\\n' "$@" >> "$FAKE_OUT.args"
      echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS-unset}" > "$FAKE_OUT.env"
      echo "JAX_COORDINATOR_PORT=${JAX_COORDINATOR_PORT-unset}" >> "$FAKE_OUT.env"
      """)
  out = tmp_path / "srun"

  def run_srun(*options, **env):
    for suffix in (".args", ".env"):
      if os.path.exists(f"{out}{suffix}"):
        os.remove(f"{out}{suffix}")
    full_env = dict(SLURM_ENV, PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE_OUT=str(out),
                    PYTHON="/opt/py/bin/python")
    full_env.update(env)
    proc = run(["bash", SLURM, *options, "--", *TRAIN_ARGS], env=full_env)
    assert proc.returncode == 0, proc.stderr
    task_env = dict(line.split("=", 1) for line in open(f"{out}.env").read().splitlines())
    return open(f"{out}.args").read().splitlines(), task_env

  return run_srun


def test_slurm_real_run_with_fake_srun(fake_srun):
  words, _ = fake_srun()
  assert words[:1] == ["--kill-on-bad-exit=1"]
  assert words[-(3 + len(TRAIN_ARGS)):] == [
      "/opt/py/bin/python", "-m", "ddpm_jax.train", *TRAIN_ARGS]


def test_slurm_tasks_get_every_device_id_per_node(fake_srun):
  """--per-node: each task sees all G device ids (an --export=ALL,VAR=0,1,2,3
  option would give it VAR=0 only: Slurm splits the list on every comma)."""
  words, task_env = fake_srun("--per-node")
  assert task_env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  assert "--export=ALL" in words  # also when sbatch --export=NONE set SLURM_EXPORT_ENV
  # One process per GPU: JAX picks GPU SLURM_LOCALID; an inherited list must go.
  _, task_env = fake_srun(JAX_LOCAL_DEVICE_IDS="0,1,2,3")
  assert task_env["JAX_LOCAL_DEVICE_IDS"] == "unset"


def test_slurm_coordinator_port_from_the_whole_job_id(fake_srun):
  """JAX's default port, 61440 + SLURM_JOB_ID % 4096, is the same for jobs
  4096 apart: the second job's coordinator then kills the first job."""
  ports = set()
  for job in ("42", str(42 + 4096), str(42 + 2 * 4096), "987654"):
    _, task_env = fake_srun(SLURM_JOB_ID=job)
    port = int(task_env["JAX_COORDINATOR_PORT"])
    assert 1024 < port < 32768
    ports.add(port)
  assert len(ports) == 4
  # The dry run shows it.
  _, exports = slurm_dry_run(env=dict(SLURM_ENV, SLURM_JOB_ID="4138"))
  assert exports["JAX_COORDINATOR_PORT"] == str(fake_srun(SLURM_JOB_ID="4138")[1][
      "JAX_COORDINATOR_PORT"])
  # A port set by the user is kept.
  _, task_env = fake_srun(JAX_COORDINATOR_PORT="23456")
  assert task_env["JAX_COORDINATOR_PORT"] == "23456"


def listen_on_a_port(first, last):
  """A socket listening on 127.0.0.1 on some port in [first, last)."""
  for port in range(first + os.getpid() % (last - first - 100), last):
    sock = socket.socket()
    try:
      sock.bind(("127.0.0.1", port))
    except OSError:
      sock.close()
      continue
    sock.listen()
    return sock
  pytest.skip(f"no free port in [{first}, {last})")


def test_slurm_coordinator_port_skips_a_port_in_use(fake_srun):
  with listen_on_a_port(10000, 29000) as busy:
    port = busy.getsockname()[1]
    _, task_env = fake_srun(SLURM_JOB_ID=str(port - 10000))
  assert port < int(task_env["JAX_COORDINATOR_PORT"]) < port + 100


@pytest.mark.parametrize("env, options, message", [
    ({}, [], "not inside a SLURM job"),
    ({"SLURM_JOB_ID": "1"}, [], "GPUs per node unknown"),
    ({"SLURM_JOB_ID": "1"}, ["--gpus-per-node", "0"], "GPUs per node unknown or invalid ('0')"),
    (dict(SLURM_ENV, JAX_COORDINATOR_PORT="70000"), [], "is not a port (1..65535)"),
    (dict(SLURM_ENV, SLURM_JOB_ID="12_3"), [], "SLURM_JOB_ID '12_3' is not a number"),
    (SLURM_ENV, ["--bogus"], "unknown option '--bogus'"),
])
def test_slurm_errors(env, options, message, tmp_path):
  # A fake srun that must never be reached.
  write_exe(tmp_path / "srun", "#!/usr/bin/env bash\nexit 93\n")
  env = dict(env, PATH=f"{tmp_path}:{os.environ['PATH']}")
  proc = run(["bash", SLURM, *options, "--", "--config", "c"], env=env)
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr


# ---------------------------------------------------------------------------
# local.sh


@pytest.mark.parametrize("first", [["3"], ["-n", "3"]])
def test_local_takes_the_process_count_first_or_with_n(first):
  proc = run(["bash", LOCAL, *first, "-m", "evaluate", "--dry-run", "--", "--workdir", "w"])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert [shlex.split(line)[-1] for line in lines] == [f"--process_id={i}" for i in range(3)]
  assert all("--num_processes=3" in line and "ddpm_jax.evaluate" in line for line in lines)
  proc = run(["bash", LOCAL, "two", "--dry-run", "--", "--workdir", "w"])
  assert proc.returncode == 2 and "positive integers, got 'two'" in proc.stderr


@pytest.mark.parametrize("option", ["-n", "-d", "-p", "-m"])
def test_local_option_without_a_value(option):
  proc = run(["bash", LOCAL, option])
  assert proc.returncode == 2 and f"error: {option} needs a value" in proc.stderr


def test_local_sigterm_waits_for_the_processes_to_save(tmp_path):
  """SIGTERM is passed on; the script waits for each process to finish saving
  and exits 0 when they all exit 0 (a preempted run that saved is no failure)."""
  fake = tmp_path / "python"
  write_exe(fake, f"""
      #!/usr/bin/env bash
      id="${{@: -1}}"
      trap 'sleep 1; echo saved > "{tmp_path}/saved_$id"; exit 0' TERM
      touch "{tmp_path}/started_$id"
      for _ in $(seq 300); do sleep 0.1; done
      exit 3
      """)
  proc = subprocess.Popen(["bash", LOCAL, "-n", "2", "--", "--workdir", "w"],
                          env=dict(os.environ, PYTHON=str(fake), LOG_DIR=str(tmp_path / "logs")),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not all((tmp_path / f"started_--process_id={i}").exists() for i in range(2)):
    assert proc.poll() is None and time.time() < deadline, "the processes did not start"
    time.sleep(0.1)
  proc.terminate()
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 0, err
  assert sorted(p.name for p in tmp_path.glob("saved_*")) == [
      "saved_--process_id=0", "saved_--process_id=1"]


# A fake trainer, run by a fake `python`: process 0 listens on the coordinator
# port (as jax.distributed's coordinator does); SIGTERM saves (FAKE_SAVE_S
# seconds) and exits 0 (with FAKE_TERM_EXIT=N: exits N at once, as sample and
# evaluate do with 143); each process records how it was started; it stops
# when OUT/stop appears; with FAKE_FAIL=1 process 0 exits 0 at once and
# process 1 prints 15 lines and exits 3.
_FAKE_TRAIN = """
import json, os, signal, socket, sys, time
args = sys.argv[1:]
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
out, pid = os.environ["FAKE_OUT"], opts["process_id"]
port = int(opts["coordinator_address"].rsplit(":", 1)[1])
if pid == "0":
  server = socket.socket()
  server.bind(("127.0.0.1", port))
  server.listen()

def on_term(*_):
  if os.environ.get("FAKE_TERM_EXIT"):  # sample, evaluate: stop, save nothing
    sys.exit(int(os.environ["FAKE_TERM_EXIT"]))
  time.sleep(float(os.environ.get("FAKE_SAVE_S", "0.2")))
  open(f"{out}/saved_{port}_{pid}", "w").close()
  sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
record = {"args": args, "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
          "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN}
with open(f"{out}/tmp_{port}_{pid}", "w") as f:
  json.dump(record, f)
os.rename(f"{out}/tmp_{port}_{pid}", f"{out}/started_{port}_{pid}.json")
if os.environ.get("FAKE_FAIL") == "1":
  if pid == "0":
    sys.exit(0)
  for i in range(1, 16):
    print(f"line {i}")
  sys.exit(3)
deadline = time.time() + 50
while time.time() < deadline and not os.path.exists(f"{out}/stop"):
  time.sleep(0.05)
"""


@pytest.fixture
def fake_local(tmp_path):
  """Starts launch/local.sh with the fake trainer; logs go under tmp_path."""
  (tmp_path / "fake_train.py").write_text(_FAKE_TRAIN)
  write_exe(tmp_path / "python", f"""
      #!/usr/bin/env bash
      exec {sys.executable} {tmp_path}/fake_train.py "$@"
      """)
  procs = []

  def start(*options, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PORT", "LOG_DIR", "XLA_FLAGS")}
    full_env.update(PYTHON=str(tmp_path / "python"), FAKE_OUT=str(tmp_path),
                    TMPDIR=str(tmp_path))
    full_env.update(env)
    # A session of its own, as a terminal's foreground job: Ctrl-C signals it all.
    proc = subprocess.Popen(["bash", LOCAL, *options, "--", "--workdir", "w"], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    procs.append(proc)
    return proc

  yield start
  (tmp_path / "stop").touch()
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def started(tmp_path):
  """{(port, process id): record} of the fake processes started so far."""
  records = {}
  for path in tmp_path.glob("started_*.json"):
    _, port, pid = path.stem.split("_")
    records[int(port), int(pid)] = json.loads(path.read_text())
  return records


def wait_for(condition, proc, what):
  deadline = time.time() + 30
  while not condition():
    assert proc.poll() is None, f"local.sh ended before {what}: {proc.communicate()}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def test_local_concurrent_runs_get_their_own_port_and_log_dir(fake_local, tmp_path):
  """A second run must not reach the first run's coordinator (the fixed
  port 12355 did: it killed the first run) nor share its logs."""
  first = fake_local("-n", "2", "-d", "2", XLA_FLAGS="--xla_dump_to=/tmp/x")
  wait_for(lambda: len(started(tmp_path)) == 2, first, "the first run started")
  (port_a,) = {port for port, _ in started(tmp_path)}
  second = fake_local("-n", "2")
  wait_for(lambda: len(started(tmp_path)) == 4, second, "the second run started")
  port_b = ({port for port, _ in started(tmp_path)} - {port_a}).pop()
  assert first.poll() is None and second.poll() is None
  records = started(tmp_path)
  assert f"--coordinator_address=127.0.0.1:{port_b}" in records[port_b, 1]["args"]
  # The user's XLA_FLAGS are kept; the device count is appended.
  assert records[port_a, 0]["XLA_FLAGS"] == (
      "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2")
  assert records[port_b, 0]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
  # An explicit port that is in use is refused before anything starts.
  for options, env in (((("-p", str(port_a)),), {}), ((), {"PORT": str(port_a)})):
    proc = fake_local(*[w for o in options for w in o], **env)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and f"port {port_a} is in use" in err, err
  assert len(started(tmp_path)) == 4
  (tmp_path / "stop").touch()
  log_dirs = []
  for proc in (first, second):
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    # The log directory is named at the start, and again at the end.
    lines = err.strip().splitlines()
    assert "logs in " in lines[0] and lines[-1].startswith("local.sh: all 2 processes finished")
    log_dirs.append(lines[-1].rsplit("logs in ", 1)[1])
  assert log_dirs[0] != log_dirs[1] and str(port_a) in log_dirs[0]
  assert all(os.path.isfile(os.path.join(d, "process_1.log")) for d in log_dirs)


@pytest.mark.parametrize("port", ["70000", "0", "80a", "123456"])
def test_local_bad_port(port):
  for cmd, env in ((["-p", port], {}), ([], {"PORT": port})):
    proc = run(["bash", LOCAL, *cmd, "--dry-run", "--", "--workdir", "w"], env=env)
    assert proc.returncode == 2, proc.stdout
    assert "port number from 1 to 65535" in proc.stderr and proc.stdout == ""


def test_local_failure_shows_the_end_of_the_log(fake_local):
  proc = fake_local("-n", "2", FAKE_FAIL="1")
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 1
  assert "process 1 failed (exit 3)" in err
  assert "line 15" in err and "line 6" in err and "line 5\n" not in err


def test_local_ctrl_c_saves_and_exits_130(fake_local, tmp_path):
  proc = fake_local("-n", "2")
  wait_for(lambda: len(started(tmp_path)) == 2, proc, "the processes started")
  assert all(r["sigint_ignored"] for r in started(tmp_path).values())
  os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 130, err
  assert len(list(tmp_path.glob("saved_*"))) == 2
  assert "run the same command to resume" in err.strip().splitlines()[-1]


def test_local_sigterm_stops_sample_with_143(fake_local, tmp_path):
  """Sample and evaluate stop on SIGTERM without saving (exit 143 each):
  no failure logs, and local.sh exits 143 too."""
  proc = fake_local("-n", "2", "-m", "sample", FAKE_TERM_EXIT="143")
  wait_for(lambda: len(started(tmp_path)) == 2, proc, "the processes started")
  proc.terminate()  # to local.sh alone: it passes SIGTERM on
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 143, err
  assert err.strip().splitlines()[-1] == "local.sh: terminated"
  assert "failed" not in err and not list(tmp_path.glob("saved_*"))


def test_local_second_ctrl_c_stops_at_once(fake_local, tmp_path):
  proc = fake_local("-n", "2", FAKE_SAVE_S="40")
  wait_for(lambda: len(started(tmp_path)) == 2, proc, "the processes started")
  os.killpg(proc.pid, signal.SIGINT)
  time.sleep(0.5)
  start = time.time()
  os.killpg(proc.pid, signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert time.time() - start < 10
  assert proc.returncode == 130, err
  assert not list(tmp_path.glob("saved_*"))
  assert "failed" not in err and "resume" in err


def process_logs(log_dir):
  """The texts of process_0.log and process_1.log in local.sh's `log_dir`."""
  return [(log_dir / f"process_{i}.log").read_text() for i in range(2)]


def test_local_sample_and_evaluate_on_two_processes(tmp_path):
  """`local.sh -m sample` / `-m evaluate`: 2 processes x 2 CPU devices (gloo)
  draw the samples and the bits/dim the library gives on this process's
  8 devices; process 0 alone writes and prints. A refused output and Ctrl-C
  stop both processes cleanly."""
  from ddpm_jax import checkpointing, generation  # pylint: disable=g-import-not-at-top
  from ddpm_jax.metrics import bpd  # pylint: disable=g-import-not-at-top
  from tiny_models import random_params, tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  checkpointing.save_pretrained(workdir, tiny_config(), random_params(tiny_config()))
  config, params, _ = checkpointing.load_params(workdir)
  env = {k: v for k, v in os.environ.items() if k not in ("PORT", "XLA_FLAGS")}
  out = tmp_path / "s.npz"
  for module, args, console in [
      ("sample", ["--num_samples", "5", "--steps", "4", "--out", str(out), "--grid", "none"],
       ["on 4 device(s)", "sampling:", "Wrote"]),
      ("evaluate", ["--metric", "bpd", "--num_examples", "7", "--batch_size", "4"],
       ["bits/dim at step 0"])]:
    logs = tmp_path / f"logs_{module}"
    r = subprocess.run(["bash", LOCAL, "-n", "2", "-d", "2", "-m", module, "--",
                        "--workdir", workdir, *args], env=dict(env, LOG_DIR=str(logs)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stderr, [p.read_text()[-2000:] for p in logs.glob("*.log")])
    first, second = process_logs(logs)
    for text in console:  # process 0's console only
      assert text in first and text not in second, (text, first, second)

  ours = generation.generate(config, params, num_samples=5, batch_size=64, seed=0,
                             options=generation.SamplerOptions(steps="4"),
                             progress=False)["samples"]
  theirs = np.load(out)["samples"]
  assert theirs.shape == ours.shape == (5, 8, 8, 1)
  # 4 devices there, 8 here: float32 rounding may move a pixel by one level.
  assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1
  assert np.mean(theirs == ours) > 0.99
  (result_file,) = (tmp_path / "run" / "eval").glob("bpd_*.json")
  written = json.loads(result_file.read_text())
  expected = bpd.evaluate_bpd(config, params, num_examples=7, batch_size=4,
                              progress=False)
  assert written["num_examples"] == 7
  np.testing.assert_allclose(written["total_bpd"], expected["total_bpd"], rtol=1e-5)

  # An output only process 0 checks (it alone writes): every process stops
  # with one line (process 1 used to abort in its next collective).
  logs = tmp_path / "logs_refused"
  r = subprocess.run(["bash", LOCAL, "-n", "2", "-d", "2", "-m", "sample", "--",
                      "--workdir", workdir, "--out", "/proc/x.npz"],
                     env=dict(env, LOG_DIR=str(logs)), capture_output=True, text=True,
                     timeout=300)
  first, second = process_logs(logs)
  assert r.returncode == 1
  assert "error: Cannot write /proc/x.npz" in first
  assert "error: process 0 refused the request" in second
  assert "Traceback" not in first + second and "Check failure" not in first + second

  # Ctrl-C: the processes stop at once (JAX's pre-emption notifier used to
  # swallow their SIGTERM: they sampled on and wrote the output).
  logs = tmp_path / "logs_interrupted"
  proc = subprocess.Popen(
      ["bash", LOCAL, "-n", "2", "-d", "2", "-m", "sample", "--", "--workdir", workdir,
       "--num_samples", "2000", "--batch_size", "8", "--out", str(tmp_path / "int.npz")],
      env=dict(env, LOG_DIR=str(logs)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, start_new_session=True)
  try:
    deadline, log0 = time.time() + 240, logs / "process_0.log"
    while not (log0.exists() and "sampling:" in log0.read_text()):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()
      time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  first, second = process_logs(logs)
  assert proc.returncode == 130 and "local.sh: interrupted" in err, err
  assert "terminated" in first and "terminated" in second, (first, second)
  assert "Check failure" not in first + second
  assert "Wrote" not in first and not list(tmp_path.glob("int*"))


@pytest.mark.slow
def test_local_fid_is_kid_on_two_processes(tmp_path, peer):
  """`local.sh -m evaluate --metric fid,is,kid`: 2 processes x 2 CPU devices
  share the Inception passes (21 samples, 13 reference images: blocks of 11
  and 10, of 7 and 6) and give the scores of one pass over all; process 0
  alone prints, computes the scores and writes the statistics' cache.
  (test_evaluate.test_two_processes_share_the_inception_passes checks the
  same plumbing, with a stand-in for Inception, in the default run.)"""
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from tiny_models import random_params, tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = tiny_config()
  checkpointing.save_pretrained(workdir, config, random_params(config))
  weights = random_inception_weights(peer, tmp_path / "inception.npz")
  samples = np.random.default_rng(0).integers(0, 256, (21, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / "s.npz", samples=samples)
  cache = str(tmp_path / "cache")
  env = {k: v for k, v in os.environ.items() if k not in ("PORT", "XLA_FLAGS")}
  results = []
  for name in ("computed", "cached"):  # the reference statistics
    logs = tmp_path / f"logs_{name}"
    r = subprocess.run(
        ["bash", LOCAL, "-n", "2", "-d", "2", "-m", "evaluate", "--", "--workdir",
         workdir, "--metric", "fid,is,kid", "--samples", str(tmp_path / "s.npz"),
         "--num_reference", "13", "--inception_weights", weights, "--stats_cache",
         cache, "--batch_size", "8"],
        env=dict(env, LOG_DIR=str(logs)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stderr, [p.read_text()[-2000:] for p in logs.glob("*.log")])
    first, second = process_logs(logs)
    assert "FID " in first and "FID " not in second, (first, second)
    assert "Inception" not in second and "Warning" not in second, second
    (cache_file,) = os.listdir(cache)
    written = os.stat(os.path.join(cache, cache_file)).st_mtime_ns
    (result_file,) = (tmp_path / "run" / "eval").glob("fid_is_kid_*.json")
    results.append((json.loads(result_file.read_text()), written))
  assert results[0] == results[1]  # the second run read the cache, equally
  results = [r for r, _ in results]

  want = library_scores(weights, config, samples, 13)
  np.testing.assert_allclose([results[0][k] for k in want], list(want.values()),
                             rtol=1e-4)
