"""A noise-aware image classifier for classifier guidance, in Flax Linen.

Dhariwal & Nichol (2021) guide a diffusion model with the gradient of
log p(y | x_t, t) from a classifier trained on noised images. This one is the
DDPM U-Net's encoder, the same ResNet/attention blocks (``layers``) and
timestep embedding, down path and middle, followed by a pooling head:
GroupNorm -> swish -> global average pool -> Dense(num_classes). Submodule
names match the U-Net's, so its checkpoints read the same way.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers

Dtype = Any


class Classifier(nn.Module):
  """Logits of p(y | x_t, t) for noisy images x_t.

  Attributes:
    num_classes: K >= 2, the number of classes.
    ch: base channel count (a multiple of 32).
    ch_mult: channel multiplier per resolution level; level i runs at
      ``H / 2**i``.
    num_res_blocks: ResNet blocks per level.
    attn_resolutions: resolutions (feature-map heights) that get attention.
    dropout: dropout rate inside ResNet blocks, active only with train=True.
    resamp_with_conv: stride-2 conv (True) or 2x2 average pool (False).
    dtype: compute dtype; parameters are float32, the logits float32.
    remat: rematerialise ResNet blocks in the backward pass to save memory.
    conv_algorithm, num_heads, attention_algorithm, scale_shift_norm,
      time_scale: as in ``UNet``.
  """
  num_classes: int
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False
  conv_algorithm: str = "auto"
  num_heads: int = 1
  attention_algorithm: str = "einsum"
  scale_shift_norm: bool = False
  time_scale: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, *,
               train: bool = False) -> jax.Array:
    """Classifies noisy images.

    Args:
      x: float ``[B, H, W, C]`` images noised to level t (``q_sample``),
        nominally in [-1, 1]; H, W divisible by ``2**(len(ch_mult) - 1)``.
      t: ``[B]`` timesteps (0-based; int32, or float for respaced samplers),
        or a scalar applied to the whole batch.
      train: enables dropout (needs ``rngs={'dropout': key}`` in apply).
        Keyword-only, so a stray positional class label fails loudly.

    Returns:
      float32 ``[B, num_classes]`` logits.
    """
    t = layers.check_inputs(x, t, self.ch_mult)
    resblock = (nn.remat(layers.ResnetBlock, static_argnums=(3,))
                if self.remat else layers.ResnetBlock)

    temb = layers.time_mlp(t, self.ch, self.dtype, self.time_scale)

    resblock = functools.partial(resblock, conv_algorithm=self.conv_algorithm,
                                 scale_shift=self.scale_shift_norm)
    attn_block = functools.partial(layers.AttnBlock, self.dtype, self.num_heads,
                                   self.attention_algorithm)
    h = layers.Conv3x3(self.ch, self.dtype, algorithm=self.conv_algorithm,
                       name="conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = resblock(self.ch * mult, self.dropout, self.dtype,
                     name=f"down_{level}_block_{i}")(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f"down_{level}_attn_{i}")(h)
      if level != len(self.ch_mult) - 1:
        h = layers.Downsample(self.resamp_with_conv, self.dtype,
                              name=f"down_{level}_downsample")(h)

    h = resblock(h.shape[-1], self.dropout, self.dtype,
                 name="mid_block_0")(h, temb, train)
    h = attn_block(name="mid_attn")(h)
    h = resblock(h.shape[-1], self.dropout, self.dtype,
                 name="mid_block_1")(h, temb, train)

    h = nn.swish(layers.group_norm(self.dtype, "norm_out")(h))
    # Pool in float32: a bfloat16 mean over many positions loses precision.
    h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # [B, C_last]
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=layers.default_init, name="head")(h)
    return logits.astype(jnp.float32)
