"""FID/IS/KID: the Flax FID Inception against torch-fidelity's PyTorch one,
the preprocessing against torch's bilinear interpolate (pytorch-fid's), and
the scores against closed forms and independent float64 computations."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ddpm_jax import metrics
from ddpm_jax.metrics import features as features_lib
from ddpm_jax.metrics import inception as inception_lib
from ddpm_jax.metrics import stats_cache

torch = pytest.importorskip("torch")
F = torch.nn.functional

# The peer, torch-fidelity's FID Inception with random weights, is the
# `peer` fixture of conftest.py.


@pytest.fixture(scope="module")
def converted(peer):
  return inception_lib.InceptionV3(), inception_lib.params_from_state_dict(peer.state_dict())


_BODY = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
         "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
         "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
         "AvgPool"]


def _peer_on_float_input(peer, x_nchw):
  """The peer's layers on an already preprocessed [-1, 1] float input."""
  with torch.no_grad():
    for name in _BODY:
      x_nchw = getattr(peer, name)(x_nchw)
    pool3 = torch.flatten(x_nchw, 1)
    return pool3.numpy(), (pool3 @ peer.fc.weight.T).numpy()


def _pytorch_fid_preprocess(images_uint8):
  """pytorch-fid: ToTensor (/255), bilinear resize to 299, then 2x - 1; NCHW."""
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  return 2 * x - 1


def _assert_close(actual, expected, atol=1e-4):
  """Absolute 1e-4 on features of size O(1..10) (the float32 paths differ by
  about 6e-6); leaving out one of the FID graph's quirks costs 0.5 or more."""
  err = float(np.abs(np.asarray(actual, np.float64) - expected).max())
  assert err <= atol, f"max abs error {err:.3g} > {atol}"


def test_network_matches_torch_fidelity_forward(peer, converted):
  module, params = converted
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  with torch.no_grad():
    want_pool3, want_logits = peer(torch.from_numpy(images).permute(0, 3, 1, 2))
  # torch-fidelity scales by (x - 128) / 128 and a 299 -> 299 resize is the
  # identity, so this feeds both networks the same input.
  x = (jnp.asarray(images, jnp.float32) - 128.0) / 128.0
  got = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, x)
  assert np.abs(want_pool3.numpy()).max() > 0.1  # The comparison is not of zeros.
  _assert_close(got["pool3"], want_pool3.numpy())
  _assert_close(got["logits"], want_logits.numpy())


def test_inception_features_matches_pytorch_fid_pipeline(peer, converted):
  """Greyscale 28x28 uint8 -> features, against F.interpolate + the peer's
  layers; 3 images in chunks of 2 and 1, on 8 devices (one padded batch)."""
  module, params = converted
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  got = metrics.inception_features(module, params, iter([images[:2], images[2:]]),
                                   batch_size=2)
  want_pool3, want_logits = _peer_on_float_input(peer, _pytorch_fid_preprocess(images))
  assert got["pool3"].shape == (3, 2048) and got["logits"].shape == (3, 1008)
  assert got["pool3"].dtype == np.float32
  _assert_close(got["pool3"], want_pool3)
  _assert_close(got["logits"], want_logits)


@pytest.mark.parametrize("shape", [(8, 8, 3), (32, 32, 3), (24, 40, 1), (320, 301, 3), (299, 299, 3)])
def test_preprocess_matches_torch_bilinear_interpolate(shape):
  images = np.random.default_rng(3).integers(0, 256, (2,) + shape, dtype=np.uint8)
  got = np.asarray(jax.jit(features_lib.preprocess)(images))
  want = _pytorch_fid_preprocess(images).permute(0, 2, 3, 1).numpy()
  assert got.shape == (2, 299, 299, 3)
  # Only the order of float32 additions differs; a wrong pixel-centre
  # convention would be off by a tenth of the range.
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("in_size", [8, 32, 64, 256, 301, 320])
def test_resize_weights_equal_torch_bit_for_bit(in_size):
  # Column j of torch's resize of the j-th unit signal is row j of R^T.
  unit = torch.eye(in_size)[:, None, None, :].expand(in_size, 1, 2, in_size).contiguous()
  torch_r = F.interpolate(unit, size=(2, 299), mode="bilinear", align_corners=False)
  np.testing.assert_array_equal(features_lib.bilinear_resize_matrix(in_size, 299),
                                torch_r[:, 0, 0, :].T.numpy())


