"""Device mesh, shardings and multi-host start-up.

One `Mesh` with a single 'data' axis spans every device of every host. The
batch is sharded on its leading axis over 'data'; parameters are replicated
(or, with `training.shard_params`, split FSDP-style over 'data' on their
largest divisible axis). `jax.jit` with these shardings inserts the gradient
all-reduce, so the train step is written as if for one device.
"""
import os
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Leaves smaller than this stay replicated under `shard_params`: splitting
# biases and norms saves no memory and costs a gather each.
_MIN_SHARD_SIZE = 2**14


def configure_jax() -> None:
  """Process-wide JAX settings every entry point needs.

  `jax_threefry_partitionable` makes sharded random numbers independent of
  the device count, so 1 device and 8 devices draw the same noise.
  """
  jax.config.update("jax_threefry_partitionable", True)


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name}={value!r} is not an integer.") from None


# Set to 1 by launchers that know they start one process per host of a job
# JAX auto-detects (launch/tpu_pod.sh: a Cloud TPU VM slice publishes its
# workers through the metadata server, not the environment).
DISTRIBUTED_ENV_VAR = "DDPM_JAX_DISTRIBUTED"

# The variables jax/_src/clusters/*.py `is_env_present` require; without all
# of them `jax.distributed.initialize()` finds no coordinator and fails.
# SLURM: set in every task of an `srun` step, not in an `salloc`/`sbatch`
# shell (which has SLURM_NTASKS but no SLURM_STEP_NODELIST/SLURM_PROCID).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
# Open MPI: `mpirun` of Open MPI 4 or older sets OMPI_MCA_orte_hnp_uri; Open
# MPI 5 (PRRTE) does not, and JAX cannot find the coordinator then.
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"


def _hosts(name: str) -> int:
  return len([h for h in os.environ.get(name, "").split(",") if h])


