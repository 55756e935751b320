"""Tile a batch of images into one grid and save it as a PNG."""
import math
from typing import Optional

import numpy as np
from PIL import Image

from ddpm_jax import files


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] by round((x + 1) * 127.5), clipped."""
  x = np.asarray(images, np.float64)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncol: Optional[int] = None, padding: int = 1,
              pad_value: int = 255) -> np.ndarray:
  """Tiles images row-major into one image.

  Args:
    images: float [N, H, W, C] in [-1, 1] (C = 1 or 3).
    ncol: images per row; default ceil(sqrt(N)).
    padding: pixels between and around tiles.
    pad_value: uint8 value of the padding.
  Returns:
    uint8 [rows * (H + p) + p, ncol * (W + p) + p, C].
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
  n, h, w, c = images.shape
  ncol = ncol or max(1, math.ceil(math.sqrt(n)))
  nrow = math.ceil(n / ncol)
  grid = np.full((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c),
                 pad_value, np.uint8)
  tiles = to_uint8(images)
  for i in range(n):
    r, col = divmod(i, ncol)
    y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = tiles[i]
  return grid


def save_image_grid(images: np.ndarray, path: str, ncol: Optional[int] = None,
                    padding: int = 1, upscale: int = 1) -> np.ndarray:
  """Writes `make_grid(images)` to `path` as a PNG (temp file + rename).

  Args:
    images: float [N, H, W, C] in [-1, 1].
    path: destination .png; parent directories are created.
    ncol: images per row.
    padding: pixels between tiles.
    upscale: nearest-neighbour magnification (8x8 digits are tiny).
  Returns:
    the uint8 grid [H', W', C] (before upscaling), e.g. for TensorBoard.
  """
  grid = make_grid(images, ncol=ncol, padding=padding)
  big = np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)
  pil = Image.fromarray(big[..., 0] if big.shape[-1] == 1 else big)
  with files.atomic_write(path) as f:
    pil.save(f, format="PNG")
  return grid
