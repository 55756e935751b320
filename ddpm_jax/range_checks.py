"""Range checks of integer arrays (timesteps, levels, class ids) where values are known.

Indexing a schedule or an embedding table with an out-of-range value does not
fail in JAX: it clamps, wraps or reads NaN. Concrete inputs are checked; traced
ones (under jit, vmap or grad) cannot be, since their values exist only when
the compiled program runs.
"""
import jax
import numpy as np


def outside(a, low: int, high: int) -> list:
  """Up to 8 values of `a` outside `low..high` (inclusive), as a Python list.

  Args:
    a: an integer array of any shape, concrete or traced.
    low, high: the allowed range, both ends included.

  Returns:
    The first 8 values out of range, in order; [] when there are none or when
    `a` is traced.
  """
  try:
    values = np.asarray(a)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return []
  return values[(values < low) | (values > high)].tolist()[:8]
