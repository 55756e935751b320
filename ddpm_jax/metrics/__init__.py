"""Sample-quality metrics: FID, Inception Score and KID with the FID Inception-v3.

Typical use (what `python -m ddpm_jax.evaluate --metric fid,is,kid` does):

  module, params = load_inception(weights_path)  # None: $DDPM_JAX_INCEPTION_WEIGHTS
  feats = inception_features(module, params, samples_uint8, batch_size=200)
  ref = reference_stats('cifar10-train-32', lambda: inception_features(
      module, params, train_images_uint8)['pool3'], cache_dir, keep_features=True,
      fingerprint=file_sha256(weights_path))  # other weights: recomputed
  fid = fid_from_stats(*stats_from_features(feats['pool3']), ref['mu'], ref['sigma'])
  is_mean, is_std = inception_score(feats['logits'])
  kid_mean, kid_std = kernel_inception_distance(feats['pool3'], ref['features'])
"""
from ddpm_jax.files import file_sha256
from ddpm_jax.metrics.features import bilinear_resize_matrix
from ddpm_jax.metrics.features import inception_features
from ddpm_jax.metrics.features import preprocess
from ddpm_jax.metrics.inception import InceptionV3
from ddpm_jax.metrics.inception import WEIGHTS_ENV_VAR
from ddpm_jax.metrics.inception import WEIGHTS_URL
from ddpm_jax.metrics.inception import load_inception
from ddpm_jax.metrics.inception import resolve_weights_path
from ddpm_jax.metrics.inception import params_from_state_dict
from ddpm_jax.metrics.stats_cache import load_stats
from ddpm_jax.metrics.stats_cache import read_npz
from ddpm_jax.metrics.stats_cache import reference_key
from ddpm_jax.metrics.stats_cache import reference_stats
from ddpm_jax.metrics.stats_cache import save_stats
from ddpm_jax.metrics.scores import MIN_SAMPLES_PER_SPLIT
from ddpm_jax.metrics.scores import fid_from_stats
from ddpm_jax.metrics.scores import inception_score
from ddpm_jax.metrics.scores import kernel_inception_distance
from ddpm_jax.metrics.scores import stats_from_features
