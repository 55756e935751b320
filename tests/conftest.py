"""Every test sees 8 fake CPU devices and strict rank promotion; fixtures
shared by several test files."""
import importlib.util
import os
import sys
import types

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


# --------------------------------------------------------------------------
# The peer: torch-fidelity's FID Inception module. The package's __init__
# imports torchvision (which does not import beside the CPU torch here), so
# the module file is imported on its own. Install: `pip install --no-deps
# torch-fidelity==0.4.0`.
# --------------------------------------------------------------------------


def _import_torch_fidelity_inception():
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
  saved = {k: v for k, v in sys.modules.items() if k.startswith("torch_fidelity")}
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules["torch_fidelity"] = package
  try:
    from torch_fidelity import feature_extractor_inceptionv3 as peer_module  # pylint: disable=g-import-not-at-top
  finally:
    # Leave sys.modules as found, so nothing else sees the stub package.
    for k in [k for k in sys.modules if k.startswith("torch_fidelity")]:
      del sys.modules[k]
    sys.modules.update(saved)
  return peer_module


@pytest.fixture(scope="module")
def peer():
  """torch-fidelity's FeatureExtractorInceptionV3 with random weights (float32)."""
  torch = pytest.importorskip("torch")
  peer_module = _import_torch_fidelity_inception()

  class RandomPeer(peer_module.FeatureExtractorInceptionV3):

    def load_state_dict(self, state_dict, *args, **kwargs):
      if state_dict is None:  # The constructor's download, stubbed out below.
        return None
      return super().load_state_dict(state_dict, *args, **kwargs)

  real_download = peer_module.load_state_dict_from_url
  peer_module.load_state_dict_from_url = lambda *a, **k: None
  try:
    net = RandomPeer("inception-v3-compat", ["2048", "logits_unbiased"])
  finally:
    peer_module.load_state_dict_from_url = real_download
  # Random weights scaled so activations stay O(1) through all 94 layers,
  # and batch-norm statistics that are not the identity.
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
        m.bias.copy_(0.1 * torch.randn(n, generator=gen))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
      elif isinstance(m, torch.nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / 2048 ** 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
  return net.eval()
