"""DDPM on LSUN Cat 256x256: 113.7M parameters, 1,800,000 steps (Ho et al. 2020).

The 256x256 recipe: ch_mult (1, 1, 2, 2, 4, 4), attention at 16x16, no
dropout, lr 2e-5, batch 64. tfds 'lsun/cat' downloads the LSUN lmdb; an
image folder works too: --config.data.dataset=folder:/path.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "lsun/cat"
  config.data.image_size = 256
  config.data.num_classes = 0
  config.data.random_flip = True

  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0

  config.optim.lr = 2e-5
  config.training.batch_size = 64
  config.training.num_train_steps = 1_800_000
  config.training.num_sample_images = 16
  return config
