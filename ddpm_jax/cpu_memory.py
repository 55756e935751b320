"""Process settings that let XLA's CPU runtime reuse its scratch memory.

XLA's CPU runtime allocates each program's scratch memory afresh on every call
and frees it afterwards (996 MB for the CIFAR-10 train step at batch 8). With
the defaults, the block is allocated on a worker thread (JAX dispatches CPU
programs asynchronously), whose glibc arena holds nothing over 64 MB, so
glibc serves it with `mmap` and unmaps it on `free`: every call faults the
whole block back in page by page (~260,000 page faults per CIFAR-10 train
step, 0.5 s of kernel time on a 2-core machine).

`reuse_scratch()` changes that for the process: JAX runs CPU programs on the
calling thread (`jax_cpu_enable_async_dispatch=False`; the work inside a
program is still spread over every core), whose arena is the main heap, and
glibc neither serves large blocks with `mmap` nor trims the heap. The
scratch is then allocated once and reused; the process holds its peak heap,
which a training or sampling run reaches on its first steps anyway. (Limiting
glibc to one arena instead gets the same page faults down but serialises
the threads' allocations: XLA compiled 30-50% slower.) The command-line
entry points call it before JAX starts; a library never changes
process-wide state on import.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

# Set to 0 to keep the defaults.
ENV_VAR = "DDPM_JAX_REUSE_SCRATCH"

# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _accelerator_plugin_installed() -> bool:
  """True when JAX would find a GPU or TPU plugin: then XLA's scratch is device memory."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.util.find_spec("jax_plugins") is not None:
    return True
  return bool(importlib.metadata.entry_points(group="jax_plugins"))


def reuse_scratch() -> str:
  """Applies the settings above where they help; says what it did.

  Applied only on Linux with glibc, when no GPU/TPU JAX plugin is installed
  (or JAX_PLATFORMS starts with 'cpu'), when the user set no `glibc.malloc.*`
  tunable of their own (`GLIBC_TUNABLES`), and unless
  DDPM_JAX_REUSE_SCRATCH=0. Must run before the JAX backend starts.

  Returns:
    'on', or why not: 'off (DDPM_JAX_REUSE_SCRATCH=0)', 'off (not glibc)',
    'off (accelerator plugin)', 'off (GLIBC_TUNABLES sets malloc)', 'off
    (JAX already started)' (JAX reads the dispatch setting once, when its
    backend starts; nothing is changed then).
  Raises:
    ValueError: DDPM_JAX_REUSE_SCRATCH is neither 0 nor 1.
  """
  value = os.environ.get(ENV_VAR, "")
  if value not in ("", "0", "1"):
    raise ValueError(f"Environment variable {ENV_VAR}={value!r} must be 1 (reuse XLA's CPU "
                     "scratch memory, the default) or 0 (keep the defaults).")
  if value == "0":
    return f"off ({ENV_VAR}=0)"
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return "off (not glibc)"
  if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    return "off (GLIBC_TUNABLES sets malloc)"
  cpu_only = os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu"
  if not cpu_only and _accelerator_plugin_installed():
    return "off (accelerator plugin)"
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  # Private, so looked up softly: a JAX without it is simply not checked.
  started = getattr(xla_bridge, "backends_are_initialized", lambda: False)
  if started():
    return "off (JAX already started)"
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  libc = ctypes.CDLL(None)
  # -1: never trim (mallopt(3)).
  for param, setting in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
    if libc.mallopt(param, setting) != 1:
      raise OSError(f"glibc mallopt({param}, {setting}) failed; set {ENV_VAR}=0 to skip it.")
  return "on"
