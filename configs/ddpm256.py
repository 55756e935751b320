"""The DDPM 256x256 recipe shared by CelebA-HQ and the LSUN models (Ho et al. 2020).

113,673,219 parameters: ch_mult (1, 1, 2, 2, 4, 4), attention at 16x16, no
dropout, lr 2e-5, batch 64, random flips. Sampling uses the posterior
variance (fixedsmall): the official 256x256 scripts (run_lsun.py,
run_celebahq.py) sample with it, while CIFAR-10 used beta_t (fixedlarge), and
the released 256x256 weights' scheduler configs say fixed_small too. Each data
set's config sets its tfds name and step count; an image folder works too:
--config.data.dataset=folder:/path.
"""
from configs import default


def get_config(dataset: str, num_train_steps: int):
  config = default.get_config()
  config.data.dataset = dataset
  config.data.image_size = 256
  config.data.num_classes = 0
  config.data.random_flip = True

  config.diffusion.model_var_type = "fixedsmall"

  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.0

  config.optim.lr = 2e-5
  config.training.batch_size = 64
  config.training.num_train_steps = num_train_steps
  config.training.num_sample_images = 16
  return config
