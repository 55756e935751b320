r"""Loads official DDPM weights from the diffusers format into ddpm_jax.

The original DDPM models were published in the diffusers format as
``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256``,
``google/ddpm-church-256``, ``google/ddpm-bedroom-256`` and
``google/ddpm-cat-256``: a ``config.json`` and a
``diffusion_pytorch_model.safetensors`` (or ``.bin``) for a ``UNet2DModel``,
and a ``scheduler_config.json``. This module maps them onto the Flax U-Net of
``ddpm_jax.models`` and writes a run directory that sampling, evaluation and
fine-tuning load like any trained run:

  python -m ddpm_jax.convert --diffusers ~/ddpm-cifar10-32 --workdir runs/ddpm-cifar10
  python -m ddpm_jax.convert --diffusers ~/ddpm-church-256 \
      --config configs/lsun_church256.py --workdir runs/ddpm-church

Reading safetensors needs no torch; ``.bin`` files need torch installed.
"""
import json
import math
import os
import shutil
import sys
import warnings
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
BIN_FILE = "diffusion_pytorch_model.bin"
SCHEDULER_FILE = "scheduler_config.json"

# UNet2DModel's defaults (diffusers 0.42), for keys a config.json leaves out:
# a missing key means the default, which is often *not* the DDPM value.
_UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3,
    "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                         "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                       "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None,
}
# DDPMScheduler's defaults, for keys a scheduler_config.json leaves out.
_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None,
    "variance_type": "fixed_small", "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False, "clip_sample": True,
    "clip_sample_range": 1.0, "thresholding": False,
}
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quad",
                   "squaredcos_cap_v2": "cosine"}
_VARIANCE_TYPES = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall",
                   "fixed_large": "fixedlarge", "fixed_large_log": "fixedlarge",
                   "learned": "learned", "learned_range": "learned_range"}
_PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
# Old diffusers attention blocks used these names for to_q/to_k/to_v/to_out.0.
_OLD_ATTN_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value",
                   "to_out.0": "proj_attn"}


class ConversionError(ValueError):
  """The source cannot be converted (missing files, unsupported config, shapes)."""


class ConversionWarning(UserWarning):
  """The converted run samples differently from the source's diffusers pipeline."""


# ----------------------------------------------------------------------------
# Reading the source directory


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ConversionError(f"{path} must hold a JSON object")
  return data


def _model_dir(path: str) -> str:
  """The directory holding the UNet: ``path`` itself or a pipeline's ``unet/``."""
  if not os.path.isdir(path):
    raise ConversionError(f"{path} is not a directory")
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    return path
  if os.path.exists(os.path.join(path, "unet", CONFIG_FILE)):
    return os.path.join(path, "unet")
  raise ConversionError(
      f"{path} has no {CONFIG_FILE} (nor unet/{CONFIG_FILE}): expected a "
      f"diffusers UNet2DModel directory with {CONFIG_FILE} and {SAFETENSORS_FILE}"
      f" (e.g. `hf download google/ddpm-cifar10-32 --local-dir DIR`)")


def _check_is_diffusers(path: str, raw: Mapping[str, Any]) -> None:
  """Refuses a config.json not from diffusers (e.g. a ddpm_jax run's)."""
  if "_class_name" in raw or "block_out_channels" in raw:
    return
  if isinstance(raw.get("model"), dict) and isinstance(raw.get("data"), dict):
    raise ConversionError(
        f"{path} is a ddpm_jax run directory (its {CONFIG_FILE} has 'model' "
        "and 'data' sections), not a diffusers UNet2DModel folder: it needs no "
        "conversion, pass it as --workdir to sample, evaluate or train. "
        "--diffusers takes a folder as `hf download google/ddpm-cifar10-32` "
        f"writes it ({CONFIG_FILE} with _class_name UNet2DModel, "
        f"{SAFETENSORS_FILE})")
  raise ConversionError(
      f"{path} is not a diffusers UNet2DModel folder: its {CONFIG_FILE} has "
      "neither _class_name nor block_out_channels. Pass a folder as `hf "
      "download google/ddpm-cifar10-32` writes it (a UNet2DModel "
      f"{CONFIG_FILE} and {SAFETENSORS_FILE}, or a pipeline with them under "
      "unet/)")


