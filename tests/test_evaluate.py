"""`python -m ddpm_jax.evaluate`: bits/dim against calc_bpd_loop, and its errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets

from ddpm_jax import checkpointing
from ddpm_jax import diffusion
from ddpm_jax import models
from ddpm_jax.metrics import bpd
from test_metrics import peer  # noqa: F401  (a fixture: torch-fidelity's Inception)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_test_images(n):
  """The first n test digits, independently of the input pipeline."""
  images = datasets.load_digits().images[-297:][:n]  # values 0..16
  x = np.round(images * 255 / 16) / 127.5 - 1.0
  return x[..., None].astype(np.float32)


def test_evaluate_bpd_equals_calc_bpd_loop_per_batch(pretrained_run):
  config, params, _ = checkpointing.load_params(pretrained_run)
  result = bpd.evaluate_bpd(config, params, batch_size=8, num_examples=20,
                            seed=5, progress=False)
  model = models.create_model(config)
  d = models.create_diffusion(config)
  model_fn = lambda x, t: model.apply({"params": params}, x, t)
  x = digits_test_images(20)
  x = np.concatenate([x, np.full((4, 8, 8, 1), -1.0, np.float32)])  # padding
  totals, priors, decoders, sums, per_t = [], [], [], [], []
  for i in range(3):
    out = diffusion.calc_bpd_loop(d, model_fn, jnp.asarray(x[8 * i:8 * i + 8]),
                                  jax.random.fold_in(jax.random.PRNGKey(5), i))
    totals.append(out["total_bpd"])
    priors.append(out["prior_bpd"])
    decoders.append(out["vb"][:, 0])
    sums.append(out["vb"][:, 1:].sum(axis=1))
    per_t.append(out["vb"])
  cat = lambda v: np.concatenate(v)[:20]
  assert result["num_examples"] == 20
  np.testing.assert_allclose(result["total_bpd"], cat(totals).mean(), rtol=1e-5)
  np.testing.assert_allclose(result["prior_bpd"], cat(priors).mean(), rtol=1e-5)
  np.testing.assert_allclose(result["decoder_bpd"], cat(decoders).mean(), rtol=1e-5)
  np.testing.assert_allclose(result["vb_sum_bpd"], cat(sums).mean(), rtol=1e-5)
  np.testing.assert_allclose(result["vb_per_t"], cat(per_t).mean(axis=0),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      result["total_bpd"],
      result["prior_bpd"] + result["decoder_bpd"] + result["vb_sum_bpd"],
      rtol=1e-6)
  assert 0 < result["total_bpd"] < 100


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env.pop("DDPM_JAX_INCEPTION_WEIGHTS", None)
  return subprocess.run([sys.executable, "-m", "ddpm_jax.evaluate", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def test_cli_bpd_writes_json(pretrained_run):
  r = run_cli("--workdir", pretrained_run, "--metric", "bpd", "--num_examples", "10",
              "--batch_size", "4")
  assert r.returncode == 0, r.stderr
  path = os.path.join(pretrained_run, "eval", "bpd_test_step0.json")
  with open(path) as f:
    saved = json.load(f)
  assert saved["num_examples"] == 10 and len(saved["vb_per_t"]) == 20
  assert f"{saved['total_bpd']:.4f}" in r.stdout


def test_cli_errors(pretrained_run, tmp_path):
  r = run_cli("--workdir", pretrained_run, "--metric", "bpd,nll")
  assert r.returncode == 1 and "'nll'" in r.stderr and "bpd, fid" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--metric", "fid", "--num_samples", "10")
  assert r.returncode == 1 and "pt_inception-2015-12-05" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--num_examples", "1000")
  assert r.returncode == 1 and "num_examples" in r.stderr
  r = run_cli("--workdir", str(tmp_path))
  assert r.returncode == 1 and "not a run directory" in r.stderr


@pytest.mark.slow
def test_cli_fid_is_kid_end_to_end_with_random_inception(pretrained_run, peer,
                                                         tmp_path):
  """The whole FID path against a recomputation through the library API."""
  from ddpm_jax import generation, input_pipeline, metrics  # pylint: disable=g-import-not-at-top
  weights = str(tmp_path / "inception.npz")
  np.savez(weights, **{k: v.numpy() for k, v in peer.state_dict().items()
                       if not k.endswith("num_batches_tracked")})
  cache = str(tmp_path / "cache")
  r = run_cli("--workdir", pretrained_run, "--metric", "fid,is,kid",
              "--num_samples", "12", "--batch_size", "8", "--num_reference",
              "12", "--sampler", "ddim", "--steps", "5", "--inception_weights",
              weights, "--stats_cache", cache)
  assert r.returncode == 0, r.stderr
  with open(os.path.join(pretrained_run, "eval", "fid_is_kid_step0.json")) as f:
    saved = json.load(f)
  assert len(os.listdir(cache)) == 1  # the reference statistics, cached
  config, params, _ = checkpointing.load_params(pretrained_run)
  samples = generation.generate(
      config, params, num_samples=12, batch_size=8, progress=False,
      options=generation.SamplerOptions(sampler="ddim", steps="5"))["samples"]
  module, inception = metrics.load_inception(weights)
  feats = metrics.inception_features(module, inception, samples, batch_size=8)
  source = input_pipeline.create_source(config, "train")
  ref = metrics.inception_features(
      module, inception, np.stack([source[i]["image"] for i in range(12)]),
      batch_size=8)["pool3"]
  fid = metrics.fid_from_stats(*metrics.stats_from_features(feats["pool3"]),
                               *metrics.stats_from_features(ref))
  np.testing.assert_allclose(saved["fid"], fid, rtol=1e-3)
  np.testing.assert_allclose(saved["is"],
                             metrics.inception_score(feats["logits"], 10)[0],
                             rtol=1e-3)
  assert np.isfinite(saved["kid"]) and saved["num_samples"] == 12