def test_rebatch_keeps_order_and_pads():
  chunks = [np.full((n, 2, 2, 1), i, np.uint8) for i, n in enumerate([3, 5, 2])]
  batches = list(features_lib._rebatch(iter(chunks), 4))  # pylint: disable=protected-access
  assert [n for _, n in batches] == [4, 4, 2]
  flat = np.concatenate([b for b, _ in batches])[:, 0, 0, 0]
  np.testing.assert_array_equal(flat, [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 0, 0])


def test_inception_features_progress_bar_total(monkeypatch):
  """An array's bar counts to its length; an iterable's to the `total` given."""
  from tiny_models import TinyFeatures, tiny_features_params  # pylint: disable=g-import-not-at-top
  bars = []

  class RecordingBar(features_lib.tqdm):
    def close(self):
      bars.append((self.total, self.n))
      super().close()

  monkeypatch.setattr(features_lib, "tqdm", RecordingBar)
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
  module, params = TinyFeatures(), tiny_features_params()
  whole = metrics.inception_features(module, params, images, batch_size=8, progress=True)
  chunked = metrics.inception_features(module, params, iter([images[:2], images[2:]]),
                                       batch_size=8, progress=True, total=5)
  assert set(bars) == {(5, 5)}
  np.testing.assert_array_equal(chunked["pool3"], whole["pool3"])


def test_inception_features_rejects_bad_images():
  module, params = inception_lib.InceptionV3(), None  # Refused before any use.
  with pytest.raises(TypeError, match="uint8"):
    metrics.inception_features(module, params, np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="C = 1 or 3"):
    metrics.inception_features(module, params, np.zeros((2, 8, 8, 4), np.uint8))
  with pytest.raises(ValueError, match="batch_size"):
    metrics.inception_features(module, params, np.zeros((2, 8, 8, 3), np.uint8), batch_size=0)


# --------------------------------------------------------------------------
# Weights files.
# --------------------------------------------------------------------------


def test_missing_weights_error_says_where_to_get_them(monkeypatch, tmp_path):
  monkeypatch.delenv(metrics.WEIGHTS_ENV_VAR, raising=False)
  with pytest.raises(FileNotFoundError) as e:
    metrics.load_inception()
  msg = str(e.value)
  assert metrics.WEIGHTS_URL in msg and metrics.WEIGHTS_ENV_VAR in msg
  assert "pt_inception-2015-12-05-6726825d.pth" in msg
  missing = str(tmp_path / "nope.pth")
  monkeypatch.setenv(metrics.WEIGHTS_ENV_VAR, missing)
  with pytest.raises(FileNotFoundError, match="does not exist") as e:
    metrics.load_inception()
  assert missing in str(e.value) and metrics.WEIGHTS_URL in str(e.value)


