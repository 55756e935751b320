"""A noise-aware classifier on digits, for classifier guidance.

The U-Net encoder of configs/digits.py (ch 32, levels 8x8 and 4x4) with a
pooling head, trained with softmax cross-entropy on x_t = q_sample(x_0, t)
for t ~ U{0..T-1} of the same process (T = 1000 linear betas), so it can
guide a model trained with configs/digits.py or configs/digits_cond.py:

  python -m ddpm_jax.train --config configs/digits_classifier.py --workdir CLS

`--config configs/digits_classifier.py:test` is a tiny variant for tests.
"""
from configs import digits


def get_config(arg: str = ""):
  if arg not in ("", "test"):
    raise ValueError(
        f"configs/digits_classifier.py: unknown variant {arg!r}; use '' or 'test'.")
  config = digits.get_config(arg)
  config.model.name = "classifier"
  config.model.num_classes = 10  # outputs; equals data.num_classes
  config.model.dropout = 0.0  # 1500 images, but t-noise already regularises
  config.training.label_dropout = 0.0
  config.training.sample_every_steps = 0  # a classifier draws no samples
  config.training.num_train_steps = 2000
  config.training.checkpoint_every_steps = 1000
  if arg == "test":
    config.training.num_train_steps = 4
    config.training.checkpoint_every_steps = 2
  return config
