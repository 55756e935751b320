"""When `parallel.initialize_distributed` starts `jax.distributed` (without
starting it: `jax.distributed.initialize` is replaced by a recorder). The
real two-process run is `test_train_cli.test_two_processes_match_single_process`.
"""
import logging

import pytest

from ddpm_jax import parallel

CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "SLURM_STEP_NUM_NODES", "SLURM_NODELIST",
                "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "DDPM_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT")

# One task of `srun -n 4` on two nodes, and the shell of `salloc -n 4` (or an
# sbatch script) before srun: SLURM_NTASKS alone is not a running step.
SRUN_TASK = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[01-02]",
             "SLURM_STEP_NUM_NODES": "2", "SLURM_NTASKS": "4", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "1"}
SALLOC_SHELL = {"SLURM_JOB_ID": "1234", "SLURM_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "4"}
# A process of `mpirun -n 2` (Open MPI 4) and of Open MPI 5 (PRRTE: no hnp uri).
OMPI4 = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
         "OMPI_COMM_WORLD_LOCAL_RANK": "1",
         "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}
OMPI5 = {k: v for k, v in OMPI4.items() if k != "OMPI_MCA_orte_hnp_uri"}


@pytest.fixture
def calls(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  recorded = []
  monkeypatch.setattr(parallel.jax.distributed, "initialize",
                      lambda *args, **kwargs: recorded.append((args, kwargs)))
  return recorded


def set_env(monkeypatch, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)


AUTO_CASES = [
    ({}, False),
    ({"SLURM_NTASKS": "4"}, False),
    (SALLOC_SHELL, False),
    (SRUN_TASK, True),
    (dict(SRUN_TASK, SLURM_NTASKS="1"), False),
    (OMPI4, True),
    (dict(OMPI4, OMPI_COMM_WORLD_SIZE="1"), False),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, True),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, True),
    # JAX reads TPU_PROCESS_ADDRESSES first when both are set.
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476", "TPU_WORKER_HOSTNAMES": "t0,t1"}, False),
    # A Cloud TPU VM slice publishes its workers in the metadata server only:
    # launch/tpu_pod.sh sets DDPM_JAX_DISTRIBUTED=1.
    ({"DDPM_JAX_DISTRIBUTED": "1"}, True),
    (dict(SRUN_TASK, DDPM_JAX_DISTRIBUTED="0"), False),
    (dict(OMPI5, DDPM_JAX_DISTRIBUTED="0"), False),
]


@pytest.mark.parametrize("env, started", AUTO_CASES)
def test_auto_detection(calls, monkeypatch, env, started):
  set_env(monkeypatch, env)
  assert parallel.initialize_distributed() is started
  # Auto-detection: jax.distributed.initialize() with no arguments.
  assert calls == ([((), {})] if started else [])


@pytest.mark.parametrize("env", [SRUN_TASK, OMPI4, SALLOC_SHELL, OMPI5,
                                 {"SLURM_NTASKS": "4"}])
def test_detection_matches_jax_cluster_detection(calls, monkeypatch, env):
  """SLURM / Open MPI start distributed mode exactly when JAX's own cluster
  detection finds the coordinator (else: 'coordinator_address should be
  defined', or a hang waiting for tasks that never start)."""
  clusters = pytest.importorskip("jax._src.clusters")
  set_env(monkeypatch, env)
  address, count, _, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, None)
  jax_can = address is not None and count is not None and count > 1
  try:
    started = parallel.initialize_distributed()
  except ValueError:
    started = False
  assert started is jax_can


def test_the_deciding_variable_is_logged(calls, monkeypatch, caplog):
  set_env(monkeypatch, SRUN_TASK)
  with caplog.at_level(logging.INFO):
    assert parallel.initialize_distributed()
  assert "SLURM_NTASKS=4" in caplog.text


def test_open_mpi_5_is_a_clear_error(calls, monkeypatch):
  set_env(monkeypatch, OMPI5)
  with pytest.raises(ValueError, match="OMPI_MCA_orte_hnp_uri is unset") as e:
    parallel.initialize_distributed()
  assert "DDPM_JAX_DISTRIBUTED=0" in str(e.value)
  assert not calls


@pytest.mark.parametrize("error", [
    ValueError("coordinator_address should be defined."),
    RuntimeError("DEADLINE_EXCEEDED: Barrier timed out"),
])
def test_initialisation_errors_say_how_to_run_single_process(monkeypatch, calls, error):
  set_env(monkeypatch, SRUN_TASK)

  def fail():
    raise error

  monkeypatch.setattr(parallel.jax.distributed, "initialize", fail)
  with pytest.raises(ValueError) as e:
    parallel.initialize_distributed()
  message = str(e.value)
  assert str(error) in message and "SLURM_NTASKS=4" in message
  assert "DDPM_JAX_DISTRIBUTED=0" in message


def test_bad_switch_is_a_clear_error(calls, monkeypatch):
  monkeypatch.setenv("DDPM_JAX_DISTRIBUTED", "yes")
  with pytest.raises(ValueError, match="DDPM_JAX_DISTRIBUTED='yes' must be 1"):
    parallel.initialize_distributed()
  assert not calls


def test_partial_explicit_arguments_are_an_error(calls, monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="needs all three"):
    parallel.initialize_distributed()
  assert not calls