def test_wrong_weights_file_is_refused(tmp_path):
  path = str(tmp_path / "other.npz")
  np.savez(path, **{"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="not the FID Inception-v3 weights") as e:
    metrics.load_inception(path)
  assert "missing: " in str(e.value) and "unexpected: conv1.weight" in str(e.value)


def test_convert_cli_then_load_npz_and_pth_agree(peer, converted, tmp_path, monkeypatch):
  _, params = converted
  pth = str(tmp_path / "weights.pth")
  torch.save(peer.state_dict(), pth)
  npz = str(tmp_path / "weights.npz")
  assert inception_lib.main(["--convert", pth, "--out", npz]) == 0
  assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # No temp file left.
  monkeypatch.setenv(metrics.WEIGHTS_ENV_VAR, npz)
  _, from_npz = metrics.load_inception()
  _, from_pth = metrics.load_inception(pth)
  want = jax.tree_util.tree_leaves_with_path(params)
  for tree in (from_npz, from_pth):
    got = dict(jax.tree_util.tree_leaves_with_path(tree))
    assert len(got) == len(want) == 472
    for path, leaf in want:
      np.testing.assert_array_equal(np.asarray(got[path]), leaf)
  # A non-weights input is refused and leaves no output behind.
  bad = str(tmp_path / "bad.pth")
  torch.save({"x.weight": torch.zeros(2)}, bad)
  out = str(tmp_path / "bad.npz")
  assert inception_lib.main(["--convert", bad, "--out", out]) == 1
  assert not os.path.exists(out)


def test_weights_without_torch_is_a_one_line_value_error(tmp_path, monkeypatch):
  pth = str(tmp_path / "weights.pth")
  torch.save({"fc.bias": torch.zeros(3)}, pth)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
  with pytest.raises(ValueError) as e:
    metrics.load_inception(pth)
  msg = str(e.value)
  assert "needs torch, which is not installed" in msg and "torch==2.13.0" in msg
  assert "--convert" in msg and "\n" not in msg


def test_corrupt_weights_files_are_refused_with_what_to_do(tmp_path):
  good = str(tmp_path / "good.pth")
  torch.save({"fc.bias": torch.zeros(1000)}, good)
  with open(good, "rb") as f:
    data = f.read()
  truncated = str(tmp_path / "truncated.pth")
  garbage = str(tmp_path / "garbage.pth")
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  with open(garbage, "wb") as f:
    f.write(b"not a pickle " * 20)
  for path in (truncated, garbage):
    with pytest.raises(ValueError, match="not a readable torch weights file") as e:
      metrics.load_inception(path)
    msg = str(e.value)
    assert path in msg and metrics.WEIGHTS_URL in msg and "Re-download" in msg
    assert "weights_only" not in msg and "\n" not in msg
  npz = str(tmp_path / "garbage.npz")
  with open(npz, "wb") as f:
    f.write(b"not a zip " * 20)
  with pytest.raises(ValueError, match="not a valid .npz file of Inception weights") as e:
    metrics.load_inception(npz)
  assert "allow_pickle" not in str(e.value) and metrics.WEIGHTS_URL in str(e.value)


def test_read_npz_names_what_is_wrong(tmp_path):
  path = str(tmp_path / "a.npz")
  np.savez(path, samples=np.arange(6, dtype=np.uint8), labels=np.zeros(6, np.int32))
  got = metrics.read_npz(path, "samples", keys=["samples"])
  assert list(got) == ["samples"]
  np.testing.assert_array_equal(got["samples"], np.arange(6))
  assert sorted(metrics.read_npz(path, "samples")) == ["labels", "samples"]
  with pytest.raises(ValueError, match=r"has no 'images' array \(it has \['samples', 'labels'\]\)"):
    metrics.read_npz(path, "samples", keys=["images"])
  with open(path, "rb") as f:
    data = f.read()
  cases = {"truncated.npz": data[:len(data) - 30], "empty.npz": b"",
           "text.npz": b"hello " * 30}
  for name, content in cases.items():
    bad = str(tmp_path / name)
    with open(bad, "wb") as f:
      f.write(content)
    with pytest.raises(ValueError, match="not a valid .npz file of samples: it is not a "
                       "zip of numpy arrays.*Try again") as e:
      metrics.read_npz(bad, "samples", hint="Try again.")
    assert "allow_pickle" not in str(e.value), name
  npy = str(tmp_path / "array.npz")
  with open(npy, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(ValueError, match="single .npy array"):
    metrics.read_npz(npy, "samples")
  objects = str(tmp_path / "objects.npz")
  np.savez(objects, samples=np.array([None, 1], dtype=object))
  with pytest.raises(ValueError, match="not a valid .npz file of samples"):
    metrics.read_npz(objects, "samples")


# --------------------------------------------------------------------------
# FID.
# --------------------------------------------------------------------------


def _trace_sqrt_product(s1, s2):
  """tr((s1 s2)^(1/2)) via the symmetric s1^(1/2) s2 s1^(1/2) (no sqrtm)."""
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  return np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)))


