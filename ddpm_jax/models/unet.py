"""The DDPM U-Net (Ho et al. 2020), exactly, in Flax Linen.

With ``ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)``
on 32x32x3 images it has the paper's 35,746,307 parameters; with
``ch_mult=(1, 1, 2, 2, 4, 4)`` on 256x256x3 images, 113,673,219.

Extensions over the paper, all off by default: class conditioning (an
embedding of ``num_classes + 1`` ids added to the timestep embedding, the last
id meaning "no class" for classifier-free guidance), super-resolution
conditioning (``low_res_size > 0``: a low-resolution image, nearest-upsampled
and concatenated to the input channels, plus an embedding of its
noise-augmentation level added to the timestep embedding, as in Ho et al.
2021's cascaded diffusion), improved DDPM's multi-head attention, scale-shift
GroupNorm and rescaled timesteps (Nichol & Dhariwal 2021), a compute ``dtype``
such as bfloat16 with float32 parameters, and rematerialisation of ResNet
blocks. With the extensions off, the parameters are exactly the paper's.
"""
import functools
import numbers
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import range_checks
from ddpm_jax.models import layers

Dtype = Any

# Compute dtypes a config may name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


def _check_class_ids(y: jax.Array, num_classes: int) -> None:
  """Refuses class ids outside 0..num_classes; values only when concrete.

  The embedding lookup would not: id num_classes + 1 reads NaN, and -1 wraps
  to num_classes, "no class".
  """
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"y must hold integer class ids, got dtype {y.dtype}.")
  bad = range_checks.outside(y, 0, num_classes)
  if bad:
    raise ValueError(f"y holds class ids {bad} outside 0.."
                     f"{num_classes} (0..{num_classes - 1}, and {num_classes} "
                     "for no class).")


