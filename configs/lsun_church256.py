"""DDPM on LSUN Church (outdoor) 256x256: 113.7M parameters, 1.2M steps (Ho et al. 2020).

tfds 'lsun/church_outdoor' downloads the LSUN lmdb.
"""
from configs import ddpm256


def get_config():
  return ddpm256.get_config("lsun/church_outdoor", 1_200_000)
