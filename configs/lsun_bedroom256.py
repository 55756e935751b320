"""DDPM on LSUN Bedroom 256x256: 113.7M parameters, 2.4M steps (Ho et al. 2020).

tfds 'lsun/bedroom' downloads the LSUN lmdb. The paper used random flips on
every data set except LSUN Bedroom.
"""
from configs import ddpm256


def get_config():
  config = ddpm256.get_config("lsun/bedroom", 2_400_000)
  config.data.random_flip = False
  return config