def _scheduler_config(model_dir: str) -> Optional[dict[str, Any]]:
  for candidate in (os.path.join(model_dir, SCHEDULER_FILE),
                    os.path.join(model_dir, os.pardir, "scheduler",
                                 SCHEDULER_FILE)):
    if os.path.exists(candidate):
      return _read_json(candidate)
  return None


def _load_state_dict(model_dir: str) -> dict[str, np.ndarray]:
  """The weights as float32 numpy arrays, keyed by diffusers' parameter names."""
  st_path = os.path.join(model_dir, SAFETENSORS_FILE)
  bin_path = os.path.join(model_dir, BIN_FILE)
  if os.path.exists(st_path):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      tensors = load_file(st_path)
    except Exception as e:  # a truncated download, a bfloat16 file, ...
      raise ConversionError(f"cannot read {st_path}: {e}") from None
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  if os.path.exists(bin_path):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConversionError(
          f"{model_dir} holds only {BIN_FILE}, which needs torch to read; "
          f"install torch, or download {SAFETENSORS_FILE} instead") from None
    try:
      state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"cannot read {bin_path}: {e}") from None
    return {k: v.float().numpy() for k, v in state.items()}
  raise ConversionError(
      f"{model_dir} has neither {SAFETENSORS_FILE} nor {BIN_FILE}")


# ----------------------------------------------------------------------------
# Config translation


def _default_config() -> ml_collections.ConfigDict:
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    return checkpointing.default_config()
  except checkpointing.CheckpointError as e:
    raise ConversionError(
        f"{e} Pass base_config / --config path/to/configs/X.py.") from None


def _require(key: str, value: Any, allowed: Any, why: str = "") -> None:
  if value not in allowed:
    raise ConversionError(
        f"{CONFIG_FILE}: {key}={value!r} cannot be represented by the DDPM "
        f"U-Net (supported: {list(allowed)}){'; ' + why if why else ''}")