def validate_hparams(*, image_size: int, in_ch: int, ch: int, out_ch: int,
                     ch_mult: Sequence[int], num_res_blocks: int,
                     attn_resolutions: Sequence[int], dropout: float,
                     num_classes: int, low_res_size: int = 0) -> None:
  """Raises ValueError, naming the key, for a U-Net this code cannot build."""
  def positive_int(value) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and value >= 1)

  if (isinstance(ch_mult, str) or not isinstance(ch_mult, Sequence)
      or not ch_mult or not all(map(positive_int, ch_mult))):
    raise ValueError(
        f"model.ch_mult must be a non-empty sequence of positive ints, e.g. "
        f"(1, 2, 2, 2); got {ch_mult!r}")
  ch_mult = tuple(ch_mult)
  if not positive_int(ch) or ch % layers.NUM_GROUPS:
    raise ValueError(
        f"model.ch={ch} must be a positive multiple of {layers.NUM_GROUPS} "
        f"(GroupNorm uses {layers.NUM_GROUPS} groups), e.g. 64, 128")
  if in_ch < 1 or out_ch < 1:
    raise ValueError(
        f"channels must be positive: data.channels={in_ch}, out_ch={out_ch}")
  if num_res_blocks < 1:
    raise ValueError(f"model.num_res_blocks must be >= 1, got {num_res_blocks}")
  factor = 2 ** (len(ch_mult) - 1)
  if image_size < factor or image_size % factor:
    raise ValueError(
        f"data.image_size={image_size} must be divisible by "
        f"2**(len(model.ch_mult) - 1) = {factor} (model.ch_mult={ch_mult} "
        f"halves the resolution {len(ch_mult) - 1} times)")
  resolutions = [image_size // 2 ** i for i in range(len(ch_mult))]
  bad = [r for r in attn_resolutions if r not in resolutions]
  if bad:
    raise ValueError(
        f"model.attn_resolutions={tuple(attn_resolutions)}: resolution(s) "
        f"{bad} never occur; with data.image_size={image_size} and "
        f"model.ch_mult={ch_mult} the resolutions are {resolutions}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
  if num_classes < 0:
    raise ValueError(
        f"model.num_classes must be >= 0 (0 = unconditional), got "
        f"{num_classes}")
  if low_res_size < 0 or (low_res_size > 0 and (
      low_res_size >= image_size or image_size % low_res_size)):
    raise ValueError(
        f"model.low_res_size={low_res_size} must be 0 (no super-resolution) "
        f"or a proper divisor of data.image_size={image_size}, e.g. "
        f"{image_size // 2}")


class UNet(nn.Module):
  """The DDPM noise-prediction network.

  Attributes:
    ch: base channel count (a multiple of 32).
    out_ch: output channels (C, or 2C when the variance is learned).
    ch_mult: channel multiplier per resolution level; level i runs at
      ``H / 2**i``.
    num_res_blocks: ResNet blocks per level on the down path (one more on the
      up path).
    attn_resolutions: resolutions (feature-map heights) that get attention.
    dropout: dropout rate inside ResNet blocks, active only with train=True.
    resamp_with_conv: stride-2 conv / upsample+conv (True) or avg-pool /
      plain nearest upsampling (False).
    num_classes: 0 for unconditional; N > 0 adds an embedding of N + 1 ids,
      id N meaning "no class".
    low_res_size: 0, or the side of the low-resolution image a
      super-resolution model is conditioned on (divides the image size).
    dtype: compute dtype; parameters are float32, the output float32.
    remat: rematerialise ResNet blocks in the backward pass to save memory.
    conv_algorithm: how stride-1 3x3 convolutions are computed (same
      parameters and function): 'auto', 'direct' or 'winograd'; see
      ``layers.winograd_tile``.
    attention_algorithm: how attention is computed (same parameters and
      function): 'einsum' or 'cudnn'; see ``layers.AttnBlock``.
    num_heads, scale_shift_norm, time_scale: improved DDPM's architecture
      (Nichol & Dhariwal 2021): attention heads (``layers.AttnBlock``), the
      embedding's scale and shift of each block's second GroupNorm
      (``layers.ResnetBlock``), and t embedded as ``t * time_scale``
      (1000 / T). With 1, False and 1.0 the network is DDPM's.
  """
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  num_classes: int = 0
  low_res_size: int = 0
  dtype: Dtype = jnp.float32
  remat: bool = False
  conv_algorithm: str = "auto"
  num_heads: int = 1
  attention_algorithm: str = "einsum"
  scale_shift_norm: bool = False
  time_scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: Optional[jax.Array] = None,
               train: bool = False, *, low_res: Optional[jax.Array] = None,
               aug_t: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the network output (e.g. the noise) for noisy images.

    Args:
      x: float ``[B, H, W, C]`` noisy images, nominally in [-1, 1]; H and W
        divisible by ``2**(len(ch_mult) - 1)``.
      t: ``[B]`` timesteps (0-based; int32, or float for respaced samplers),
        or a scalar applied to the whole batch.
      y: int32 ``[B]`` class ids in ``[0, num_classes]`` (``num_classes`` =
        "no class"), or None (= "no class" for all). Must be None when
        ``num_classes == 0``.
      train: enables dropout (needs ``rngs={'dropout': key}`` in apply).
      low_res: super-resolution models only (required there): float
        ``[B, low_res_size, low_res_size, C]`` in [-1, 1], upsampled by
        nearest neighbour to ``[B, H, W, C]`` and concatenated to x.
      aug_t: super-resolution models only: ``[B]`` (or scalar) noise
        augmentation levels of ``low_res`` (0 = clean; see
        ``ddpm_jax.super_resolution``), embedded like t; None means 0.

    Returns:
      float32 ``[B, H, W, out_ch]``.
    """
    b = x.shape[0]
    t = layers.check_inputs(x, t, self.ch_mult)
    resblock = (nn.remat(layers.ResnetBlock, static_argnums=(3,))
                if self.remat else layers.ResnetBlock)

    # Timestep (and class) embedding, [B, 4ch].
    temb = layers.time_mlp(t, self.ch, self.dtype, self.time_scale)
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((b,), self.num_classes, jnp.int32)
      y = jnp.asarray(y)
      if y.shape != (b,):
        raise ValueError(f"y must have shape [B]=({b},), got {y.shape}")
      _check_class_ids(y, self.num_classes)
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch,
                             dtype=self.dtype, name="class_embed")(y)
    elif y is not None:
      raise ValueError(
          "y (class labels) was given but the model is unconditional "
          "(model.num_classes=0); pass y=None or set model.num_classes")
    if self.low_res_size > 0:
      x, aug_emb = self._low_res_inputs(x, low_res, aug_t)
      temb = temb + aug_emb
    elif low_res is not None or aug_t is not None:
      raise ValueError(
          "low_res/aug_t were given but the model is not a super-resolution "
          "model (model.low_res_size=0)")

    # Down path; hs holds every activation the up path concatenates back.
    conv = functools.partial(layers.Conv3x3, dtype=self.dtype,
                             algorithm=self.conv_algorithm)
    resblock = functools.partial(resblock, conv_algorithm=self.conv_algorithm,
                                 scale_shift=self.scale_shift_norm)
    attn_block = functools.partial(layers.AttnBlock, self.dtype, self.num_heads,
                                   self.attention_algorithm)
    h = conv(self.ch, name="conv_in")(x)
    hs = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = resblock(self.ch * mult, self.dropout, self.dtype,
                     name=f"down_{level}_block_{i}")(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"down_{level}_attn_{i}")(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        h = layers.Downsample(self.resamp_with_conv, self.dtype,
                              name=f"down_{level}_downsample")(h)
        hs.append(h)

    # Middle.
    h = resblock(h.shape[-1], self.dropout, self.dtype,
                 name="mid_block_0")(h, temb, train)
    h = attn_block(name="mid_attn")(h)
    h = resblock(h.shape[-1], self.dropout, self.dtype,
                 name="mid_block_1")(h, temb, train)

    # Up path.
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = resblock(self.ch * self.ch_mult[level], self.dropout, self.dtype,
                     name=f"up_{level}_block_{i}")(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"up_{level}_attn_{i}")(h)
      if level != 0:
        h = layers.Upsample(self.resamp_with_conv, self.dtype,
                            conv_algorithm=self.conv_algorithm,
                            name=f"up_{level}_upsample")(h)
    assert not hs, "every skip connection must be consumed"

    h = nn.swish(layers.group_norm(self.dtype, "norm_out")(h))
    # Zero init: the fresh network predicts exactly 0.
    h = conv(self.out_ch, zero_init=True, name="conv_out")(h)
    return h.astype(jnp.float32)

  def _low_res_inputs(self, x: jax.Array, low_res: Optional[jax.Array],
                      aug_t: Optional[jax.Array]
                      ) -> tuple[jax.Array, jax.Array]:
    """x with the upsampled low_res concatenated, and the aug-level embedding.

    Returns ([B, H, W, 2C] input, [B, 4ch] embedding); raises ValueError for
    a missing or wrongly shaped low_res / aug_t.
    """
    b, height, width, channels = x.shape
    size = self.low_res_size
    expected = (b, size, size, channels)
    if low_res is None:
      raise ValueError(
          f"This super-resolution model (model.low_res_size={size}) needs "
          f"low_res=[B, {size}, {size}, C] images in [-1, 1]")
    if tuple(low_res.shape) != expected:
      raise ValueError(f"low_res must have shape {expected}, got "
                       f"{tuple(low_res.shape)}")
    if height % size or width % size:
      raise ValueError(f"image size {height}x{width} is not a multiple of "
                       f"low_res_size={size}")
    # Nearest upsampling as repeats (cheap, fuses); its area-downsampling is
    # exactly low_res, so the network sees the conditioning unblurred.
    up = jnp.repeat(jnp.repeat(low_res, height // size, axis=1),
                    width // size, axis=2)
    x = jnp.concatenate([x, up.astype(x.dtype)], axis=-1)
    aug_t = jnp.zeros((b,), jnp.int32) if aug_t is None else jnp.asarray(aug_t)
    if aug_t.ndim == 0:
      aug_t = jnp.broadcast_to(aug_t, (b,))
    if aug_t.shape != (b,):
      raise ValueError(f"aug_t must have shape [B]=({b},) or be a scalar, got "
                       f"{aug_t.shape}")
    emb = layers.timestep_embedding(aug_t, self.ch)
    emb = nn.Dense(4 * self.ch, dtype=self.dtype, kernel_init=layers.default_init,
                   name="aug_dense_0")(emb)
    emb = nn.Dense(4 * self.ch, dtype=self.dtype, kernel_init=layers.default_init,
                   name="aug_dense_1")(nn.swish(emb))
    return x, emb
