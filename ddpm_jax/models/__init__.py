"""Where a config becomes a model: ``create_model`` and ``create_diffusion``."""
from typing import Union

import jax.numpy as jnp
import ml_collections

from ddpm_jax.models import layers, unet
from ddpm_jax.models.classifier import Classifier
from ddpm_jax.models.unet import UNet

MODEL_NAMES = ("unet", "classifier")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")


def output_channels(config: ml_collections.ConfigDict) -> int:
  """C, or 2C when the diffusion learns the variance (mean and variance heads)."""
  var_type = config.diffusion.model_var_type
  if var_type not in VAR_TYPES:
    raise ValueError(
        f"diffusion.model_var_type={var_type!r} is not one of {VAR_TYPES}")
  channels = config.data.channels
  return 2 * channels if var_type in ("learned", "learned_range") else channels


def low_res_size(config: ml_collections.ConfigDict) -> int:
  """``model.low_res_size`` (0 = not a super-resolution model).

  Read with a default: runs saved before the key existed have no such key.
  """
  return int(config.model.get("low_res_size", 0))


def is_classifier(config: ml_collections.ConfigDict) -> bool:
  """True for a noise-aware classifier run (``model.name == 'classifier'``)."""
  return config.model.name == "classifier"


def create_model(config: ml_collections.ConfigDict
                 ) -> Union[UNet, Classifier]:
  """Builds the network described by ``config.model`` (validated).

  Reads ``config.model.*``, ``config.data.{image_size, channels,
  num_classes}`` and ``config.diffusion.model_var_type`` (2C output channels
  for learned variances). Raises ValueError naming the offending key.

  Returns:
    An unbound module. ``model.name == 'unet'``: a ``UNet``; call
    ``module.apply({'params': p}, x, t, y=None, train=False,
    rngs={'dropout': key})``, adding ``low_res=[B, s, s, C], aug_t=[B]`` when
    ``model.low_res_size = s > 0`` (super-resolution). ``'classifier'``: a
    ``Classifier``; ``module.apply({'params': p}, x_t, t, train=False)``
    returns logits ``[B, model.num_classes]``.
  """
  m = config.model
  if m.name not in MODEL_NAMES:
    raise ValueError(f"model.name={m.name!r} is not one of {MODEL_NAMES}")
  if m.dtype not in unet.DTYPES:
    raise ValueError(
        f"model.dtype={m.dtype!r} is not one of {tuple(unet.DTYPES)}")
  conv_algorithm = m.get("conv_algorithm", "auto")
  if conv_algorithm not in layers.CONV_ALGORITHMS:
    raise ValueError(f"model.conv_algorithm={conv_algorithm!r} is not one of "
                     f"{layers.CONV_ALGORITHMS}")
  if is_classifier(config):
    return _create_classifier(config, conv_algorithm)
  out_ch = output_channels(config)
  unet.validate_hparams(
      image_size=config.data.image_size, in_ch=config.data.channels, ch=m.ch,
      out_ch=out_ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
      attn_resolutions=m.attn_resolutions, dropout=m.dropout,
      num_classes=m.num_classes, low_res_size=low_res_size(config))
  arch = _block_options(config)
  return UNet(
      ch=m.ch, out_ch=out_ch, ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv, num_classes=m.num_classes,
      low_res_size=low_res_size(config), dtype=unet.DTYPES[m.dtype],
      remat=m.remat, conv_algorithm=conv_algorithm, **arch)


def _block_options(config: ml_collections.ConfigDict) -> dict:
  """UNet/Classifier fields from model.{num_heads, attention_algorithm,
  scale_shift_norm, rescale_timesteps}; ch and ch_mult already checked.

  Runs saved before a key existed have none: each is read with its default.
  """
  m = config.model
  heads = m.get("num_heads", 1)
  if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
    raise ValueError(f"model.num_heads must be an int >= 1, got {heads!r}")
  bad = [m.ch * mult for mult in m.ch_mult if (m.ch * mult) % heads]
  if bad:
    raise ValueError(
        f"model.num_heads={heads} does not divide the channel counts {bad} "
        f"(model.ch={m.ch} times model.ch_mult={tuple(m.ch_mult)}); choose a "
        "divisor of every one")
  for key in ("scale_shift_norm", "rescale_timesteps"):
    if not isinstance(m.get(key, False), bool):
      raise ValueError(f"model.{key} must be True or False, got {m.get(key)!r}")
  algorithm = m.get("attention_algorithm", "einsum")
  if algorithm not in layers.ATTENTION_ALGORITHMS:
    raise ValueError(f"model.attention_algorithm={algorithm!r} is not one of "
                     f"{layers.ATTENTION_ALGORITHMS}")
  rescale = m.get("rescale_timesteps", False)
  return dict(num_heads=heads, attention_algorithm=algorithm,
              scale_shift_norm=m.get("scale_shift_norm", False),
              time_scale=1000.0 / config.diffusion.num_timesteps if rescale else 1.0)


def _create_classifier(config: ml_collections.ConfigDict,
                       conv_algorithm: str) -> Classifier:
  m = config.model
  k = m.num_classes
  if not isinstance(k, int) or k < 2:
    raise ValueError(
        f"model.num_classes={k!r}: a classifier needs the number of classes, "
        "an int >= 2 (10 for digits or CIFAR-10)")
  if config.data.num_classes != k:
    raise ValueError(
        f"model.num_classes={k} but the data carries data.num_classes="
        f"{config.data.num_classes} classes: a classifier is trained on the "
        "data's labels, so set both to the same value")
  if low_res_size(config):
    raise ValueError("model.low_res_size must be 0 for a classifier")
  # The U-Net's checks apply to the encoder; out_ch/num_classes are unused.
  unet.validate_hparams(
      image_size=config.data.image_size, in_ch=config.data.channels, ch=m.ch,
      out_ch=k, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
      attn_resolutions=m.attn_resolutions, dropout=m.dropout, num_classes=0)
  arch = _block_options(config)
  return Classifier(
      num_classes=k, ch=m.ch, ch_mult=tuple(m.ch_mult),
      num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
      resamp_with_conv=m.resamp_with_conv, dtype=unet.DTYPES[m.dtype],
      remat=m.remat, conv_algorithm=conv_algorithm, **arch)


def init_kwargs(config: ml_collections.ConfigDict,
                batch_size: int = 1) -> dict:
  """Dummy inputs for ``create_model(config).init({'params': key}, **kw)``.

  Returns:
    dict with ``x`` float32 ``[B, S, S, C]``, ``t`` int32 ``[B]``, and ``y``
    (class-conditional U-Nets) or ``low_res``/``aug_t`` (super-resolution)
    when the model takes them; all zeros.
  """
  size, channels = int(config.data.image_size), int(config.data.channels)
  kw = {"x": jnp.zeros((batch_size, size, size, channels), jnp.float32),
        "t": jnp.zeros((batch_size,), jnp.int32)}
  if is_classifier(config):
    return kw
  if config.model.num_classes > 0:
    kw["y"] = jnp.zeros((batch_size,), jnp.int32)
  lr = low_res_size(config)
  if lr > 0:
    kw["low_res"] = jnp.zeros((batch_size, lr, lr, channels), jnp.float32)
    kw["aug_t"] = jnp.zeros((batch_size,), jnp.int32)
  return kw


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


__all__ = ["Classifier", "UNet", "create_model", "create_diffusion",
           "init_kwargs", "is_classifier", "low_res_size", "output_channels"]
