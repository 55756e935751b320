"""DDPM on CelebA-HQ 256x256: 113.7M parameters, 0.5M steps (Ho et al. 2020).

tfds 'celeb_a_hq/256' needs a manual download (see the tfds catalog).
"""
from configs import ddpm256


def get_config():
  return ddpm256.get_config("celeb_a_hq/256", 500_000)
