"""Launch scripts: shellcheck, --help, --dry-run output, and real runs against
fake `gcloud` / `srun` executables that execute what the scripts ask for.

The fakes run each remote command in a temporary "worker" home directory, so
these tests check the quoting of every argument end to end, not just the
printed text.
"""
import os
import shlex
import shutil
import stat
import subprocess
import textwrap
import time

import pytest

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


@pytest.mark.parametrize("script", [TPU, SLURM])
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
  proc = run(["bash", SLURM, *options, "--dry-run", "--", *TRAIN_ARGS], env=env)
  assert proc.returncode == 0, proc.stderr
  return shlex.split(proc.stdout)


def test_slurm_dry_run_one_process_per_gpu():
  words = slurm_dry_run()
  assert words[0] == "srun"
  assert "--ntasks-per-node=4" in words and "--ntasks=8" in words and "--nodes=2" in words
  assert not [w for w in words if "JAX_LOCAL_DEVICE_IDS" in w]
  i = words.index("-m")
  assert words[i:] == ["-m", "ddpm_jax.train", *TRAIN_ARGS]
  assert f"--chdir={ROOT}" in words


def test_slurm_dry_run_one_process_per_node():
  words = slurm_dry_run("--per-node")
  assert "--ntasks-per-node=1" in words and "--ntasks=2" in words
  assert "--export=ALL,JAX_LOCAL_DEVICE_IDS=0,1,2,3" in words
  words = slurm_dry_run("--per-node", "--gpus-per-node", "2")
  assert "--export=ALL,JAX_LOCAL_DEVICE_IDS=0,1" in words


def test_slurm_real_run_with_fake_srun(tmp_path):
  write_exe(tmp_path / "srun", """
      #!/usr/bin/env bash
      printf '%s\\n' "$@" > "$FAKE_OUT"
      """)
  out = tmp_path / "srun_args.txt"
  env = dict(SLURM_ENV, PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE_OUT=str(out),
             PYTHON="/opt/py/bin/python")
  proc = run(["bash", SLURM, "--", *TRAIN_ARGS], env=env)
  assert proc.returncode == 0, proc.stderr
  words = out.read_text().splitlines()
  assert words[:1] == ["--kill-on-bad-exit=1"]
  assert words[-(3 + len(TRAIN_ARGS)):] == [
      "/opt/py/bin/python", "-m", "ddpm_jax.train", *TRAIN_ARGS]


@pytest.mark.parametrize("env, options, message", [
    ({}, [], "not inside a SLURM job"),
    ({"SLURM_JOB_ID": "1"}, [], "GPUs per node unknown"),
    ({"SLURM_JOB_ID": "1"}, ["--gpus-per-node", "0"], "GPUs per node unknown or invalid ('0')"),
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


@pytest.mark.parametrize("option", ["-n", "-d", "-p"])
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