def test_fid_of_a_set_with_itself_is_zero():
  feats = np.random.default_rng(4).normal(size=(500, 64)) @ np.diag(np.linspace(0.1, 3, 64))
  mu, sigma = metrics.stats_from_features(feats)
  assert abs(metrics.fid_from_stats(mu, sigma, mu, sigma)) < 1e-6


def test_fid_matches_independent_float64_reference():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(400, 32))
  b = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
  mu1, s1 = metrics.stats_from_features(a)
  mu2, s2 = metrics.stats_from_features(b)
  np.testing.assert_allclose(mu1, a.mean(0), rtol=1e-12)
  np.testing.assert_allclose(s1, (a - a.mean(0)).T @ (a - a.mean(0)) / (len(a) - 1), rtol=1e-10)
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * _trace_sqrt_product(s1, s2))
  got = metrics.fid_from_stats(mu1, s1, mu2, s2)
  assert want > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-8)


def test_fid_of_diagonal_gaussians_matches_closed_form():
  rng = np.random.default_rng(6)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  v1, v2 = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  got = metrics.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_fid_with_singular_covariances_is_finite():
  # Fewer samples than dimensions: rank-deficient covariances, as with a
  # few hundred samples of 2048-d pool3 features.
  rng = np.random.default_rng(7)
  mu1, s1 = metrics.stats_from_features(rng.normal(size=(20, 40)))
  mu2, s2 = metrics.stats_from_features(rng.normal(size=(20, 40)) + 1)
  got = metrics.fid_from_stats(mu1, s1, mu2, s2)
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * _trace_sqrt_product(s1, s2))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_fid_rejects_mismatched_stats():
  with pytest.raises(ValueError, match="do not match"):
    metrics.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="N >= 2"):
    metrics.stats_from_features(np.zeros((1, 3)))


# --------------------------------------------------------------------------
# Inception Score.
# --------------------------------------------------------------------------


def test_inception_score_closed_forms():
  mean, std = metrics.inception_score(np.zeros((50, 1008)), splits=5)
  assert abs(mean - 1.0) < 1e-12 and std < 1e-12
  # Confident predictions, every class equally often in every split: IS = K.
  k = 10
  logits = 200.0 * np.eye(k)[np.arange(100) % k]
  mean, std = metrics.inception_score(logits, splits=10)
  np.testing.assert_allclose(mean, k, rtol=1e-9)
  assert std < 1e-9


def test_inception_score_needs_two_samples_per_split():
  logits = np.random.default_rng(13).normal(size=(20, 30)) * 3
  # One sample per split would score exactly 1 whatever the logits.
  for n, splits in [(19, 10), (5, 5), (1, 1)]:
    with pytest.raises(ValueError, match=f"at least {2 * splits} samples .*got {n}"):
      metrics.inception_score(logits[:n], splits=splits)
  mean, std = metrics.inception_score(logits, splits=10)
  assert mean > 1.0 and std > 0.0
  with pytest.raises(ValueError, match="splits must be >= 1"):
    metrics.inception_score(logits, splits=0)


def test_inception_score_matches_scipy_reference():
  logits = np.random.default_rng(8).normal(size=(90, 20)) * 3
  splits = 3
  scores = []
  for part in np.array_split(logits, splits):  # 90 / 3: the same contiguous parts.
    p = special.softmax(part, axis=1)
    kl = special.rel_entr(p, p.mean(0, keepdims=True)).sum(1)
    scores.append(np.exp(kl.mean()))
  mean, std = metrics.inception_score(logits, splits=splits)
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
  assert 1 < mean < 20


# --------------------------------------------------------------------------
# KID.
# --------------------------------------------------------------------------


