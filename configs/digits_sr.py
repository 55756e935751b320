"""Cascaded super-resolution on digits: 8x8 -> 16x16 (a test-sized cascade).

The digits resized to 16x16 are the targets; the conditioning is their 8x8
area average, noise-augmented during training to levels s ~ U{0..0.2 T}
(Ho et al. 2021). The base stage is configs/digits.py (8x8); sample both
stages with `python -m ddpm_jax.sample --workdir BASE --upsampler_workdir SR`:

  python -m ddpm_jax.train --config configs/digits_sr.py --workdir SR

`--config configs/digits_sr.py:test` is a tiny variant for tests.
"""
from configs import digits


def get_config(arg: str = ""):
  if arg not in ("", "test"):
    raise ValueError(
        f"configs/digits_sr.py: unknown variant {arg!r}; use '' or 'test'.")
  config = digits.get_config(arg)
  config.data.image_size = 16
  config.model.low_res_size = 8
  config.model.noise_aug_max = 0.2
  config.model.ch_mult = (1, 2)  # 16x16 and 8x8
  config.model.attn_resolutions = (8,)
  # The periodic grid needs low-res inputs; sample with ddpm_jax.sample.
  config.training.sample_every_steps = 0
  return config
