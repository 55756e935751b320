"""Seeds and the PRNG keys of a batch: one key for every example, or one per example.

A batch of keys is `[B]` typed keys or `[B, 2]` raw uint32 keys. With one key
per example, an example's random numbers do not depend on the batch it was
drawn in (its size, its other members, the device count).
"""
import operator

import jax
import jax.numpy as jnp

# jax.random.PRNGKey keeps only a seed's low 32 bits.
MAX_SEED = 2**32 - 1

_KEY_FORMS = ("a PRNG key: jax.random.key(seed) (typed) or "
              "jax.random.PRNGKey(seed) (raw uint32 [2]), or one per example "
              "([B] typed or [B, 2] raw keys, e.g. from jax.random.split)")


def check_seed(seed: int) -> None:
  """Raises ValueError unless `seed` is an integer in 0..MAX_SEED.

  `jax.random.PRNGKey` keeps only the low 32 bits of a seed (2**32 would
  silently give seed 0's samples) and overflows on seeds of 64 bits or more.
  """
  try:
    ok = 0 <= operator.index(seed) <= MAX_SEED
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"The seed must be an integer in 0..{MAX_SEED} (2**32 - 1), "
                     f"got {seed!r}.")


def is_batched(rng) -> bool:
  """Whether `rng` holds one key per example; refuses anything but keys."""
  dtype = getattr(rng, "dtype", None)
  if dtype is None or not hasattr(rng, "ndim"):
    raise TypeError(f"rng must be {_KEY_FORMS}; got {type(rng).__name__} "
                    f"{rng!r}.")
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if rng.ndim > 1:
      raise ValueError(
          f"rng must be {_KEY_FORMS}; got typed keys of shape {rng.shape}.")
    return rng.ndim == 1
  if dtype != jnp.uint32 or rng.ndim not in (1, 2) or rng.shape[-1] != 2:
    raise TypeError(
        f"rng must be {_KEY_FORMS}; got an array of dtype {dtype} and shape "
        f"{rng.shape}.")
  return rng.ndim == 2


def fold_in(rng, data):
  """`jax.random.fold_in` of one key, or of each key of a batch."""
  if is_batched(rng):
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(rng)
  return jax.random.fold_in(rng, data)


def normal(rng, shape, dtype=jnp.float32):
  """Standard normal `shape`, drawn per example when `rng` is a batch of keys."""
  if is_batched(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(
          f"Got {rng.shape[0]} keys for a batch of {shape[0]} examples.")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(rng)
  return jax.random.normal(rng, shape, dtype)