def _mmd2_loops(x, y):
  """Unbiased polynomial-kernel MMD^2 by explicit sums over pairs."""
  m, d = x.shape
  k = lambda a, b: (np.dot(a, b) / d + 1) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def test_kid_matches_independent_numpy():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(30, 5))
  y = rng.normal(size=(30, 5)) * 1.5 + 0.3
  want = _mmd2_loops(x, y)
  # A subset of the whole set is a permutation, to which MMD is invariant.
  mean, std = metrics.kernel_inception_distance(x, y, subset_size=30, num_subsets=3, rng=1)
  np.testing.assert_allclose(mean, want, rtol=1e-10)
  assert std < 1e-12 and want > 0.1


def test_kid_near_zero_for_the_same_distribution():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(400, 16))
  same = rng.normal(size=(400, 16))
  shifted = rng.normal(size=(400, 16)) + 0.5
  kid_same, _ = metrics.kernel_inception_distance(x, same, subset_size=150, num_subsets=15, rng=0)
  kid_self, _ = metrics.kernel_inception_distance(x, x, subset_size=150, num_subsets=15, rng=0)
  kid_far, _ = metrics.kernel_inception_distance(x, shifted, subset_size=150, num_subsets=15, rng=0)
  assert kid_far > 0.05
  assert abs(kid_same) < 0.05 * kid_far and abs(kid_self) < 0.05 * kid_far
  again = metrics.kernel_inception_distance(x, shifted, subset_size=150, num_subsets=15, rng=0)
  assert again[0] == kid_far  # Same seed, same subsets.


def test_kid_rejects_too_large_subsets():
  with pytest.raises(ValueError, match="subset_size=1000"):
    metrics.kernel_inception_distance(np.zeros((500, 4)), np.zeros((800, 4)))


# --------------------------------------------------------------------------
# Reference statistics cache.
# --------------------------------------------------------------------------


