"""DDPM on LSUN Cat 256x256: 113.7M parameters, 1.8M steps (Ho et al. 2020).

tfds 'lsun/cat' downloads the LSUN lmdb. Random flips on, as the paper says
for every data set but LSUN Bedroom; the official run_lsun.py's usage line
trains Cat with --randflip 0 instead (--config.data.random_flip=False).
"""
from configs import ddpm256


def get_config():
  return ddpm256.get_config("lsun/cat", 1_800_000)
