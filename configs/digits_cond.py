"""Class-conditional DDPM on digits, for classifier-free guidance.

configs/digits.py with a class embedding (model.num_classes = 10, id 10 =
"no class") and label dropout 0.15 (Ho & Salimans 2021 use 0.1-0.2), so one
network models both p(x | y) and p(x); sample with `--class_label L
--guidance_scale w`:

  python -m ddpm_jax.train --config configs/digits_cond.py --workdir COND

`--config configs/digits_cond.py:test` is a tiny variant for tests.
"""
from configs import digits


def get_config(arg: str = ""):
  if arg not in ("", "test"):
    raise ValueError(
        f"configs/digits_cond.py: unknown variant {arg!r}; use '' or 'test'.")
  config = digits.get_config(arg)
  config.model.num_classes = 10
  config.training.label_dropout = 0.15
  return config
