"""The FID Inception-v3 network in Flax Linen, and loading its weights.

This is the network behind every published FID: the TensorFlow graph
`inception-2015-12-05` as ported to PyTorch by pytorch-fid (and, with the same
structure, by torch-fidelity). It differs from a textbook Inception-v3 in
three places, all of which change the features, so all are reproduced here:

* the average-pool branch of the A, C and first E blocks excludes the zero
  padding from the average (TensorFlow's SAME average pool),
* the last E block (`Mixed_7c`) max-pools instead of average-pools,
* the classifier has 1008 classes.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torch
state_dict), or an `.npz` holding the same names converted once with

  python -m ddpm_jax.metrics.inception --convert IN.pth --out OUT.npz

so that inference needs no torch. Parameter names mirror the torch module
names: torch key `Mixed_5b.branch1x1.conv.weight` is
`params['Mixed_5b']['branch1x1']['kernel']`.

Input to `InceptionV3.__call__`: float32 `[B, 299, 299, 3]` NHWC in [-1, 1]
(see `features.py` for the resize and scaling from uint8 images).
"""
import argparse
import os
import sys
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import files
from ddpm_jax.metrics import stats_cache

WEIGHTS_ENV_VAR = "DDPM_JAX_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
               "fid_weights/" + WEIGHTS_FILENAME)
# The CPU build the project's test extra pins (setup.cfg).
TORCH_VERSION = "2.13.0"
INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
# TensorFlow's batch-norm epsilon in this graph (torch ports use eps=0.001).
_BN_EPS = 1e-3

Params = Mapping[str, Any]


class ConvBN(nn.Module):
  """Conv (no bias) -> inference batch norm -> ReLU (torch's `BasicConv2d`).

  The batch-norm statistics live in `params` (as `bn_mean`, `bn_var`) rather
  than in a `batch_stats` collection: this network is only ever evaluated,
  so one frozen parameter tree is all a caller handles.
  """
  features: int
  kernel_size: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    in_ch = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, in_ch, self.features))
    scale = self.param("bn_scale", nn.initializers.ones, (self.features,))
    bias = self.param("bn_bias", nn.initializers.zeros, (self.features,))
    mean = self.param("bn_mean", nn.initializers.zeros, (self.features,))
    var = self.param("bn_var", nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides),
        padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    inv = scale * jax.lax.rsqrt(var + _BN_EPS)
    shift = bias - mean * inv
    return nn.relu(y * inv[None, None, None, :] + shift[None, None, None, :])


def _avg_pool_same(x: jax.Array) -> jax.Array:
  # 3x3 stride-1 average that ignores the padding, as TensorFlow's SAME pool.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class InceptionA(nn.Module):
  """35x35 block (`Mixed_5b..5d`)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (`Mixed_6a`)."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (`Mixed_6b..6e`)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    b7 = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (`Mixed_7a`)."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with expanded filter banks (`Mixed_7b`, `Mixed_7c`).

  `max_pool=True` is the FID graph's `Mixed_7c`, which max-pools in its pool
  branch (the textbook network average-pools there).
  """
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class UnbiasedClassifier(nn.Module):
  """The 1008-way classifier without its bias: `pool3 @ kernel`.

  The original Inception Score code multiplies pool3 by the softmax layer's
  weight matrix and never adds the bias; we do the same so IS matches the
  published numbers. The bias is still a parameter so the weights file
  converts completely.
  """

  @nn.compact
  def __call__(self, pool3: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (pool3.shape[-1], NUM_LOGITS))
    self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    return jnp.dot(pool3, kernel, precision=jax.lax.Precision.HIGHEST)


