"""Reference statistics (of a training set) computed once and cached as `.npz`.

A cache file `<cache_dir>/<name>.npz` holds `mu` float64 `[D]`, `sigma`
float64 `[D, D]`, `num_examples`, `fingerprint` and, when asked for (KID
needs them), `features` float32 `[N, D]`. The `mu`/`sigma` keys are
pytorch-fid's, so its `--save-stats` files load with `load_stats` too.
Files are written to a temporary name and renamed, so a crash never leaves
a half-written cache behind. `read_npz` (an `.npz` read without pickle, with
one-line errors) is shared by the other metrics modules.
"""
import hashlib
import json
import os
import re
import zipfile
import zlib
from typing import Callable, Optional, Sequence

import numpy as np

from ddpm_jax import files
from ddpm_jax.metrics import scores


def read_npz(path: str, kind: str, keys: Optional[Sequence[str]] = None,
             hint: str = "") -> dict:
  """Arrays of an `.npz` file (all of them, or `keys`), read without pickle.

  Args:
    path: the file.
    kind: what the file should hold, for the messages (e.g. 'samples').
    keys: the arrays to read (all must be there); default: every array.
    hint: what to do about an invalid file, appended to the messages.

  Raises:
    ValueError: one line saying `path` is not a valid `.npz` of `kind` (not a
      zip of numpy arrays, truncated or corrupt, holding object arrays, or
      lacking one of `keys`).
    OSError: the file cannot be opened.
  """
  hint = f" {hint}" if hint else ""
  invalid = (f"{path} is not a valid .npz file of {kind}: it is not a zip of "
             f"numpy arrays, or it is truncated or corrupt.{hint}")
  try:
    f = np.load(path, allow_pickle=False)
  except (ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(invalid) from e
  if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy array
    raise ValueError(f"{path} is not a valid .npz file of {kind}: it is a single "
                     f".npy array, not an .npz archive of named arrays.{hint}")
  with f:
    missing = [k for k in keys or () if k not in f.files]
    if missing:
      raise ValueError(f"{path} is not an .npz file of {kind}: it has no "
                       f"{', '.join(map(repr, missing))} array (it has "
                       f"{f.files}).{hint}")
    try:
      return {k: f[k] for k in (keys or f.files)}
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise ValueError(invalid) from e


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


def reference_key(*, dataset: str, split: str, image_size: int, channels: int,
                  num_examples: int, weights_sha256: str,
                  data_fingerprint: str = "") -> tuple[str, str]:
  """(name, fingerprint) of a data set's Inception statistics, for `reference_stats`.

  Everything that changes the features is in the fingerprint: the images
  (data set, split, size, channels, the first `num_examples`, and for data
  whose files can change, such as an image folder, `data_fingerprint`) and
  the content of the Inception weights file (`files.file_sha256`), not its
  name. The name (the cache file) carries the weights with a 12-digit prefix
  of their sha256, so the statistics of other weights sit beside these rather
  than replace them.
  """
  key = {"dataset": dataset, "split": split, "image_size": int(image_size),
         "channels": int(channels), "num_examples": int(num_examples),
         "inception_sha256": weights_sha256}
  if data_fingerprint:
    key["data"] = data_fingerprint
  fingerprint = json.dumps(key, sort_keys=True)
  name = (f"{dataset}-{split}{int(num_examples)}-{int(image_size)}x{int(channels)}"
          f"-inception{weights_sha256[:12]}")
  return name, fingerprint


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
  out = read_npz(path, "Inception statistics")
  if "mu" not in out or "sigma" not in out:
    raise ValueError(f"{path} is not a statistics file: it lacks 'mu' and 'sigma' "
                     f"(it has {sorted(out)}).")
  out["fingerprint"] = str(out.get("fingerprint", ""))
  return out


def reference_stats(
    name: str,
    compute_fn: Callable[[], np.ndarray],
    cache_dir: str,
    *,
    keep_features: bool = False,
    fingerprint: str = "",
    save: bool = True,
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
      sha256 of the Inception weights file and the reference images' data
      set, split, size and count); a cache entry with another fingerprint,
      or one that cannot be read, is recomputed.
    save: write what was computed to the cache (False: only read it).

  Returns:
    dict: 'mu' float64 `[D]`, 'sigma' float64 `[D, D]`, 'num_examples',
    'fingerprint', and with keep_features 'features' float32 `[N, D]`.
  """
  path = cache_path(name, cache_dir)
  if os.path.exists(path):
    try:
      cached = load_stats(path)
    except ValueError:  # Not (or no longer) a readable statistics file: remake it.
      cached = None
    if (cached is not None and cached["fingerprint"] == fingerprint
        and (not keep_features or "features" in cached)):
      return cached
  features = np.asarray(compute_fn())
  mu, sigma = scores.stats_from_features(features)
  if save:
    save_stats(path, mu, sigma, features=features if keep_features else None,
               num_examples=len(features), fingerprint=fingerprint)
  # What was computed, not the file read back: a concurrent writer (a run
  # without features, say) may have replaced it since.
  out = {"mu": mu, "sigma": sigma, "fingerprint": fingerprint,
         "num_examples": np.asarray(len(features), np.int64)}
  if keep_features:
    out["features"] = np.asarray(features, np.float32)
  return out
