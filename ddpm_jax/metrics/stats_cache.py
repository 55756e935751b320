"""Reference statistics (of a training set) computed once and cached as `.npz`.

A cache file `<cache_dir>/<name>.npz` holds `mu` float64 `[D]`, `sigma`
float64 `[D, D]`, `num_examples`, `fingerprint` and, when asked for (KID
needs them), `features` float32 `[N, D]`. The `mu`/`sigma` keys are
pytorch-fid's, so its `--save-stats` files load with `load_stats` too.
Files are written to a temporary name and renamed, so a crash never leaves
a half-written cache behind.
"""
import hashlib
import os
import re
from typing import Callable, Optional

import numpy as np

from ddpm_jax import files
from ddpm_jax.metrics import scores


def cache_path(name: str, cache_dir: str) -> str:
  """`<cache_dir>/<name>.npz`, with characters unsafe in file names replaced.

  Names that needed replacing get a short hash of the original appended, so
  e.g. `folder:/a/b` and `folder:/a_b` never share a file.
  """
  if not name:
    raise ValueError("The reference statistics need a non-empty name.")
  safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
  if safe != name:
    safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
  return os.path.join(cache_dir, safe + ".npz")


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, *,
               features: Optional[np.ndarray] = None, num_examples: int = -1,
               fingerprint: str = "") -> None:
  """Writes statistics atomically (temporary file in the same directory, then rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
            "fingerprint": np.asarray(fingerprint),
            "num_examples": np.asarray(num_examples, np.int64)}
  if features is not None:
    arrays["features"] = np.asarray(features, np.float32)
  with files.atomic_write(path) as f:
    np.savez(f, **arrays)


def load_stats(path: str) -> dict:
  """Reads a statistics `.npz` (ours or pytorch-fid's): dict with at least mu, sigma."""
  with np.load(path, allow_pickle=False) as f:
    if "mu" not in f.files or "sigma" not in f.files:
      raise ValueError(f"{path} is not a statistics file: it lacks 'mu' and 'sigma' "
                       f"(it has {f.files}).")
    out = {k: f[k] for k in f.files}
  out["fingerprint"] = str(out.get("fingerprint", ""))
  return out


def reference_stats(
    name: str,
    compute_fn: Callable[[], np.ndarray],
    cache_dir: str,
    *,
    keep_features: bool = False,
    fingerprint: str = "",
) -> dict:
  """The cached statistics called `name`, computing and saving them on a miss.

  Args:
    name: identifies the reference set; include everything that changes the
      features, e.g. `cifar10-train-32`.
    compute_fn: `() -> features [N, D]` (Inception pool3 of the reference
      images); called only when the cache cannot serve the request.
    cache_dir: directory of the cache files (created if needed).
    keep_features: also store (and return) the features, for KID. A cache
      entry without features is recomputed when they are asked for. 50k
      CIFAR-10 pool3 features take 400 MB.
    fingerprint: a string describing how the features were made (e.g. the
      weights file name); a cache entry with another fingerprint is recomputed.

  Returns:
    dict: 'mu' float64 `[D]`, 'sigma' float64 `[D, D]`, 'num_examples',
    'fingerprint', and with keep_features 'features' float32 `[N, D]`.
  """
  path = cache_path(name, cache_dir)
  if os.path.exists(path):
    cached = load_stats(path)
    if cached["fingerprint"] == fingerprint and (not keep_features or "features" in cached):
      return cached
  features = np.asarray(compute_fn())
  mu, sigma = scores.stats_from_features(features)
  save_stats(path, mu, sigma, features=features if keep_features else None,
             num_examples=len(features), fingerprint=fingerprint)
  return load_stats(path)
