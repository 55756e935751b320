"""Timing, statistics, memory and machine description shared by the benchmarks."""
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp


def load_config(spec: str):
  """`path/to/config.py[:arg]` -> the file's `get_config(arg)` ConfigDict."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config {spec}: no such file {path!r} (e.g. configs/cifar10.py).")
  mod_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def timed(fn: Callable[[], Any]) -> float:
  """Seconds of wall time of `fn()`; `fn` must block until its work is done."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def timed_wall_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process, all threads) of `fn()`.

  On a shared machine wall time includes the time other processes held the
  cores; with one compute thread per side the CPU time does not, so it is the
  steadier measure there. With several threads it also counts spin-waiting.
  """
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def summary(values: Sequence[float]) -> dict:
  """min / median / max of a list of repeats."""
  values = list(values)
  return dict(min=min(values), median=statistics.median(values), max=max(values), n=len(values))


def fmt(s: dict, digits: int = 3) -> str:
  return (f"{s['median']:.{digits}g} (min {s['min']:.{digits}g}, "
          f"max {s['max']:.{digits}g}, n={s['n']})")


def matmul_peak_gflops(dtype=jnp.float32, size: Optional[int] = None,
                       repeats: int = 5) -> float:
  """Best GFLOP/s of a large square `jnp.dot` on device 0, a practical peak.

  2048^2 on a CPU (a fraction of a second per product on a few cores);
  8192^2 on an accelerator, big enough to saturate it.
  """
  device = jax.devices()[0]
  if size is None:
    size = 2048 if device.platform == "cpu" else 8192
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
  b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
  dot(a, b).block_until_ready()
  best = min(timed(lambda: dot(a, b).block_until_ready()) for _ in range(repeats))
  return 2.0 * size**3 / best / 1e9


def cost_flops(program) -> Optional[float]:
  """FLOPs of one call of a lowered or compiled XLA program (cost analysis)."""
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def program_memory_bytes(compiled) -> Optional[int]:
  """Arguments + outputs + temporaries of a compiled program (XLA's estimate)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def peak_memory() -> dict:
  """Peak memory: the device allocator's where it reports one, else the process RSS.

  Returns dict(bytes=..., source='device 0 peak_bytes_in_use' or 'process peak
  RSS (getrusage)'); the RSS includes everything in this process (e.g. torch).
  """
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return dict(bytes=int(stats["peak_bytes_in_use"]),
                source=f"{jax.devices()[0].platform} device 0 peak_bytes_in_use")
  # ru_maxrss is in KiB on Linux.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return dict(bytes=int(rss), source="process peak RSS (getrusage)")


def _version(name: str) -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(name)
  except Exception:  # pylint: disable=broad-except
    return "not installed"


def machine_info() -> dict:
  """CPU model, core count, RAM, load average, devices and library versions."""
  model = platform.processor() or "unknown"
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except (OSError, subprocess.SubprocessError):
    pass
  ram = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          ram = int(line.split()[1]) * 1024
  except OSError:
    pass
  return dict(
      cpu=model, cores=os.cpu_count(),
      ram_gib=round(ram / 2**30, 1) if ram else None,
      load_average=[round(x, 2) for x in os.getloadavg()],
      devices=f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
      cpu_affinity=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      versions={n: _version(n) for n in ("jax", "jaxlib", "flax", "torch", "diffusers")},
  )


def write_json(path: str, data: dict) -> None:
  """Writes `data` to `path` atomically (`ddpm_jax.files.atomic_write`: 0666 less the umask)."""
  from ddpm_jax import files  # pylint: disable=g-import-not-at-top
  with files.atomic_write(path, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)


def _check_creatable(path: str, flag: str) -> None:
  """Raises ValueError unless the nearest existing ancestor of `path` is a writable directory."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{flag} {path}: cannot be created, {parent} is not a directory.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {path}: cannot be created, {parent} is not writable.")


def check_output_file(path: str, flag: str = "--json") -> None:
  """Raises ValueError if `path` cannot be written (checked before a long run)."""
  if os.path.isdir(path):
    raise ValueError(f"{flag} {path}: is a directory; give a file name.")
  if os.path.exists(path):
    if not os.path.isfile(path):
      raise ValueError(f"{flag} {path}: exists and is not a regular file.")
  _check_creatable(path, flag)  # atomic_write writes beside it, then renames


def check_output_dir(path: str, flag: str = "--profile") -> None:
  """Raises ValueError if directory `path` cannot be created or written."""
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"{flag} {path}: exists and is not a directory.")
    if not os.access(path, os.W_OK | os.X_OK):
      raise ValueError(f"{flag} {path}: is not writable.")
  else:
    _check_creatable(path, flag)