def _distributed_trigger() -> Optional[str]:
  """Why this is one process of several that `jax.distributed` can join, or None.

  Detects what `jax.distributed.initialize()` auto-detects (its cluster
  classes, in its order) and only when the job has more than one process:
  a single-host run must not call it (it would wait for a coordinator).
  `DDPM_JAX_DISTRIBUTED=1` says so explicitly (0: never). GKE TPU workers
  are recognised by TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES; a TPU VM
  slice, Kubernetes or mpi4py need `DDPM_JAX_DISTRIBUTED=1`.

  Raises:
    ValueError: a bad DDPM_JAX_DISTRIBUTED, or several Open MPI processes
      whose coordinator JAX cannot find (Open MPI 5).
  """
  forced = os.environ.get(DISTRIBUTED_ENV_VAR, "")
  if forced not in ("", "0", "1"):
    raise ValueError(f"Environment variable {DISTRIBUTED_ENV_VAR}={forced!r} must be 1 "
                     "(call jax.distributed.initialize() with auto-detection) or 0.")
  if forced:
    return f"{DISTRIBUTED_ENV_VAR}=1" if forced == "1" else None
  ompi_size = _env_int("OMPI_COMM_WORLD_SIZE") or 1
  if _OMPI_URI in os.environ and ompi_size > 1:
    return f"Open MPI: OMPI_COMM_WORLD_SIZE={ompi_size} with {_OMPI_URI}"
  slurm_tasks = _env_int("SLURM_NTASKS") or 1
  if all(v in os.environ for v in _SLURM_VARS) and slurm_tasks > 1:
    return f"SLURM: SLURM_NTASKS={slurm_tasks} in an srun step"
  for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if name in os.environ:  # JAX reads the first one set.
      if _hosts(name) > 1:
        return f"GKE TPU: {name} lists {_hosts(name)} hosts"
      break
  if ompi_size > 1:
    raise ValueError(
        f"Open MPI started {ompi_size} processes (OMPI_COMM_WORLD_SIZE), but "
        f"{_OMPI_URI} is unset (Open MPI 5): jax.distributed cannot find the "
        "coordinator. Give each process JAX_COORDINATOR_ADDRESS=HOST:PORT, "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID (from OMPI_COMM_WORLD_RANK), or set "
        f"{DISTRIBUTED_ENV_VAR}=0 to run each as a single process.")
  if slurm_tasks > 1:
    logging.info("SLURM_NTASKS=%d outside an srun step: running as a single process "
                 "(start the tasks with srun to train on all of them).", slurm_tasks)
  return None


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> bool:
  """Starts `jax.distributed` when this is one process of several.

  Explicit arguments win over the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Given either
  way, this is the CPU-process path (gloo collectives, e.g. `launch/local.sh`).
  Otherwise, in an `srun` step of several SLURM tasks, under `mpirun -n N`
  of Open MPI 4 or older, on GKE TPU workers (TPU_WORKER_HOSTNAMES), or with
  DDPM_JAX_DISTRIBUTED=1 (set by `launch/tpu_pod.sh`),
  `jax.distributed.initialize()` auto-detects everything; one log line names
  the variable that decided it. A plain single-process run does nothing.

  Must be called before any other JAX call touches the devices.

  Returns:
    True if `jax.distributed` was initialised.

  Raises:
    ValueError: inconsistent settings, or auto-detected initialisation
      failed (the message says to set DDPM_JAX_DISTRIBUTED=0 to run as a
      single process).
  """
  configure_jax()
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
          "Multi-process launch needs all three of coordinator address, number of "
          "processes and process id (flags --coordinator_address/--num_processes/"
          "--process_id or env JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
          f"JAX_PROCESS_ID); got {coordinator_address!r}, {num_processes!r}, "
          f"{process_id!r}.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
          f"Need num_processes >= 1 and 0 <= process_id < num_processes; got "
          f"num_processes={num_processes}, process_id={process_id}.")
    if num_processes == 1:
      return False
    # CPU devices need an explicit cross-process collectives backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True
  trigger = _distributed_trigger()
  if trigger is None:
    return False
  logging.info("Multi-process run (%s): calling jax.distributed.initialize().", trigger)
  try:
    jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:
    raise ValueError(
        f"jax.distributed.initialize() failed: {e} (distributed mode was started by "
        f"{trigger}; set {DISTRIBUTED_ENV_VAR}=0 to run as a single process).") from e
  return True


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all global devices (every host) with axis 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Shards axis `leading_axes` (the batch axis) over 'data'.

  leading_axes=1 is for a batch stacked [K, B, ...] for `steps_per_call` > 1.
  """
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def _fsdp_spec(shape, num_shards: int) -> P:
  """Shard the largest axis divisible by the device count; else replicate."""
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < _MIN_SHARD_SIZE:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for axis in order:
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, shard_params: bool = False) -> Any:
  """NamedShardings for every leaf of a (possibly abstract) train state.

  Args:
    abstract_state: pytree of arrays or `jax.ShapeDtypeStruct`s.
    mesh: from `create_mesh`.
    shard_params: FSDP-style: each large leaf (params, EMA, Adam moments)
      is split on its largest axis divisible by the device count.
  """
  num_shards = mesh.shape[DATA_AXIS]

  def leaf_sharding(x):
    if shard_params:
      return NamedSharding(mesh, _fsdp_spec(x.shape, num_shards))
    return replicated(mesh)

  return jax.tree.map(leaf_sharding, abstract_state)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises a clear error unless the global batch splits evenly."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch_size <= 0 or global_batch_size % n_dev:
    raise ValueError(
        f"training.batch_size={global_batch_size} must be a positive multiple of the "
        f"number of devices ({n_dev} over {n_proc} process(es)); e.g. "
        f"--config.training.batch_size={max(1, global_batch_size // n_dev) * n_dev or n_dev}.")


def global_batch(local_batch: Any, sharding: NamedSharding, global_batch_size: int,
                 batch_axis: int = 0) -> Any:
  """Assembles per-host numpy batches into global `jax.Array`s.

  Args:
    local_batch: pytree of numpy arrays; the batch axis `batch_axis` holds
      this host's `global_batch_size // process_count` examples.
    sharding: e.g. `batch_sharding(mesh)`.
    global_batch_size: examples over all hosts.
    batch_axis: position of the batch axis (1 for stacked [K, B, ...]).
  """
  def make(x):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[batch_axis] = global_batch_size
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

  return jax.tree.map(make, local_batch)
