"""Every test sees 8 fake CPU devices and strict rank promotion."""
import os

# Must happen before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory):
  """A run directory holding the tiny digits model with random weights (step 0)."""
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from tiny_models import random_params, tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("pretrained_run"))
  config = tiny_config()
  checkpointing.save_pretrained(workdir, config, random_params(config))
  return workdir
