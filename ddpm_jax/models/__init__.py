"""Where a config becomes a model: ``create_model`` and ``create_diffusion``."""
import ml_collections

from ddpm_jax.models import unet
from ddpm_jax.models.unet import UNet

MODEL_NAMES = ("unet",)
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")


def output_channels(config: ml_collections.ConfigDict) -> int:
  """C, or 2C when the diffusion learns the variance (mean and variance heads)."""
  var_type = config.diffusion.model_var_type
  if var_type not in VAR_TYPES:
    raise ValueError(
        f"diffusion.model_var_type={var_type!r} is not one of {VAR_TYPES}")
  channels = config.data.channels
  return 2 * channels if var_type in ("learned", "learned_range") else channels


def create_model(config: ml_collections.ConfigDict) -> UNet:
  """Builds the network described by ``config.model`` (validated).

  Reads ``config.model.*``, ``config.data.{image_size, channels}`` and
  ``config.diffusion.model_var_type`` (2C output channels for learned
  variances). Raises ValueError naming the offending key.

  Returns:
    An unbound ``UNet``; call ``module.apply({'params': p}, x, t, y=None,
    train=False, rngs={'dropout': key})``.
  """
  m = config.model
  if m.name not in MODEL_NAMES:
    raise ValueError(f"model.name={m.name!r} is not one of {MODEL_NAMES}")
  if m.dtype not in unet.DTYPES:
    raise ValueError(
        f"model.dtype={m.dtype!r} is not one of {tuple(unet.DTYPES)}")
  out_ch = output_channels(config)
  unet.validate_hparams(
      image_size=config.data.image_size, in_ch=config.data.channels, ch=m.ch,
      out_ch=out_ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
      attn_resolutions=m.attn_resolutions, dropout=m.dropout,
      num_classes=m.num_classes)
  return UNet(
      ch=m.ch, out_ch=out_ch, ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv, num_classes=m.num_classes,
      dtype=unet.DTYPES[m.dtype], remat=m.remat)


def create_diffusion(config: ml_collections.ConfigDict):
  """Builds the ``GaussianDiffusion`` constants described by ``config.diffusion``."""
  # Imported here so the model package does not need the math at import time.
  from ddpm_jax import diffusion, schedules  # pylint: disable=g-import-not-at-top
  d = config.diffusion
  betas = schedules.get_beta_schedule(
      d.beta_schedule, d.num_timesteps, beta_start=d.beta_start,
      beta_end=d.beta_end)
  return diffusion.GaussianDiffusion.create(
      betas, model_mean_type=d.model_mean_type,
      model_var_type=d.model_var_type, loss_type=d.loss_type)


__all__ = ["UNet", "create_model", "create_diffusion", "output_channels"]
