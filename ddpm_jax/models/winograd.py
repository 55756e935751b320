"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) and F(4x4, 3x3).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016):
each m x m block of outputs is ``A^T [(G g G^T) * (B^T d B)] A`` for the
(m+2) x (m+2) input tile ``d`` around it, so a 3x3 convolution becomes
(m+2)^2 independent matrix products (one per tile position) doing
(m+2)^2 / (9 m^2) of the direct method's multiplications (0.44 for m = 2,
0.25 for m = 4), plus additions before and after. On a CPU, where XLA's direct
3x3 convolutions already run at the matmul peak, this is what makes the DDPM
U-Net faster (``benchmarks/RESULTS.md``); ``layers.Conv3x3`` decides where.

Every transform is a fixed linear combination, written out as additions and
scalings of slices (``_combine``): XLA fuses them into a few loops. (The same
transforms as tiny einsums were 4x slower on a CPU.) The rounding error grows
with m: relative ~1e-6 (m = 2) and ~2e-5 (m = 4) of the output's scale in
float32.
"""
from fractions import Fraction
import numbers

import jax
import jax.numpy as jnp

TILES = (2, 4)

_HALF, _SIXTH = Fraction(1, 2), Fraction(1, 6)
# B^T, G and A^T of F(m x m, 3x3) for the interpolation points 0, +-1 (m = 2)
# and 0, +-1, +-2 (m = 4), plus the point at infinity (Lavin & Gray, sec. 4).
_MATRICES = {
    2: dict(
        bt=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        g=((1, 0, 0), (_HALF, _HALF, _HALF), (_HALF, -_HALF, _HALF),
           (0, 0, 1)),
        at=((1, 1, 1, 0), (0, 1, -1, -1))),
    4: dict(
        bt=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        g=((Fraction(1, 4), 0, 0), (-_SIXTH, -_SIXTH, -_SIXTH),
           (-_SIXTH, _SIXTH, -_SIXTH),
           (Fraction(1, 24), Fraction(1, 12), _SIXTH),
           (Fraction(1, 24), -Fraction(1, 12), _SIXTH), (0, 0, 1)),
        at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
            (0, 1, -1, 8, -8, 1))),
}


def _combine(matrix, parts):
  """``[sum_j matrix[i][j] * parts[j] for i]``, skipping zeros and 1x scalings."""
  out = []
  for row in matrix:
    acc = None
    for coef, part in zip(row, parts):
      if coef == 0:
        continue
      if abs(coef) != 1:
        part = part * float(abs(coef))
      if acc is None:
        acc = part if coef > 0 else -part
      else:
        acc = acc + part if coef > 0 else acc - part
    out.append(acc)
  return out


def _check_tile(tile: int) -> None:
  # Not 4.0 (== 4, but no valid padding width) nor True (== 1).
  if (not isinstance(tile, numbers.Integral) or isinstance(tile, bool)
      or tile not in TILES):
    raise ValueError(f"winograd tile must be one of {TILES}, got {tile!r}")


def transform_kernel(kernel: jax.Array, tile: int) -> jax.Array:
  """``G g G^T`` for every (input, output) channel pair.

  Args:
    kernel: ``[3, 3, C_in, C_out]`` (HWIO).
    tile: m, the output tile side (2 or 4).

  Returns:
    ``[(m+2)^2, C_in, C_out]`` in the kernel's dtype; entry
    ``(m+2) i + j`` is tile position (i, j).
  """
  _check_tile(tile)
  g, a = _MATRICES[tile]["g"], tile + 2
  # Rows, materialised, then columns: 2.5-3x faster than 36 combinations of
  # the 9 taps each (measured at 512 x 256 channels on a CPU).
  rows = jnp.stack(_combine(g, [kernel[0], kernel[1], kernel[2]]))
  out = jnp.stack(_combine(g, [rows[:, 0], rows[:, 1], rows[:, 2]]), axis=1)
  return out.reshape(a * a, *kernel.shape[2:])


def transform_input(x: jax.Array, tile: int) -> jax.Array:
  """``B^T d B`` for every (m+2) x (m+2) tile (stride m) of the padded input.

  Args:
    x: ``[B, H, W, C]`` with H and W multiples of m = tile.
    tile: m (2 or 4).

  Returns:
    ``[(m+2)^2, B * H/m * W/m, C]`` in x's dtype, rows ordered (b, tile row,
    tile column).
  """
  _check_tile(tile)
  m = tile
  b, h, w, c = x.shape
  th, tw = h // m, w // m
  bt = _MATRICES[m]["bt"]
  # One zero row on top and m - 1 below make m (th + 1) rows; in groups of m,
  # tile p's rows are group p and the first two rows of group p + 1: plain
  # slices, no strided gathers. The same along the columns.
  xp = jnp.pad(x, ((0, 0), (1, m - 1), (1, m - 1), (0, 0)))
  xp = xp.reshape(b, th + 1, m, w + m, c)
  parts = [xp[:, :-1, k] for k in range(m)] + [xp[:, 1:, 0], xp[:, 1:, 1]]
  rows = jnp.stack(_combine(bt, parts))  # [m + 2 (i), B, th, W + m, C]
  rows = rows.reshape(m + 2, b, th, tw + 1, m, c)
  parts = ([rows[:, :, :, :-1, k] for k in range(m)]
           + [rows[:, :, :, 1:, 0], rows[:, :, :, 1:, 1]])
  tiles = jnp.stack(_combine(bt, parts), axis=1)  # [i, j, B, th, tw, C]
  return tiles.reshape((m + 2) ** 2, b * th * tw, c)


def transform_output(prod: jax.Array, tile: int, batch: int, height: int,
                     width: int) -> jax.Array:
  """``A^T M A`` for every tile, interleaved back into an image.

  Args:
    prod: ``[(m+2)^2, B * H/m * W/m, D]`` products per tile position.
    tile: m (2 or 4).
    batch, height, width: B, H, W of the output (H, W multiples of m).

  Returns:
    ``[B, H, W, D]``.
  """
  _check_tile(tile)
  m, a = tile, tile + 2
  th, tw = height // m, width // m
  at = _MATRICES[m]["at"]
  prod = prod.reshape(a, a, batch, th, tw, prod.shape[-1])
  # Along i, then along j; the stacking axes put each output pixel in place.
  z = jnp.stack(_combine(at, [prod[i] for i in range(a)]), axis=3)
  y = jnp.stack(_combine(at, [z[j] for j in range(a)]), axis=-2)
  return y.reshape(batch, height, width, -1)  # from [B, th, m, tw, m, D]


def conv3x3(x: jax.Array, kernel: jax.Array, tile: int = 4) -> jax.Array:
  """Stride-1 3x3 cross-correlation with one pixel of zero padding.

  The same function as ``lax.conv_general_dilated(x, kernel, (1, 1),
  ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` (and
  ``flax.linen.Conv`` with ``padding=1``), up to rounding (see the module
  docstring). Differentiable; the gradients are again tile-wise products.

  Args:
    x: ``[B, H, W, C_in]``, any H, W >= 1.
    kernel: ``[3, 3, C_in, C_out]`` of x's dtype.
    tile: m, the output tile side: 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)).

  Returns:
    ``[B, H, W, C_out]`` in x's dtype.
  """
  _check_tile(tile)
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"winograd.conv3x3 takes NHWC x and HWIO kernel, got "
                     f"shapes {x.shape} and {kernel.shape}.")
  if kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"winograd.conv3x3: kernel {kernel.shape} does not fit "
                     f"input {x.shape} (need [3, 3, {x.shape[-1]}, C_out])")
  b, h, w, _ = x.shape
  # Sizes that are not multiples of the tile: extra zero rows/columns change
  # no output inside [h, w] (the convolution pads with zeros there anyway).
  ph, pw = -h % tile, -w % tile
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  prod = jnp.einsum("knc,kcd->knd", transform_input(x, tile),
                    transform_kernel(kernel, tile))
  return transform_output(prod, tile, b, h + ph, w + pw)[:, :h, :w]