def _positive_int(key: str, value: Any, example: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConversionError(
        f"{CONFIG_FILE}: {key}={value!r} must be a positive int (e.g. "
        f"{example})")
  return value


def _number(key: str, value: Any, file: str = CONFIG_FILE) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConversionError(f"{file}: {key}={value!r} must be a number")
  return float(value)


def _list_of(key: str, value: Any, kind: type, example: list[Any]) -> list[Any]:
  """``value`` as a list, if it is a non-empty list of ``kind`` (ints: > 0)."""
  if not isinstance(value, (list, tuple)) or not value or not all(
      isinstance(v, kind) and not isinstance(v, bool)
      and (kind is not int or v > 0) for v in value):
    what = "positive ints" if kind is int else "block type names"
    raise ConversionError(
        f"{CONFIG_FILE}: {key}={value!r} must be a non-empty list of {what}, "
        f"one per resolution (e.g. {json.dumps(example)})")
  return list(value)


def _model_config(raw: Mapping[str, Any]) -> dict[str, Any]:
  """Checks a UNet2DModel config and returns the equivalent ddpm_jax fields."""
  if raw.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise ConversionError(
        f"{CONFIG_FILE}: _class_name={raw['_class_name']!r}; only UNet2DModel "
        "(the pixel-space DDPM network) can be converted")
  cfg = dict(_UNET_DEFAULTS)
  cfg.update(raw)

  _require("center_input_sample", cfg["center_input_sample"], [False])
  _require("time_embedding_type", cfg["time_embedding_type"], ["positional"])
  _require("flip_sin_to_cos", cfg["flip_sin_to_cos"], [False],
           "the DDPM embedding is [sin, cos]")
  _require("freq_shift", cfg["freq_shift"], [1],
           "the DDPM frequencies are exp(-log(10000) i / (half - 1))")
  _require("mid_block_type", cfg["mid_block_type"], ["UNetMidBlock2D"])
  _require("add_attention", cfg["add_attention"], [True])
  _require("mid_block_scale_factor", cfg["mid_block_scale_factor"], [1])
  _require("downsample_padding", cfg["downsample_padding"], [0],
           "DDPM downsamples with TensorFlow SAME padding (bottom/right)")
  _require("downsample_type", cfg["downsample_type"], ["conv"])
  _require("upsample_type", cfg["upsample_type"], ["conv"])
  _require("act_fn", cfg["act_fn"], ["silu", "swish"])
  _require("norm_num_groups", cfg["norm_num_groups"], [32])
  _require("attn_norm_num_groups", cfg["attn_norm_num_groups"], [None, 32])
  if not math.isclose(_number("norm_eps", cfg["norm_eps"]), 1e-6,
                      rel_tol=1e-3):
    _require("norm_eps", cfg["norm_eps"], [1e-6])
  _require("resnet_time_scale_shift", cfg["resnet_time_scale_shift"],
           ["default", "scale_shift"])
  if (cfg["resnet_time_scale_shift"] == "scale_shift"
      and cfg["attn_norm_num_groups"] is None):
    # diffusers then builds the middle block's attention without GroupNorm.
    raise ConversionError(
        f"{CONFIG_FILE}: resnet_time_scale_shift='scale_shift' with "
        "attn_norm_num_groups=None: the middle attention has no GroupNorm, "
        "which the U-Net always has (attn_norm_num_groups=32 is supported)")
  _require("class_embed_type", cfg["class_embed_type"], [None])
  _require("num_class_embeds", cfg["num_class_embeds"], [None],
           "class-conditional diffusers models have no 'no class' id")

  channels = _list_of("block_out_channels", cfg["block_out_channels"], int,
                      [128, 256, 256, 256])
  ch = channels[0]
  if any(c % ch for c in channels):
    raise ConversionError(
        f"{CONFIG_FILE}: block_out_channels={channels} must all be multiples "
        f"of the first ({ch}): the U-Net's widths are ch * ch_mult")
  ch_mult = tuple(c // ch for c in channels)
  time_dim = cfg["time_embedding_dim"]
  _require("time_embedding_dim", time_dim, [None, 4 * ch])

  down = _list_of("down_block_types", cfg["down_block_types"], str,
                  ["DownBlock2D", "AttnDownBlock2D"])
  up = _list_of("up_block_types", cfg["up_block_types"], str,
                ["AttnUpBlock2D", "UpBlock2D"])
  for key, types, known in (("down_block_types", down, _DOWN_TYPES),
                            ("up_block_types", up, _UP_TYPES)):
    for block in types:
      _require(key, block, list(known))
    if len(types) != len(channels):
      raise ConversionError(
          f"{CONFIG_FILE}: {key} has {len(types)} entries but "
          f"block_out_channels has {len(channels)}")
  down_attn = [_DOWN_TYPES[b] for b in down]
  up_attn = [_UP_TYPES[b] for b in reversed(up)]
  if down_attn != up_attn:
    raise ConversionError(
        f"{CONFIG_FILE}: down_block_types={down} and up_block_types={up} put "
        "attention at different resolutions; the DDPM U-Net attends at the "
        "same resolutions on both paths")

  size = cfg["sample_size"]
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise ConversionError(
          f"{CONFIG_FILE}: sample_size={size}: only square images supported")
    size = size[0]
  if not isinstance(size, int) or size < 1:
    raise ConversionError(
        f"{CONFIG_FILE}: sample_size={size!r} must be a positive int")
  attn_resolutions = tuple(size // 2**i for i, a in enumerate(down_attn) if a)

  # diffusers fixes the channels per head; ddpm_jax the number of heads
  # (improved DDPM's form): the two agree when every attention layer has
  # the same number of heads.
  head_dim = cfg["attention_head_dim"]
  num_heads = 1
  if head_dim is not None:
    _positive_int("attention_head_dim", head_dim, 8)
    attn_channels = {channels[i] for i, a in enumerate(down_attn) if a}
    attn_channels.add(channels[-1])  # the middle block
    heads = {c // head_dim for c in attn_channels}
    if any(c % head_dim for c in attn_channels) or len(heads) != 1:
      raise ConversionError(
          f"{CONFIG_FILE}: attention_head_dim={head_dim} over "
          f"{sorted(attn_channels)} channels gives a different number of "
          "heads per resolution; ddpm_jax uses one number of heads "
          "(model.num_heads) for every attention layer")
    num_heads = heads.pop()

  in_ch = _positive_int("in_channels", cfg["in_channels"], 3)
  out_ch = _positive_int("out_channels", cfg["out_channels"], 3)
  if out_ch not in (in_ch, 2 * in_ch):
    raise ConversionError(
        f"{CONFIG_FILE}: out_channels={out_ch} must equal in_channels={in_ch} "
        f"(fixed variance) or 2 * in_channels (learned variance)")
  num_res_blocks = _positive_int("layers_per_block", cfg["layers_per_block"], 2)
  return dict(image_size=size, channels=in_ch, out_channels=out_ch, ch=ch,
              ch_mult=ch_mult, num_res_blocks=num_res_blocks,
              attn_resolutions=attn_resolutions,
              dropout=_number("dropout", cfg["dropout"]), num_heads=num_heads,
              scale_shift_norm=cfg["resnet_time_scale_shift"] == "scale_shift")


def _diffusion_config(raw: Optional[Mapping[str, Any]],
                      learned_variance: bool) -> dict[str, Any]:
  """ddpm_jax diffusion fields from a scheduler config (None: our defaults)."""
  if raw is None:
    d = _default_config().diffusion
    return dict(num_timesteps=d.num_timesteps, beta_schedule=d.beta_schedule,
                beta_start=d.beta_start, beta_end=d.beta_end,
                model_mean_type=d.model_mean_type,
                model_var_type="learned_range" if learned_variance
                else d.model_var_type)
  cfg = dict(_SCHEDULER_DEFAULTS)
  cfg.update(raw)

  def require(key, allowed):
    if cfg[key] not in allowed:
      raise ConversionError(
          f"{SCHEDULER_FILE}: {key}={cfg[key]!r} is not supported (supported: "
          f"{list(allowed)})")

  require("trained_betas", [None])
  require("rescale_betas_zero_snr", [False])
  require("beta_schedule", _BETA_SCHEDULES)
  require("prediction_type", _PREDICTION_TYPES)
  # DDIM/PNDM scheduler configs carry no variance_type: DDPM's default then.
  require("variance_type", _VARIANCE_TYPES)
  var_type = _VARIANCE_TYPES[cfg["variance_type"]]
  if learned_variance != var_type.startswith("learned"):
    raise ConversionError(
        f"{SCHEDULER_FILE}: variance_type={cfg['variance_type']!r} does not "
        f"match the network's {'2C' if learned_variance else 'C'} output "
        "channels")
  # How diffusers' pipelines clip x_0 is a sampling choice, not part of the
  # model: the run still converts, but its samples will differ.
  clipping = {k: cfg[k] for k in ("clip_sample", "clip_sample_range",
                                  "thresholding")
              if cfg[k] != _SCHEDULER_DEFAULTS[k]}
  if clipping:
    warnings.warn(
        f"{SCHEDULER_FILE}: "
        + ", ".join(f"{k}={v!r}" for k, v in clipping.items())
        + ": ddpm_jax's samplers clip the predicted x_0 to [-1, 1] at every "
        "step, so the converted run's samples differ from diffusers' "
        "pipeline (JAX code can pass clip_denoised=False to the samplers)",
        ConversionWarning, stacklevel=2)
  num_timesteps = cfg["num_train_timesteps"]
  if (isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int)
      or num_timesteps < 1):
    raise ConversionError(
        f"{SCHEDULER_FILE}: num_train_timesteps={num_timesteps!r} must be a "
        "positive int, the number of diffusion steps T (e.g. 1000)")
  return dict(num_timesteps=num_timesteps,
              beta_schedule=_BETA_SCHEDULES[cfg["beta_schedule"]],
              beta_start=_number("beta_start", cfg["beta_start"],
                                 SCHEDULER_FILE),
              beta_end=_number("beta_end", cfg["beta_end"], SCHEDULER_FILE),
              model_mean_type=_PREDICTION_TYPES[cfg["prediction_type"]],
              model_var_type=var_type)


def _full_config(model: Mapping[str, Any], diffusion: Mapping[str, Any],
                 base_config: Optional[ml_collections.ConfigDict]
                 ) -> ml_collections.ConfigDict:
  """``base_config`` (or configs/default.py) with the source's model and schedule."""
  if base_config is None:
    config = _default_config()
    if model["image_size"] >= 128:
      # The paper's fine-tuning recipe for the 256x256 models.
      config.optim.lr = 2e-5
      config.training.batch_size = 64
      config.training.num_sample_images = 16
    if model["channels"] == 1:
      # The default data set (CIFAR-10) is RGB; the built-in greyscale one
      # (resized to any image size) lets evaluate and fine-tuning run.
      config.data.dataset = "digits"
      config.data.random_flip = False  # digits are not mirror-symmetric
  else:
    config = ml_collections.ConfigDict(base_config.to_dict())
  from ddpm_jax.data import digits  # pylint: disable=g-import-not-at-top
  if config.data.dataset == "digits" and model["channels"] != digits.CHANNELS:
    # The data set sets the channels; evaluation (bits/dim, FID reference
    # statistics) would refuse the run, and evaluate takes no overrides.
    raise ConversionError(
        "the base config (--config) names the data set 'digits', which is "
        f"greyscale ({digits.CHANNELS} channel), but the model has "
        f"{model['channels']} input channels; pass a --config whose data set "
        f"has {model['channels']}-channel images (e.g. configs/cifar10.py for "
        "RGB)")
  config.data.image_size = model["image_size"]
  config.data.channels = model["channels"]
  config.data.num_classes = 0
  config.model.ch = model["ch"]
  config.model.ch_mult = model["ch_mult"]
  config.model.num_res_blocks = model["num_res_blocks"]
  config.model.attn_resolutions = model["attn_resolutions"]
  config.model.dropout = model["dropout"]
  config.model.num_heads = model["num_heads"]
  config.model.scale_shift_norm = model["scale_shift_norm"]
  config.model.rescale_timesteps = False  # diffusers embeds t as it is
  config.model.resamp_with_conv = True
  config.model.num_classes = 0
  for key, value in diffusion.items():
    config.diffusion[key] = value
  # The base config's loss may not fit the source's variance (create_diffusion
  # refuses both mismatches): improved DDPM's hybrid loss trains a learned one.
  learned = diffusion["model_var_type"].startswith("learned")
  if learned and config.diffusion.loss_type == "mse":
    config.diffusion.loss_type = "hybrid"
  elif not learned and config.diffusion.loss_type == "hybrid":
    config.diffusion.loss_type = "mse"
  return config


# ----------------------------------------------------------------------------
# Weight mapping


def _source_key(path: tuple[str, ...], num_levels: int) -> str:
  """The diffusers parameter name (without .weight/.bias) of a Flax module path."""
  top, rest = path[0], path[1:]
  fixed = {"conv_in": "conv_in", "time_dense_0": "time_embedding.linear_1",
           "time_dense_1": "time_embedding.linear_2",
           "norm_out": "conv_norm_out", "conv_out": "conv_out",
           "mid_attn": "mid_block.attentions.0",
           "mid_block_0": "mid_block.resnets.0",
           "mid_block_1": "mid_block.resnets.1"}
  if top in fixed:
    prefix = fixed[top]
  else:
    side, level, kind, *index = top.split("_")
    level = int(level)
    block = (f"down_blocks.{level}" if side == "down"
             else f"up_blocks.{num_levels - 1 - level}")
    prefix = {"block": f"{block}.resnets.{index[0] if index else ''}",
              "attn": f"{block}.attentions.{index[0] if index else ''}",
              "downsample": f"{block}.downsamplers.0",
              "upsample": f"{block}.upsamplers.0"}[kind]
  sub = {"norm_0": "norm1", "conv_0": "conv1", "temb_proj": "time_emb_proj",
         "norm_1": "norm2", "conv_1": "conv2", "shortcut": "conv_shortcut",
         "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
         "proj_out": "to_out.0", "conv": "conv"}
  return ".".join([prefix] + [sub[p] for p in rest])


def _convert_leaf(name: str, leaf_name: str, value: np.ndarray,
                  target_shape: tuple[int, ...]) -> np.ndarray:
  """One torch tensor in Flax layout: OIHW -> HWIO, (out, in) -> (in, out)."""
  if leaf_name == "kernel":
    if len(target_shape) == 4:  # Conv
      if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    else:  # Dense; diffusers may store a 1x1 conv (conv_shortcut) or Linear
      if value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
      if value.ndim == 2:
        value = value.T
  if value.shape != tuple(target_shape):
    raise ConversionError(
        f"shape mismatch for {name}: source has {tuple(value.shape)} "
        f"(in Flax layout), the model expects {tuple(target_shape)}")
  return np.ascontiguousarray(value, np.float32)


def convert_state_dict(state: Mapping[str, np.ndarray],
                       config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Maps a diffusers UNet2DModel state dict onto the params of ``config``'s model.

  Args:
    state: parameter name -> float32 numpy array (torch layout).
    config: a ddpm_jax config whose model matches the source.

  Returns:
    The Flax ``params`` pytree (nested dicts of float32 numpy arrays).

  Raises:
    ConversionError: a parameter is missing, left over, or has the wrong shape.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top

  model = models.create_model(config)
  size, c = config.data.image_size, config.data.channels
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)},
                         jnp.zeros((1, size, size, c)),
                         jnp.zeros((1,), jnp.int32)))["params"]
  num_levels = len(config.model.ch_mult)
  used = set()

  def convert(path, target):
    names = tuple(p.key for p in path)
    module, leaf_name = names[:-1], names[-1]
    base = _source_key(module, num_levels)
    suffix = "bias" if leaf_name == "bias" else "weight"
    key = f"{base}.{suffix}"
    if key not in state:
      for new, old in _OLD_ATTN_NAMES.items():
        if base.endswith("." + new):
          old_key = f"{base[:-len(new)]}{old}.{suffix}"
          if old_key in state:
            key = old_key
    if key not in state:
      raise ConversionError(
          f"the source has no parameter {key} (needed for "
          f"{'/'.join(names)}): the weights do not match {CONFIG_FILE}")
    used.add(key)
    return _convert_leaf(key, leaf_name, state[key], target.shape)

  params = jax.tree_util.tree_map_with_path(convert, shapes)
  unused = sorted(set(state) - used)
  if unused:
    raise ConversionError(
        f"the source has {len(unused)} parameter(s) this architecture has no "
        f"place for, e.g. {unused[:5]}")
  return params