class InceptionV3(nn.Module):
  """The FID Inception-v3 up to pool3, plus the 1008-way classifier.

  Call: `module.apply({'params': p}, x)` with x float32 `[B, H, W, 3]` in
  [-1, 1] (H = W = 299 for the standard features; any size >= 75 runs).
  Returns a dict:
    'pool3':  float32 `[B, 2048]`, the global average pool (FID, KID).
    'logits': float32 `[B, 1008]`, `pool3 @ W` without the classifier bias,
              as the original Inception Score code computes them (torch-
              fidelity's 'logits_unbiased').
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> dict:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3 expects [B, H, W, 3] input, got {x.shape}.")
    x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = UnbiasedClassifier(name="fc")(pool3)
    return {"pool3": pool3, "logits": logits}


# --------------------------------------------------------------------------
# Weights: torch state_dict names <-> Flax parameter tree.
# --------------------------------------------------------------------------

_BN_NAMES = {"weight": "bn_scale", "bias": "bn_bias",
             "running_mean": "bn_mean", "running_var": "bn_var"}


def params_from_state_dict(state_dict: Mapping[str, Any]) -> Params:
  """Converts pytorch-fid / torch-fidelity Inception weights to Flax params.

  Args:
    state_dict: torch key -> array (numpy or torch tensor), e.g.
      `Mixed_5b.branch1x1.conv.weight` `[O, I, kh, kw]`. BatchNorm's
      `num_batches_tracked` counters are ignored.

  Returns:
    The parameter tree of `InceptionV3` (float32 numpy arrays).

  Raises:
    ValueError: naming the missing, unexpected or wrongly shaped entries when
      the file is not this network's weights.
  """
  params: dict = {}
  unexpected = []
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach")
                       else value, dtype=np.float32)
    parts = key.split(".")
    if parts[0] == "fc" and len(parts) == 2 and parts[1] in ("weight", "bias"):
      path, leaf = ["fc"], "kernel" if parts[1] == "weight" else "bias"
      value = value.T if parts[1] == "weight" else value
    elif len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
      path, leaf = parts[:-2], "kernel"
      if value.ndim != 4:
        raise ValueError(f"{key}: expected a 4-d conv weight, got shape {value.shape}.")
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_NAMES:
      path, leaf = parts[:-2], _BN_NAMES[parts[-1]]
    else:
      unexpected.append(key)
      continue
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  _check_against_module(params, unexpected)
  return params


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      out.update(_flatten(v, name))
    else:
      out[name] = tuple(v.shape)
  return out


def _check_against_module(params: Params, unexpected: Sequence[str]) -> None:
  expected = jax.eval_shape(
      InceptionV3().init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))["params"]
  want = _flatten(expected)
  got = _flatten(params)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want)) + sorted(unexpected)
  bad_shape = sorted(f"{k}: {got[k]} (expected {want[k]})"
                     for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or bad_shape:
    def head(items):
      return ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")
    problems = []
    if missing:
      problems.append(f"missing: {head(missing)}")
    if extra:
      problems.append(f"unexpected: {head(extra)}")
    if bad_shape:
      problems.append(f"wrong shape: {head(bad_shape)}")
    raise ValueError(
        "These are not the FID Inception-v3 weights (" + "; ".join(problems) +
        f"). Use pytorch-fid's {WEIGHTS_FILENAME} from {WEIGHTS_URL}.")


def read_state_dict(path: str) -> dict:
  """Reads a weights file: `.npz` (numpy only) or a torch `.pth`/`.pt`.

  Raises:
    ValueError: one line saying what is wrong and what to do, when the file
      is not a readable `.npz` or torch file (truncated, corrupt, another
      format) or reading a torch file needs torch and it is not installed.
  """
  if path.endswith(".npz"):
    return stats_cache.read_npz(
        path, "Inception weights",
        hint=f"Re-download {WEIGHTS_FILENAME} from {WEIGHTS_URL} and convert it "
        "again (python -m ddpm_jax.metrics.inception --convert IN.pth --out OUT.npz).")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        f"Reading the torch weights file {path} needs torch, which is not "
        f"installed: install it (`pip install torch=={TORCH_VERSION} --index-url "
        "https://download.pytorch.org/whl/cpu`, the CPU build), or convert the "
        "file once where torch is installed (`python -m ddpm_jax.metrics.inception "
        f"--convert {path} --out inception.npz`) and use the .npz.") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except OSError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    # torch raises UnpicklingError, RuntimeError, EOFError, ... with messages
    # that suggest loading the file unsafely; say what is wrong instead.
    raise ValueError(
        f"{path} is not a readable torch weights file ({type(e).__name__}): it "
        f"is truncated, corrupt or not a state_dict. Re-download "
        f"{WEIGHTS_FILENAME} from {WEIGHTS_URL}.") from None
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict.")
  return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v
          for k, v in state.items()}


def resolve_weights_path(weights_path: Optional[str] = None) -> str:
  """The weights file: the argument, else $DDPM_JAX_INCEPTION_WEIGHTS.

  Raises:
    FileNotFoundError: with where to download the file and how to point to
      it, when neither is given or the file does not exist.
  """
  source = "--inception_weights / the weights_path argument"
  if not weights_path:
    weights_path = os.environ.get(WEIGHTS_ENV_VAR, "")
    source = f"${WEIGHTS_ENV_VAR}"
  how = (f"Download pytorch-fid's Inception weights {WEIGHTS_FILENAME} (about "
         f"91 MB) from\n  {WEIGHTS_URL}\nthen pass its path (the evaluate CLI's "
         f"--inception_weights flag) or set {WEIGHTS_ENV_VAR}=/path/to/"
         f"{WEIGHTS_FILENAME}. Without torch, convert it once with `python -m "
         "ddpm_jax.metrics.inception --convert IN.pth --out OUT.npz` and use "
         "the .npz. Nothing is downloaded at run time.")
  if not weights_path:
    raise FileNotFoundError(f"No FID Inception weights file given. {how}")
  if not os.path.isfile(weights_path):
    what = "is a directory" if os.path.isdir(weights_path) else "does not exist"
    raise FileNotFoundError(
        f"FID Inception weights file {weights_path!r} (from {source}) {what}. "
        f"{how}")
  return weights_path


def load_inception(weights_path: Optional[str] = None) -> Tuple[InceptionV3, Params]:
  """Loads the FID Inception-v3.

  Args:
    weights_path: pytorch-fid's `.pth` (needs torch) or a converted `.npz`;
      None reads the path from $DDPM_JAX_INCEPTION_WEIGHTS.

  Returns:
    (module, params): apply as `module.apply({'params': params}, x)`.
  """
  path = resolve_weights_path(weights_path)
  params = params_from_state_dict(read_state_dict(path))
  return InceptionV3(), jax.tree.map(jnp.asarray, params)


def convert(in_path: str, out_path: str) -> None:
  """Converts a torch weights file to an `.npz` of the same names (atomic)."""
  state = read_state_dict(in_path)
  params_from_state_dict(state)  # Refuse to write anything but these weights.
  state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  with files.atomic_write(out_path) as f:
    np.savez(f, **state)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ddpm_jax.metrics.inception",
      description="Convert the FID Inception weights (torch .pth) to a .npz "
                  "that loads without torch.")
  parser.add_argument("--convert", required=True, metavar="IN.pth",
                      help=f"pytorch-fid's {WEIGHTS_FILENAME} ({WEIGHTS_URL})")
  parser.add_argument("--out", required=True, metavar="OUT.npz")
  args = parser.parse_args(argv)
  if not args.out.endswith(".npz"):
    parser.error(f"--out must end in .npz, got {args.out!r}.")
  if not os.path.isfile(args.convert):
    print(f"error: {args.convert!r} does not exist. Download it from {WEIGHTS_URL}",
          file=sys.stderr)
    return 1
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
    print(f"error: cannot write to the directory {out_dir!r}.", file=sys.stderr)
    return 1
  try:
    convert(args.convert, args.out)
  except (ValueError, ImportError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
