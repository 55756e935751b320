"""ddpm_jax.cpu_memory: XLA's CPU scratch memory is reused, not faulted in on every call."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ddpm_jax import cpu_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program whose scratch is one 8192 x 8192 float32 matrix (256 MiB):
# exp(x), multiplied by a vector after. Prints the status, whether JAX
# dispatches asynchronously, then the page faults of one call (the median of
# 7, after four first calls: on a loaded machine a call now and then lands
# in a fresh glibc arena and faults its scratch in once).
_PROGRAM = textwrap.dedent("""
    import resource
    from ddpm_jax import cpu_memory
    print(cpu_memory.reuse_scratch())
    import jax, jax.numpy as jnp
    print(jax.config.values["jax_cpu_enable_async_dispatch"])
    f = jax.jit(lambda x: (jnp.exp(x).T @ jnp.ones((8192,))).sum())
    x = jnp.full((8192, 8192), 1e-3)
    for _ in range(4):  # the heap settles over the first 2-3 calls
      f(x).block_until_ready()
    faults = []
    for _ in range(7):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults)[3])
""")
_SCRATCH_PAGES = 8192 * 8192 * 4 // 4096  # 65,536

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc settings")


def _faults_per_call(**env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}
  env.pop("GLIBC_TUNABLES", None)
  proc = subprocess.run([sys.executable, "-c", _PROGRAM], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=True)
  status, async_dispatch, faults = proc.stdout.split("\n")[:3]
  assert async_dispatch == str(status != "on")
  return status, float(faults)


@glibc_only
def test_scratch_memory_is_reused():
  status, tuned = _faults_per_call()
  assert status == "on"
  default_status, default = _faults_per_call(DDPM_JAX_REUSE_SCRATCH="0")
  assert default_status == "off (DDPM_JAX_REUSE_SCRATCH=0)"
  # glibc's defaults fault the whole 256 MiB scratch in on every call ...
  assert default > 0.9 * _SCRATCH_PAGES
  # ... tuned, it stays mapped.
  assert tuned < 0.02 * _SCRATCH_PAGES


@pytest.mark.parametrize("env, status", [
    ({"DDPM_JAX_REUSE_SCRATCH": "0"}, "off (DDPM_JAX_REUSE_SCRATCH=0)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "off (GLIBC_TUNABLES sets malloc)"),
])
@glibc_only
def test_left_alone_when_asked_or_user_tuned(monkeypatch, env, status):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert cpu_memory.reuse_scratch() == status


@glibc_only
def test_accelerator_plugin_keeps_the_defaults(monkeypatch):
  monkeypatch.delenv("DDPM_JAX_REUSE_SCRATCH", raising=False)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "")
  monkeypatch.setattr(cpu_memory, "_accelerator_plugin_installed", lambda: True)
  assert cpu_memory.reuse_scratch() == "off (accelerator plugin)"


@glibc_only
def test_too_late_once_jax_has_started(monkeypatch):
  """JAX reads the dispatch setting when its backend starts: later, 'on'
  was reported for a setting that did nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("DDPM_JAX_REUSE_SCRATCH", raising=False)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  jax.devices()  # started
  before = jax.config.values["jax_cpu_enable_async_dispatch"]
  assert cpu_memory.reuse_scratch() == "off (JAX already started)"
  assert jax.config.values["jax_cpu_enable_async_dispatch"] == before


def test_bad_setting_is_a_clear_error(monkeypatch):
  monkeypatch.setenv("DDPM_JAX_REUSE_SCRATCH", "yes")
  with pytest.raises(ValueError, match="DDPM_JAX_REUSE_SCRATCH='yes' must be 1"):
    cpu_memory.reuse_scratch()
  proc = subprocess.run([sys.executable, "-m", "ddpm_jax.sample", "--workdir", "unused"],
                        cwd=ROOT, env={**os.environ, "DDPM_JAX_REUSE_SCRATCH": "yes"},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "error: Environment variable DDPM_JAX_REUSE_SCRATCH='yes' must be 1" in proc.stderr
