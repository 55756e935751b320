"""When `parallel.initialize_distributed` starts `jax.distributed` (without
starting it: `jax.distributed.initialize` is replaced by a recorder). The
real two-process run is `test_train_cli.test_two_processes_match_single_process`.
"""
import pytest

from ddpm_jax import parallel

CLUSTER_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "DDPM_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID")


@pytest.fixture
def calls(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  recorded = []
  monkeypatch.setattr(parallel.jax.distributed, "initialize",
                      lambda *args, **kwargs: recorded.append((args, kwargs)))
  return recorded


@pytest.mark.parametrize("env, started", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, True),
    # A Cloud TPU VM slice publishes its workers in the metadata server only:
    # launch/tpu_pod.sh sets DDPM_JAX_DISTRIBUTED=1.
    ({"DDPM_JAX_DISTRIBUTED": "1"}, True),
    ({"DDPM_JAX_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}, False),
])
def test_auto_detection(calls, monkeypatch, env, started):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert parallel.initialize_distributed() is started
  # Auto-detection: jax.distributed.initialize() with no arguments.
  assert calls == ([((), {})] if started else [])


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
