"""Inception features of uint8 images: the FID preprocessing, batched and sharded.

The preprocessing is pytorch-fid's, whose weights we load: uint8 / 255 ->
bilinear resize to 299x299 exactly as `torch.nn.functional.interpolate(...,
mode='bilinear', align_corners=False)` (no antialiasing, also when shrinking)
-> `2x - 1`. Greyscale images are repeated to three channels first.

(torch-fidelity instead resizes with a re-implementation of TensorFlow 1.x's
resize and scales by `(x - 128) / 128`; FIDs computed the two ways differ in
the second decimal. We follow pytorch-fid because the weights file is its.)
"""
import math
from typing import Any, Iterable, Iterator, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from ddpm_jax.metrics import inception as inception_lib

ImagesLike = Union[np.ndarray, Iterable[np.ndarray]]


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Row-stochastic `[out_size, in_size]` float32 matrix of torch's bilinear resize.

  Output pixel o samples the input at `(o + 0.5) * in/out - 0.5` (half-pixel
  centres, `align_corners=False`), clamped at 0 below as torch does, and
  mixes the two neighbouring pixels linearly (the upper one clamped to the
  last pixel). Resizing an image is `R_h @ X @ R_w^T` per channel.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be >= 1, got in={in_size}, out={out_size}.")
  # torch's float32 arithmetic, reproduced exactly: a float32 scale, the
  # source coordinate from one fused multiply-add rounded once to float32.
  # (Exact float64 coordinates differ from torch's by up to 3e-5 for inputs
  # near 300 pixels, where float32 resolves only 3e-5.)
  f32 = np.float32
  scale = np.float64(f32(in_size / out_size))
  src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(f32)
  src = np.maximum(src, f32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(f32)
  mat = np.zeros((out_size, in_size), f32)
  rows = np.arange(out_size)
  np.add.at(mat, (rows, lo), f32(1.0) - frac)
  np.add.at(mat, (rows, hi), frac)
  return mat


def preprocess(images_uint8: jax.Array, size: int = inception_lib.INPUT_SIZE) -> jax.Array:
  """uint8 `[B, H, W, C]` (C = 1 or 3) -> float32 `[B, size, size, 3]` in [-1, 1]."""
  x = images_uint8.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  rh = jnp.asarray(bilinear_resize_matrix(x.shape[1], size))
  rw = jnp.asarray(bilinear_resize_matrix(x.shape[2], size))
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", rh, x, precision=hi)
  x = jnp.einsum("pw,bowc->bopc", rw, x, precision=hi)
  return 2.0 * x - 1.0


def _forward(module: nn.Module, params: Any, images_uint8: jax.Array) -> dict:
  return module.apply({"params": params}, preprocess(images_uint8))


# One compiled program per (module, input shape); the module is a frozen
# dataclass, hashable, so it can be a static argument.
_forward_jit = jax.jit(_forward, static_argnums=0)


def _check_images(images: np.ndarray) -> None:
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
    raise TypeError(
        "Inception features need uint8 images in [0, 255] (the FID protocol: "
        "clip to [-1, 1], then round((x + 1) * 127.5)); got "
        f"{getattr(images, 'dtype', type(images).__name__)}.")
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"Images must be [N, H, W, C] with C = 1 or 3, got shape {images.shape}.")


def _rebatch(chunks: Iterable[np.ndarray], batch_size: int) -> Iterator[tuple]:
  """Yields (batch [batch_size, ...], num_real) from chunks of any size."""
  pending, count = [], 0
  shape = None
  for chunk in chunks:
    chunk = np.asarray(chunk) if not isinstance(chunk, np.ndarray) else chunk
    _check_images(chunk)
    if shape is None:
      shape = chunk.shape[1:]
    elif chunk.shape[1:] != shape:
      raise ValueError(f"All images must have one shape: {chunk.shape[1:]} != {shape}.")
    pending.append(chunk)
    count += len(chunk)
    while count >= batch_size:
      flat = np.concatenate(pending) if len(pending) > 1 else pending[0]
      yield flat[:batch_size], batch_size
      rest = flat[batch_size:]
      pending, count = ([rest], len(rest)) if len(rest) else ([], 0)
  if count:
    flat = np.concatenate(pending) if len(pending) > 1 else pending[0]
    pad = np.zeros((batch_size - count,) + flat.shape[1:], np.uint8)
    yield np.concatenate([flat, pad]), count


def inception_features(
    module: nn.Module,
    params: Any,
    images: ImagesLike,
    *,
    batch_size: int = 200,
    progress: bool = False,
    total: Optional[int] = None,
) -> dict:
  """FID Inception features of uint8 images, on this host's devices.

  Args:
    module, params: from `load_inception`.
    images: uint8 `[N, H, W, C]` (C = 1 or 3, values 0..255), or an iterable
      of such arrays of any lengths (e.g. sample batches as they are made).
    batch_size: images per compiled call; rounded up to a multiple of the
      local device count, over which each batch is sharded (params are
      replicated). The last batch is zero-padded and the padding dropped.
    progress: show a tqdm progress bar over images.
    total: for an iterable, how many images it holds: the bar's total, for
      its ETA (an array's is its length).

  Returns:
    {'pool3': float32 `[N, 2048]`, 'logits': float32 `[N, 1008]`} as numpy
    arrays in input order ('logits' without the classifier bias, see
    `inception.InceptionV3`). In a multi-host run each host gets the
    features of its own images; gathering them is the caller's job.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if isinstance(images, np.ndarray):
    _check_images(images)
    total = len(images)
    images = [images]
  devices = jax.local_devices()
  batch_size = math.ceil(batch_size / len(devices)) * len(devices)
  mesh = Mesh(np.array(devices), ("batch",))
  data_sharding = NamedSharding(mesh, P("batch"))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  outputs = {"pool3": [], "logits": []}

  def fetch(pending):
    out, n = pending
    for k in outputs:
      outputs[k].append(np.asarray(out[k])[:n])
    bar.update(n)

  pending = None
  with tqdm(total=total, disable=not progress, unit="img", desc="Inception") as bar:
    for batch, n in _rebatch(images, batch_size):
      out = _forward_jit(module, params, jax.device_put(batch, data_sharding))
      # Fetch the previous batch only now, so the host prepares and sends
      # batch i + 1 while the devices still compute batch i.
      if pending is not None:
        fetch(pending)
      pending = (out, n)
    if pending is not None:
      fetch(pending)
  if not outputs["pool3"]:
    raise ValueError("No images were given.")
  return {k: np.concatenate(v).astype(np.float32) for k, v in outputs.items()}
