"""Cascaded super-resolution on CIFAR-10: 16x16 -> 32x32 (Ho et al. 2021).

The DDPM CIFAR-10 U-Net and recipe (configs/default.py) conditioned on the
16x16 area average of each image, nearest-upsampled and concatenated to the
input, with noise-conditioning augmentation s ~ U{0..0.2 T} of the low-res
input during training. The first stage is a 16x16 model (e.g. configs/cifar10.py
with --config.data.image_size=16 --config.model.ch_mult='(1,2,2)'); sample both
stages with `python -m ddpm_jax.sample --workdir BASE --upsampler_workdir SR`:

  python -m ddpm_jax.train --config configs/cifar10_sr.py --workdir SR
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.low_res_size = 16
  config.model.noise_aug_max = 0.2
  # The periodic grid needs low-res inputs; sample with ddpm_jax.sample.
  config.training.sample_every_steps = 0
  return config
