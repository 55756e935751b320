"""Improved DDPM's diffusion on CIFAR-10 (Nichol & Dhariwal 2021).

From their CIFAR-10 recipe: cosine noise schedule, hybrid loss (L_simple +
0.001 L_vlb), learned-range variances, T = 4000, lr 1e-4 with neither warm-up
nor gradient clipping, batch 128, dropout 0.3, ch 128 with 3 ResNet blocks per
level, attention at 16x16 and 8x8, EMA 0.9999.

Not theirs: the network is the DDPM U-Net (one attention head, the timestep
embedding added after each ResNet block's first convolution, the raw t in
[0, 4000) embedded), where theirs has 4 heads, scale-shift GroupNorm and t
rescaled to [0, 1000).
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
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0
  config.training.batch_size = 128
  config.training.num_train_steps = 500_000
  return config
