"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021).

Their CIFAR-10 recipe: cosine noise schedule, hybrid loss (L_simple +
0.001 L_vlb), learned-range variances, lr 1e-4, batch 128, dropout 0.3,
ch 128 with 3 ResNet blocks per level, attention at 16x16 and 8x8,
T = 4000 steps in the paper's CIFAR-10 runs; EMA 0.9999.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.num_timesteps = 4000
  config.diffusion.beta_schedule = "cosine"
  config.diffusion.model_var_type = "learned_range"
  config.diffusion.loss_type = "hybrid"
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.dropout = 0.3
  config.optim.lr = 1e-4
  config.training.batch_size = 128
  config.training.num_train_steps = 500_000
  return config
