"""DDPM on CIFAR-10 32x32: 35.7M parameters, L_simple, 800k steps (Ho et al. 2020)."""
from configs import default


def get_config():
  return default.get_config()
