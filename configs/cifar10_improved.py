"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021), their recipe.

Cosine noise schedule, hybrid loss (L_simple + 0.001 L_vlb), learned-range
variances, T = 4000, lr 1e-4 with neither warm-up nor gradient clipping,
batch 128, dropout 0.3, EMA 0.9999; their U-Net: ch 128 with 3 ResNet blocks
per level, attention at 16x16 and 8x8 with 4 heads, the timestep embedding's
scale and shift of each block's second GroupNorm, t embedded as t * 1000 / T
(52,546,438 parameters).
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
  config.model.num_heads = 4
  config.model.scale_shift_norm = True
  config.model.rescale_timesteps = True
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0
  config.training.batch_size = 128
  config.training.num_train_steps = 500_000
  return config