def from_diffusers(
    path: str, base_config: Optional[ml_collections.ConfigDict] = None
) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """Reads a diffusers ``UNet2DModel`` directory.

  Args:
    path: a directory with ``config.json`` and
      ``diffusion_pytorch_model.safetensors`` (or ``.bin``, needs torch), or a
      pipeline directory with them under ``unet/``. The schedule comes from
      ``scheduler_config.json`` next to them or ``../scheduler/``; without
      one, the project defaults (T=1000 linear 1e-4..0.02, eps, fixedlarge).
    base_config: the config whose data/training/optim fields the result
      keeps (e.g. configs/lsun_church256.py, to name the dataset for
      evaluation); default configs/default.py (with the 256x256 fine-tuning
      lr and batch size for images of 128 pixels and more, and the built-in
      greyscale ``digits`` data set for a 1-channel model). Its model and
      diffusion fields are replaced by the source's.

  Returns:
    ``(params, config)``: the Flax params (float32 numpy arrays) for
    ``models.create_model(config)``, and a complete ddpm_jax config (the
    base config with the source's image size, channels, architecture and
    schedule).

  Raises:
    ConversionError (a ValueError): missing files, a config this architecture
      cannot represent (naming the key and value), or a parameter that is
      missing, extra or of the wrong shape (naming it).
  """
  config = config_from_diffusers(path, base_config)
  params = convert_state_dict(_load_state_dict(_model_dir(path)), config)
  return params, config


