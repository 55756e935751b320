"""The built-in default: scikit-learn's 8x8 handwritten digits on a laptop CPU.

A small U-Net (ch 32, two levels 8x8 and 4x4, attention at 4x4) with the DDPM
recipe otherwise (T = 1000 linear betas, eps prediction, fixed-large variance,
L_simple), batch 64, 2000 steps: minutes on 2 CPU cores (the README's "What
the built-in digits run gives" has the measured time, speed and bits/dim).

`--config configs/digits.py:test` is a tiny variant for tests (seconds).
"""
from configs import default


def get_config(arg: str = ""):
  config = default.get_config()

  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.random_flip = False  # digits are not mirror-symmetric

  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.1
  config.model.num_classes = 0  # unconditional, as in the paper

  config.training.batch_size = 64
  config.training.num_train_steps = 2000
  config.training.log_every_steps = 100
  config.training.checkpoint_every_steps = 1000
  # One grid at the end: 1000 sampling steps cost about as much as 500 train steps.
  config.training.sample_every_steps = 2000
  config.training.num_sample_images = 100

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 200
  config.optim.ema_decay = 0.999
  config.optim.ema_warmup = True

  if arg == "test":
    config.model.num_res_blocks = 1
    config.diffusion.num_timesteps = 100
    config.training.batch_size = 16
    config.training.num_train_steps = 4
    config.training.log_every_steps = 2
    config.training.checkpoint_every_steps = 2
    config.training.sample_every_steps = 0
    config.training.num_sample_images = 8
    config.optim.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/digits.py: unknown variant {arg!r}; use '' or 'test'.")
  return config