def test_reference_stats_computed_once_then_cached(tmp_path):
  feats = np.random.default_rng(11).normal(size=(50, 6)).astype(np.float32)
  calls = []

  def compute():
    calls.append(1)
    return feats

  cache = str(tmp_path / "cache")
  first = metrics.reference_stats("digits-train-8", compute, cache)
  second = metrics.reference_stats("digits-train-8", compute, cache)
  assert len(calls) == 1
  np.testing.assert_allclose(second["mu"], feats.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(second["sigma"], np.cov(feats.astype(np.float64), rowvar=False),
                             rtol=1e-12)
  np.testing.assert_array_equal(first["sigma"], second["sigma"])
  assert int(second["num_examples"]) == 50 and "features" not in second
  # Features asked for, or another fingerprint: recomputed.
  with_feats = metrics.reference_stats("digits-train-8", compute, cache, keep_features=True)
  assert len(calls) == 2
  np.testing.assert_array_equal(with_feats["features"], feats)
  metrics.reference_stats("digits-train-8", compute, cache, keep_features=True)
  assert len(calls) == 2
  metrics.reference_stats("digits-train-8", compute, cache, fingerprint="other")
  assert len(calls) == 3
  assert sorted(os.listdir(cache)) == ["digits-train-8.npz"]
  # save=False (a multi-host run's other processes) reads, never writes.
  before = os.path.getmtime(stats_cache.cache_path("digits-train-8", cache))
  read = metrics.reference_stats("digits-train-8", compute, cache, fingerprint="other",
                                 save=False)
  assert len(calls) == 3 and read["fingerprint"] == "other"
  metrics.reference_stats("digits-train-8", compute, cache, fingerprint="third", save=False)
  assert len(calls) == 4
  assert metrics.load_stats(stats_cache.cache_path("digits-train-8", cache))["fingerprint"] == "other"
  assert os.path.getmtime(stats_cache.cache_path("digits-train-8", cache)) == before
  other = str(tmp_path / "never_made")
  metrics.reference_stats("digits-train-8", compute, other, save=False)
  assert not os.path.exists(other)


def test_reference_stats_failure_leaves_no_file(tmp_path):
  cache = str(tmp_path)

  def broken():
    raise RuntimeError("data missing")

  with pytest.raises(RuntimeError):
    metrics.reference_stats("x", broken, cache)
  assert os.listdir(cache) == []
  # Unsafe names map to distinct, safe file names.
  a = stats_cache.cache_path("folder:/a/b", cache)
  b = stats_cache.cache_path("folder:/a_b", cache)
  assert a != b and os.path.dirname(a) == cache and ":" not in os.path.basename(a)


def test_weights_with_the_same_name_do_not_share_statistics(tmp_path):
  """The cache is keyed by the weights' content: a different file of the
  same name gets its own statistics, and the same content is reused."""
  paths = []
  for folder, value in [("a", 0.0), ("b", 1.0)]:
    (tmp_path / folder).mkdir()
    paths.append(str(tmp_path / folder / "pt_inception-2015-12-05-6726825d.npz"))
    np.savez(paths[-1], w=np.full(3, value, np.float32))
  copy = str(tmp_path / "copy.npz")
  with open(paths[0], "rb") as src, open(copy, "wb") as dst:
    dst.write(src.read())
  rng = np.random.default_rng(14)
  feats = {p: rng.normal(size=(10, 4)).astype(np.float32) for p in paths}
  calls = []
  cache = str(tmp_path / "cache")

  def stats(weights, feats_of):
    key = dict(dataset="digits", split="train", image_size=8, channels=1,
               num_examples=10, weights_sha256=metrics.file_sha256(weights))
    name, fingerprint = metrics.reference_key(**key)
    return metrics.reference_stats(
        name, lambda: calls.append(weights) or feats[feats_of], cache,
        fingerprint=fingerprint)

  first = stats(paths[0], paths[0])
  second = stats(paths[1], paths[1])
  assert calls == paths and len(os.listdir(cache)) == 2
  np.testing.assert_allclose(second["mu"], feats[paths[1]].astype(np.float64).mean(0),
                             rtol=1e-12)
  assert np.abs(first["mu"] - second["mu"]).max() > 0.1
  again = stats(copy, paths[1])  # the first file's content under another name
  assert calls == paths  # served from the cache
  np.testing.assert_array_equal(again["mu"], first["mu"])
  # Everything else that changes the features changes the key too.
  base = dict(dataset="digits", split="train", image_size=8, channels=1,
              num_examples=10, weights_sha256="0" * 64)
  keys = {metrics.reference_key(**base)}
  for change in [dict(dataset="cifar10"), dict(split="test"), dict(image_size=16),
                 dict(channels=3), dict(num_examples=11), dict(weights_sha256="1" * 64),
                 dict(data_fingerprint="ab12")]:
    keys.add(metrics.reference_key(**{**base, **change}))
  # Changed files (an image folder's) keep the cache file's name and replace
  # its statistics: the fingerprint differs.
  assert len({name for name, _ in keys}) == 7 and len({fp for _, fp in keys}) == 8


def test_unreadable_cache_entry_is_recomputed(tmp_path):
  cache = str(tmp_path)
  feats = np.random.default_rng(15).normal(size=(10, 3)).astype(np.float32)
  path = stats_cache.cache_path("x", cache)
  with open(path, "wb") as f:
    f.write(b"half a file")
  got = metrics.reference_stats("x", lambda: feats, cache)
  np.testing.assert_allclose(got["mu"], feats.astype(np.float64).mean(0), rtol=1e-12)
  assert int(metrics.load_stats(path)["num_examples"]) == 10


def test_reference_stats_returns_what_it_computed_not_the_file_read_back(
    tmp_path, monkeypatch):
  """A concurrent FID-only writer can replace the file between this run's save
  and a read back; the KID run must still get its features."""
  feats = np.random.default_rng(16).normal(size=(12, 3)).astype(np.float32)
  real_save = stats_cache.save_stats

  def save_then_another_writer(path, mu, sigma, **kwargs):
    real_save(path, mu, sigma, **kwargs)
    kwargs.pop("features", None)
    real_save(path, mu + 1.0, sigma, **kwargs)  # featureless, other numbers

  monkeypatch.setattr(stats_cache, "save_stats", save_then_another_writer)
  got = metrics.reference_stats("x", lambda: feats, str(tmp_path), keep_features=True,
                                fingerprint="fp")
  np.testing.assert_array_equal(got["features"], feats)
  assert got["features"].dtype == np.float32
  np.testing.assert_allclose(got["mu"], feats.astype(np.float64).mean(0), rtol=1e-12)
  assert got["sigma"].shape == (3, 3) and got["sigma"].dtype == np.float64
  assert int(got["num_examples"]) == 12 and got["fingerprint"] == "fp"
  # The same keys and types as an entry served from the cache.
  cached = metrics.reference_stats("x", lambda: 1 / 0, str(tmp_path), fingerprint="fp")
  assert sorted(cached) == sorted(k for k in got if k != "features")


# --------------------------------------------------------------------------
# NaN / inf and degenerate inputs.
# --------------------------------------------------------------------------


def test_stats_of_one_dimensional_features_are_d_by_d():
  mu, sigma = metrics.stats_from_features(np.array([[0.0], [1.0], [2.0], [5.0]]))
  assert mu.shape == (1,) and sigma.shape == (1, 1)
  np.testing.assert_allclose(sigma, [[np.var([0, 1, 2, 5], ddof=1)]], rtol=1e-12)
  np.testing.assert_allclose(metrics.fid_from_stats(mu, sigma, mu + 2, sigma), 4.0,
                             rtol=1e-9)


def test_fid_and_kid_refuse_non_finite_inputs_by_name():
  """Before: scipy's 'Internal error in scipy.linalg.sqrtm: -102' (or NaN)."""
  rng = np.random.default_rng(17)
  good = rng.normal(size=(30, 4))
  mu, sigma = metrics.stats_from_features(good)
  for value in (np.nan, np.inf):
    bad = good.copy()
    bad[3, 1] = value
    with np.errstate(invalid="ignore"):
      bad_mu, bad_sigma = metrics.stats_from_features(bad)
    with pytest.raises(ValueError, match="FID statistics are not finite: mu1, sigma1 "
                       "hold NaN or inf"):
      metrics.fid_from_stats(bad_mu, bad_sigma, mu, sigma)
    with pytest.raises(ValueError, match="sigma2 holds NaN or inf"):
      metrics.fid_from_stats(mu, sigma, mu, bad_sigma)
    with pytest.raises(ValueError, match="KID's features are not finite: features2"):
      metrics.kernel_inception_distance(good, bad, subset_size=10, num_subsets=2)


def test_inception_score_is_finite_for_confident_logits():
  """A class that no sample of a split predicts has p(y) = 0 there in float64
  (exp(-1000) underflows): log p(y) was -inf and 0 * inf gave NaN."""
  k = 10
  classes = np.r_[np.arange(20) % 5, 5 + np.arange(20) % 5]  # split 2: classes 5..9
  logits = 1000.0 * np.eye(k)[classes]
  mean, std = metrics.inception_score(logits, splits=2)
  np.testing.assert_allclose(mean, 5.0, rtol=1e-12)  # 5 classes, equally often
  assert std < 1e-12
  # Huge, finite logits of every sign, far beyond float64's exp range.
  wild = np.random.default_rng(18).normal(size=(40, 12)) * 1e6
  mean, std = metrics.inception_score(wild, splits=4)
  assert np.isfinite(mean) and np.isfinite(std) and 1 <= mean <= 12
  for value in (np.nan, np.inf):
    bad = logits.copy()
    bad[7, 2] = value
    with pytest.raises(ValueError, match="input is not finite: logits holds NaN or inf"):
      metrics.inception_score(bad, splits=2)