def config_from_diffusers(
    path: str, base_config: Optional[ml_collections.ConfigDict] = None
) -> ml_collections.ConfigDict:
  """The ddpm_jax config of a diffusers directory, without reading weights.

  Same arguments and config errors as ``from_diffusers``.
  """
  model_dir = _model_dir(path)
  raw = _read_json(os.path.join(model_dir, CONFIG_FILE))
  _check_is_diffusers(path, raw)
  model = _model_config(raw)
  scheduler = _scheduler_config(model_dir)
  diffusion = _diffusion_config(scheduler,
                                model["out_channels"] == 2 * model["channels"])
  config = _full_config(model, diffusion, base_config)
  # The ddpm_jax-side validation, as every later tool builds them.
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  try:
    models.create_model(config)
  except ValueError as e:
    raise ConversionError(f"{CONFIG_FILE} gives an invalid model: {e}") from None
  try:
    models.create_diffusion(config)
  except ValueError as e:
    source = SCHEDULER_FILE if scheduler is not None else "the base config"
    raise ConversionError(
        f"{source} gives an invalid diffusion schedule: {e}") from None
  return config


# ----------------------------------------------------------------------------
# Command line


FIXED_VARIANCES = ("fixedlarge", "fixedsmall")


def convert_to_workdir(
    path: str, workdir: str,
    base_config: Optional[ml_collections.ConfigDict] = None,
    variance: Optional[str] = None,
) -> ml_collections.ConfigDict:
  """Converts ``path`` and writes a step-0 run to ``workdir`` atomically.

  The run is written under a temporary sibling directory and renamed into
  place only when complete, so a failure leaves ``workdir`` as it was.

  Args:
    path, base_config: as for ``from_diffusers``.
    workdir: the new run directory.
    variance: None keeps the scheduler's variance; 'fixedlarge' (beta_t, what
      the paper's CIFAR-10 samples and bits/dim used) or 'fixedsmall' (the
      posterior variance) replaces a fixed one.

  Raises:
    ConversionError: a bad source or variance, or ``workdir`` already holds a
      run.
  """
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConversionError(f"--workdir {workdir} exists and is not a directory")
  parent = os.path.dirname(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConversionError(
        f"--workdir {workdir}: its parent {parent} is a file, not a directory; "
        "choose a --workdir under a directory")
  if os.path.isdir(workdir):
    held = [n for n in (checkpointing.CONFIG_FILE, checkpointing.CHECKPOINT_DIR)
            if os.path.exists(os.path.join(workdir, n))]
    if held:
      raise ConversionError(
          f"--workdir {workdir} already holds a run ({', '.join(held)}); "
          "choose a new directory")
  params, config = from_diffusers(path, base_config)
  if variance is not None:
    if variance not in FIXED_VARIANCES:
      raise ConversionError(f"--variance must be one of {FIXED_VARIANCES}; "
                            f"got {variance!r}")
    if config.diffusion.model_var_type not in FIXED_VARIANCES:
      raise ConversionError(
          f"This model predicts its variances "
          f"({config.diffusion.model_var_type}); --variance only replaces a "
          "fixed one: leave it out")
    config.diffusion.model_var_type = variance
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(workdir)}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    checkpointing.save_pretrained(tmp, config, params)
    if os.path.isdir(workdir):  # an existing empty (or unrelated) directory
      for name in os.listdir(tmp):
        os.rename(os.path.join(tmp, name), os.path.join(workdir, name))
      os.rmdir(tmp)
    else:
      os.rename(tmp, workdir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return config


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(1)
  from ddpm_jax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_orbax()
  flags_ = flags.FLAGS
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ConversionWarning)
    config = cli.exit_on_user_error(convert_to_workdir, flags_.diffusers,
                                    flags_.workdir, flags_.config,
                                    flags_.variance)
  for w in caught:  # ours as one line; any other as Python shows it
    if issubclass(w.category, ConversionWarning):
      print(f"warning: {w.message}", file=sys.stderr)
    else:
      warnings.showwarning(w.message, w.category, w.filename, w.lineno)
  m, d = config.model, config.diffusion
  print(f"Wrote {flags_.workdir}: {config.data.image_size}x"
        f"{config.data.image_size}x{config.data.channels}, ch={m.ch} "
        f"ch_mult={m.ch_mult} attn={m.attn_resolutions}; T={d.num_timesteps} "
        f"{d.beta_schedule} betas, {d.model_mean_type}, {d.model_var_type}")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Optional base config file (e.g. "
      "configs/lsun_church256.py) whose data/training fields the run keeps; "
      "default configs/default.py.", lock_config=True)
  flags.DEFINE_string("diffusers", None,
                      "diffusers UNet2DModel directory (config.json + "
                      "diffusion_pytorch_model.safetensors).")
  flags.DEFINE_string("workdir", None, "New run directory to write.")
  flags.DEFINE_enum("variance", None, list(FIXED_VARIANCES),
                    "Replace the scheduler's fixed variance: fixedlarge "
                    "(beta_t, the paper's CIFAR-10 sampling and bits/dim) or "
                    "fixedsmall (the posterior's, what google/ddpm-* "
                    "schedulers say). Default: the scheduler's.")
  flags.mark_flags_as_required(["diffusers", "workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from ddpm_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
