"""`python -m ddpm_jax.evaluate`: bits/dim against calc_bpd_loop, and its errors."""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets

from ddpm_jax import checkpointing
from ddpm_jax import diffusion
from ddpm_jax import input_pipeline
from ddpm_jax import models
from ddpm_jax.metrics import bpd

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
  # Example i's noise: fold_in(PRNGKey(seed), i), one key per example.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(5), i))(
      jnp.minimum(jnp.arange(24), 19))
  for i in range(3):
    out = diffusion.calc_bpd_loop(d, model_fn, jnp.asarray(x[8 * i:8 * i + 8]),
                                  keys[8 * i:8 * i + 8])
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


def test_evaluate_bpd_does_not_depend_on_the_batch_size(pretrained_run):
  """Per-example noise: batches of 4 (5 batches) and 16 (one padded batch) agree."""
  config, params, _ = checkpointing.load_params(pretrained_run)
  small, large = (bpd.evaluate_bpd(config, params, batch_size=b, num_examples=12,
                                   seed=2, progress=False) for b in (4, 16))
  for key in ("total_bpd", "prior_bpd", "decoder_bpd", "vb_sum_bpd"):
    np.testing.assert_allclose(small[key], large[key], rtol=1e-5)
  np.testing.assert_allclose(small["vb_per_t"], large["vb_per_t"], rtol=1e-4, atol=1e-7)
  other_seed = bpd.evaluate_bpd(config, params, batch_size=4, num_examples=12, seed=3,
                                progress=False)
  assert abs(other_seed["vb_sum_bpd"] - small["vb_sum_bpd"]) > 1e-6


def test_evaluate_bpd_pads_no_wider_than_the_examples(pretrained_run, monkeypatch):
  """12 examples at --batch_size 64: one batch of 16 (8 devices), not 64 rows."""
  config, params, _ = checkpointing.load_params(pretrained_run)
  asked = []
  create = input_pipeline.create_eval_iterator
  monkeypatch.setattr(input_pipeline, "create_eval_iterator",
                      lambda *a, **kw: asked.append(kw["batch_size"]) or create(*a, **kw))
  wide = bpd.evaluate_bpd(config, params, batch_size=64, num_examples=12, seed=2,
                          progress=False)
  narrow = bpd.evaluate_bpd(config, params, batch_size=16, num_examples=12, seed=2,
                            progress=False)
  assert asked == [16, 16]
  np.testing.assert_allclose(wide["total_bpd"], narrow["total_bpd"], rtol=1e-6)


def test_evaluate_bpd_reports_the_split_it_read(pretrained_run, monkeypatch):
  """tfds reads LSUN's 'test' from 'validation': the result says so (it said
  'test', and the same numbers asked as 'validation' were filed apart)."""
  config, params, _ = checkpointing.load_params(pretrained_run)
  create = input_pipeline.create_source

  def without_a_test_split(config, split):
    source = create(config, "test")  # the digits test images, standing in
    source.split = "validation" if split == "test" else split
    return source

  monkeypatch.setattr(input_pipeline, "create_source", without_a_test_split)
  result = bpd.evaluate_bpd(config, params, batch_size=8, num_examples=4,
                            progress=False)
  assert result["split"] == "validation" and result["num_examples"] == 4


def test_evaluate_bpd_refuses_a_seed_that_prng_key_would_wrap(pretrained_run):
  """PRNGKey keeps a seed's low 32 bits: 2**32 gave seed 0's numbers, saved
  under seed 4294967296's name."""
  config, params, _ = checkpointing.load_params(pretrained_run)
  for seed in (2**32, -1, 1.5):
    with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.4294967295"):
      bpd.evaluate_bpd(config, params, num_examples=2, seed=seed, progress=False)


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
  path = os.path.join(pretrained_run, "eval", "bpd_test_step0_ema_n10.json")
  with open(path) as f:
    saved = json.load(f)
  assert saved["num_examples"] == 10 and len(saved["vb_per_t"]) == 20
  assert (saved["params"], saved["split"], saved["seed"], saved["batch_size"],
          saved["step"]) == ("ema", "test", 0, 4, 0)
  assert f"{saved['total_bpd']:.4f}" in r.stdout and path in r.stdout
  # Other settings write their own file and leave this one as it was.
  r = run_cli("--workdir", pretrained_run, "--metric", "bpd", "--num_examples", "4",
              "--batch_size", "4", "--params", "raw", "--seed", "3", "--dtype",
              "bfloat16")
  assert r.returncode == 0, r.stderr
  with open(os.path.join(pretrained_run, "eval",
                         "bpd_test_step0_raw_bfloat16_n4_seed3.json")) as f:
    raw = json.load(f)
  assert (raw["params"], raw["num_examples"], raw["seed"], raw["dtype"]) == (
      "raw", 4, 3, "bfloat16")
  assert saved["dtype"] == "float32"
  with open(path) as f:
    assert json.load(f) == saved
  # The bound of the bfloat16 network, as the library computes it.
  config, params, _ = checkpointing.load_params(pretrained_run, which="params")
  want = {}
  for dtype in ("bfloat16", "float32"):
    config.model.dtype = dtype
    want[dtype] = bpd.evaluate_bpd(config, params, batch_size=8, num_examples=4,
                                   seed=3, progress=False)["total_bpd"]
  # bfloat16 moves the bound by ~4e-4 relative here; the CLI's (2 devices,
  # not 8) is far closer to the library's bfloat16 value than that.
  gap = abs(want["bfloat16"] - want["float32"])
  assert gap > 1e-4 * want["float32"], want
  assert abs(raw["total_bpd"] - want["bfloat16"]) < 0.25 * gap, (raw["total_bpd"], want)


def test_cli_errors(pretrained_run, tmp_path):
  r = run_cli("--workdir", pretrained_run, "--metric", "bpd,nll")
  assert r.returncode == 1 and "'nll'" in r.stderr and "bpd, fid" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--metric", "")
  assert r.returncode == 1 and "--metric needs one or more of bpd,fid,is,kid" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--metric", "fid", "--num_samples", "10")
  assert r.returncode == 1 and "pt_inception-2015-12-05" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--num_examples", "1000")
  assert r.returncode == 1 and "num_examples" in r.stderr
  r = run_cli("--workdir", str(tmp_path))
  assert r.returncode == 1 and "not a run directory" in r.stderr


def test_bits_per_dim_refuses_a_super_resolution_run_before_computing():
  from configs import digits_sr  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"super-resolution model "
                     r"\(model.low_res_size=8\): its likelihood is conditional"):
    bpd.check_inputs(digits_sr.get_config("test"))


def test_cli_checks_every_metric_before_computing(pretrained_run, tmp_path):
  """FID's setup is refused before the bits/dim pass, not after it."""
  eval_dir = os.path.join(pretrained_run, "eval")
  before = sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []
  r = run_cli("--workdir", pretrained_run, "--metric", "bpd,fid", "--steps", "5000")
  assert r.returncode == 1 and "5000" in r.stderr and "T=20" in r.stderr
  assert "bits/dim" not in r.stdout
  r = run_cli("--workdir", pretrained_run, "--metric", "bpd,fid", "--sampler", "ddim",
              "--steps", "5")
  assert r.returncode == 1 and "pt_inception-2015-12-05" in r.stderr
  assert "bits/dim" not in r.stdout
  # And bits/dim's inputs before FID's (here the weights, which are missing).
  r = run_cli("--workdir", pretrained_run, "--metric", "bpd,fid", "--split", "nope")
  assert r.returncode == 1 and "nope" in r.stderr
  assert (sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []) == before


def test_cli_refuses_bad_samples_and_weights_files(pretrained_run, tmp_path):
  def npz(name, shape, dtype=np.uint8):
    path = str(tmp_path / name)
    np.savez(path, samples=np.zeros(shape, dtype))
    return path

  def garbage(name):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
      f.write(b"not a zip, not a pickle " * 10)
    return path

  def fid(*args):
    return run_cli("--workdir", pretrained_run, "--metric", "fid", *args)

  # The model makes 8x8 greyscale digits: 2x upsampled or RGB samples are
  # not its samples.
  for shape in [(20, 16, 16, 1), (20, 8, 8, 3), (20, 8, 8)]:
    r = fid("--samples", npz("x.npz", shape))
    assert r.returncode == 1 and "needs uint8 [N, 8, 8, 1]" in r.stderr, shape
    assert str(list(shape)) in r.stderr
  r = fid("--samples", npz("x.npz", (20, 8, 8, 1)), "--num_samples", "50", "--steps", "5")
  assert r.returncode == 1 and "--num_samples, --steps set how samples are drawn" in r.stderr
  r = fid("--samples", npz("x.npz", (20, 8, 8, 1), np.float32))
  assert r.returncode == 1 and "float32" in r.stderr
  r = fid("--samples", garbage("bad.npz"))
  assert r.returncode == 1 and "allow_pickle" not in r.stderr
  assert "bad.npz is not a valid .npz file of samples" in r.stderr
  good = npz("good.npz", (20, 8, 8, 1))
  r = fid("--samples", good, "--inception_weights", garbage("inception.npz"))
  assert r.returncode == 1 and "allow_pickle" not in r.stderr
  assert "inception.npz is not a valid .npz file of Inception weights" in r.stderr
  r = fid("--samples", good, "--inception_weights", garbage("inception.pth"))
  assert r.returncode == 1 and "weights_only" not in r.stderr
  assert "not a readable torch weights file" in r.stderr and "Re-download" in r.stderr
  assert "Traceback" not in r.stderr


def test_cli_refuses_flags_no_asked_metric_reads(pretrained_run, tmp_path):
  """Flags that would be silently ignored, and paths that are not what they must
  be, are refused in one line (before: ignored, or a bare errno message)."""
  import shutil  # pylint: disable=g-import-not-at-top
  for args, message in [
      (["--metric", "bpd", "--sampler", "ddim", "--steps", "5"],
       "--sampler, --steps set FID/IS/KID's samples and weights, but --metric bpd"),
      (["--metric", "is", "--num_examples", "4"], "--num_examples set bits/dim's data"),
      (["--metric", "is", "--num_reference", "5"], "--num_reference sets FID/KID's"),
      (["--metric", "is", "--stats_cache", str(tmp_path)],
       "--stats_cache sets FID/KID's reference statistics; the Inception Score has none"),
      (["--metric", "is", "--stats_cache", str(tmp_path), "--num_reference", "5"],
       "--num_reference, --stats_cache set FID/KID's"),
      (["--metric", "fid", "--eta", "0.5"], "--eta is DDIM's noise scale; the ancestral"),
      (["--metric", "fid,is", "--samples", str(tmp_path / "s.npz"), "--dtype", "bfloat16"],
       "--dtype sets the network's compute dtype, but scoring --samples runs no network"),
      (["--metric", "fid", "--samples", str(tmp_path)], "(it is a directory)"),
      (["--metric", "fid", "--samples", str(tmp_path / "no.npz")], "no such file"),
      (["--metric", "fid", "--inception_weights", str(tmp_path)],
       "(from --inception_weights / the weights_path argument) is a directory"),
  ]:
    r = run_cli("--workdir", pretrained_run, *args)
    assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
    assert "Traceback" not in r.stderr and "Errno" not in r.stderr, r.stderr
  run = tmp_path / "run"
  shutil.copytree(pretrained_run, run, ignore=shutil.ignore_patterns("eval"))
  (run / "eval").write_text("a file where the results go")
  r = run_cli("--workdir", str(run), "--metric", "bpd", "--num_examples", "2")
  assert r.returncode == 1 and "The results directory" in r.stderr, r.stderr
  assert "is a file, not a directory" in r.stderr and "Errno" not in r.stderr


def test_cli_checks_the_stats_cache_can_be_written_before_any_work(pretrained_run,
                                                                 tmp_path):
  """Before: a bare errno after the Inception pass (and after drawing the
  samples), or, where the directory exists, nothing until then."""
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  unwritable = [str(blocker / "fid_stats")]  # cannot be created
  # A directory that exists but takes no files even for root (os.access says
  # it does).
  try:
    open("/sys/kernel/.ddpm_jax_probe", "w").close()
    os.remove("/sys/kernel/.ddpm_jax_probe")
  except OSError:
    if os.path.isdir("/sys/kernel"):
      unwritable.append("/sys/kernel")
  for cache in unwritable:
    # No --inception_weights: the cache is refused before the weights are read.
    r = run_cli("--workdir", pretrained_run, "--metric", "is,fid", "--stats_cache", cache)
    assert r.returncode == 1, r.stderr
    assert f"--stats_cache {cache} cannot be written to" in r.stderr, r.stderr
    assert "Errno" not in r.stderr and "pt_inception" not in r.stderr, r.stderr
  assert os.listdir(tmp_path) == ["a_file"]


_NAMES = r"""
import json, os, sys
from ddpm_jax import evaluate
names = []
for argv, setup in json.loads(sys.argv[1]):
  evaluate.FLAGS.unparse_flags()
  evaluate.FLAGS(["evaluate", "--workdir=w"] + argv)
  if setup is None:
    names.append(os.path.basename(
        evaluate.bpd_path("eval", 0, 150, evaluate.FLAGS.split)))
  else:
    names.append(os.path.basename(
        evaluate.sample_metrics_path("eval", ["fid"], 0, setup)))
print(json.dumps(names))
"""


def result_names(*cases):
  """evaluate's result file names, one per (flags, setup) case (setup None:
  bits/dim's), in a process of their own (the flags are absl's globals)."""
  r = subprocess.run([sys.executable, "-c", _NAMES, json.dumps(cases)], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout)


def test_result_names_tell_apart_what_changes_the_numbers():
  """Before: the samples file's basename alone, no weights, eta to 6 digits
  and split slices folded together, so these pairs shared one file."""
  def setup(samples="a" * 64, weights="0" * 64):
    return {"num_samples": 20, "num_reference": 24, "samples_sha256": samples,
            "weights_sha256": weights}

  ref = ["--num_reference=24"]
  names = result_names(
      # 0, 1: two files called samples.npz
      (["--samples=A/samples.npz"] + ref, setup()),
      (["--samples=B/samples.npz"] + ref, setup(samples="b" * 64)),
      # 2: the same samples with other weights
      (["--samples=A/samples.npz"] + ref, setup(weights="1" * 64)),
      # 3, 4: names that read alike, other contents
      (["--samples=my samples.npz"], setup()),
      (["--samples=my-samples.npz"], setup(samples="c" * 64)),
      # 5, 6: eta beyond 6 significant digits
      (["--sampler=ddim", "--steps=50", "--eta=0.1234567"], setup(samples=None)),
      (["--sampler=ddim", "--steps=50", "--eta=0.1234568"], setup(samples=None)),
      # 7, 8: drawn samples, other weights
      ([], setup(samples=None)),
      ([], setup(samples=None, weights="1" * 64)),
      # 9, 10, 11: bits/dim of two slices of equal size, and of the whole split
      (["--split=test[:150]"], None),
      (["--split=test[150:]"], None),
      ([], None),
  )
  for a, b in [(0, 1), (0, 2), (3, 4), (5, 6), (7, 8), (9, 10)]:
    assert names[a] != names[b], (names[a], names[b])
  # Still readable.
  assert names[0] == "fid_samples-samples-aaaaaaaa_n20_ref24_inception00000000.json"
  assert names[3] == "fid_samples-my-samples-aaaaaaaa_n20_inception00000000.json"
  assert names[5] == "fid_step0_ema_ddim-50-eta0.1234567_n20_inception00000000.json"
  assert names[7] == "fid_step0_ema_ancestral-all_n20_inception00000000.json"
  assert names[9].startswith("bpd_test-150-") and names[9].endswith("_step0_ema_n150.json")
  assert names[11] == "bpd_test_step0_ema_n150.json"


def test_cli_inception_score_needs_two_samples_per_split(pretrained_run, tmp_path):
  few = str(tmp_path / "few.npz")
  np.savez(few, samples=np.zeros((19, 8, 8, 1), np.uint8))
  r = run_cli("--workdir", pretrained_run, "--metric", "is", "--samples", few)
  assert r.returncode == 1 and "at least 20 samples; got 19" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--metric", "fid,is", "--num_samples", "10")
  assert r.returncode == 1 and "at least 20 samples; got 10" in r.stderr


def random_inception_weights(peer, path) -> str:
  """torch-fidelity's Inception (`peer`, random weights) saved at `path` in
  the .npz form `--inception_weights` reads."""
  np.savez(path, **{k: v.numpy() for k, v in peer.state_dict().items()
                    if not k.endswith("num_batches_tracked")})
  return str(path)


def library_scores(weights, config, samples, num_reference) -> dict:
  """FID, IS and KID (with their stds) of uint8 `samples` against the run's
  first `num_reference` training images, through the library API."""
  from ddpm_jax import metrics  # pylint: disable=g-import-not-at-top
  module, inception = metrics.load_inception(weights)
  feats = metrics.inception_features(module, inception, samples, batch_size=8)
  source = input_pipeline.create_source(config, "train")
  ref = metrics.inception_features(
      module, inception, np.stack([source[i]["image"] for i in range(num_reference)]),
      batch_size=8)["pool3"]
  scores = {"fid": metrics.fid_from_stats(*metrics.stats_from_features(feats["pool3"]),
                                          *metrics.stats_from_features(ref))}
  scores["is"], scores["is_std"] = metrics.inception_score(feats["logits"], 10)
  scores["kid"], scores["kid_std"] = metrics.kernel_inception_distance(
      feats["pool3"], ref, subset_size=min(len(samples), num_reference))
  return scores


@pytest.mark.slow
def test_cli_fid_is_kid_end_to_end_with_random_inception(pretrained_run, peer,
                                                         tmp_path):
  """The whole FID path against a recomputation through the library API."""
  from ddpm_jax import generation, metrics  # pylint: disable=g-import-not-at-top
  weights = random_inception_weights(peer, tmp_path / "inception.npz")
  cache = str(tmp_path / "cache")
  r = run_cli("--workdir", pretrained_run, "--metric", "kid,is,fid",
              "--num_samples", "20", "--batch_size", "8", "--num_reference",
              "12", "--sampler", "ddim", "--steps", "5", "--inception_weights",
              weights, "--stats_cache", cache)
  assert r.returncode == 0, r.stderr
  w = metrics.file_sha256(weights)[:8]
  with open(os.path.join(pretrained_run, "eval",
                         f"fid_is_kid_step0_ema_ddim-5_n20_ref12_inception{w}.json")) as f:
    saved = json.load(f)
  assert len(os.listdir(cache)) == 1  # the reference statistics, cached
  assert (saved["params"], saved["sampler"], saved["steps"], saved["seed"],
          saved["num_reference"], saved["is_splits"], saved["kid_subset_size"]) == (
              "ema", "ddim", "5", 0, 12, 10, 12)
  assert saved["inception_weights_sha256"] == metrics.file_sha256(weights)
  config, params, _ = checkpointing.load_params(pretrained_run)
  samples = generation.generate(
      config, params, num_samples=20, batch_size=8, progress=False,
      options=generation.SamplerOptions(sampler="ddim", steps="5"))["samples"]
  want = library_scores(weights, config, samples, 12)
  for k in ("fid", "is", "is_std", "kid", "kid_std"):
    np.testing.assert_allclose(saved[k], want[k], rtol=1e-3, err_msg=k)
  assert saved["num_samples"] == 20
  # The same samples from a file: scored alike, in a file named after it
  # and its content.
  path = str(tmp_path / "my_samples.npz")
  np.savez(path, samples=samples)
  r = run_cli("--workdir", pretrained_run, "--metric", "fid", "--samples", path,
              "--batch_size", "8", "--num_reference", "12", "--inception_weights",
              weights, "--stats_cache", cache)
  assert r.returncode == 0, r.stderr
  sha = metrics.file_sha256(path)
  name = f"fid_samples-my_samples-{sha[:8]}_n20_ref12_inception{w}.json"
  with open(os.path.join(pretrained_run, "eval", name)) as f:
    from_file = json.load(f)
  np.testing.assert_allclose(from_file["fid"], saved["fid"], rtol=1e-6)
  assert from_file["samples_file"] == path and "sampler" not in from_file
  assert from_file["samples_sha256"] == sha
  # Other samples under the same file name write a file of their own.
  (tmp_path / "other").mkdir()
  other = str(tmp_path / "other" / "my_samples.npz")
  np.savez(other, samples=samples[::-1].copy())
  r = run_cli("--workdir", pretrained_run, "--metric", "fid", "--samples", other,
              "--batch_size", "8", "--num_reference", "12", "--inception_weights",
              weights, "--stats_cache", cache)
  assert r.returncode == 0, r.stderr
  other_sha = metrics.file_sha256(other)
  assert other_sha[:8] != sha[:8]
  assert os.path.isfile(os.path.join(
      pretrained_run, "eval", f"fid_samples-my_samples-{other_sha[:8]}_n20_ref12_"
      f"inception{w}.json"))
  with open(os.path.join(pretrained_run, "eval", name)) as f:
    assert json.load(f) == from_file


_SHARED_FEATURES_SCRIPT = """
import sys
import numpy as np
from ddpm_jax import parallel
parallel.initialize_distributed()
import jax
from absl import flags
from ddpm_jax import evaluate, metrics
from tiny_models import TinyFeatures, tiny_config, tiny_features_params
out, = sys.argv[1:]
flags.FLAGS(["evaluate", "--workdir", out, "--batch_size", "6",
             "--stats_cache", out + "/cache"])
inputs = np.load(out + "/inputs.npz")
samples, references = inputs["samples"], inputs["references"]
calls = []  # the number of images of each Inception pass here
real = metrics.inception_features

def counting(module, params, images, **kwargs):
  chunks = [images] if isinstance(images, np.ndarray) else list(images)
  calls.append(sum(map(len, chunks)))
  return real(module, params, chunks, **kwargs)

metrics.inception_features = counting
setup = {"module": TinyFeatures(), "inception_params": tiny_features_params(),
         "source": [{"image": x} for x in references], "num_reference": len(references),
         "weights_sha256": "0" * 64}
got = {}
for n in (len(samples), 1):  # 1: process 1's block lies past the end
  feats = evaluate._shared_features(setup, n, lambda a, b: samples[a:b],
                                    ["pool3", "logits"], progress=False)
  got.update({f"{k}_{n}": v for k, v in feats.items()})
got["calls_samples"] = list(calls)
first = jax.process_index() == 0
for phase in ("computed", "cached"):
  calls.clear()
  ref = evaluate._reference_stats(tiny_config(), setup, keep_features=True, first=first)
  got[f"calls_{phase}"] = list(calls)
  if first:
    got.update({f"{k}_{phase}": ref[k] for k in ("mu", "sigma", "features")})
  else:
    assert ref is None
np.savez(f"{out}/got_{jax.process_index()}.npz", **got)
"""


def test_two_processes_share_the_inception_passes(tmp_path):
  """2 processes x 2 CPU devices: each scores its block of the samples and
  (on a cache miss only) of the reference images; every process gets all
  the features, process 0 the statistics, equal to one pass on 8 devices."""
  from ddpm_jax import metrics  # pylint: disable=g-import-not-at-top
  from tiny_models import TinyFeatures, tiny_features_params  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / "worker.py"
  script.write_text(_SHARED_FEATURES_SCRIPT)
  # 21 samples and 13 reference images: blocks of 11 and 10, of 7 and 6.
  rng = np.random.default_rng(3)
  samples = rng.integers(0, 256, (21, 8, 8, 1), dtype=np.uint8)
  references = rng.integers(0, 256, (13, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / "inputs.npz", samples=samples, references=references)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES="2",
             PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests")]))
  procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=root,
                            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  got = [dict(np.load(tmp_path / f"got_{i}.npz")) for i in range(2)]

  module, params = TinyFeatures(), tiny_features_params()
  want = metrics.inception_features(module, params, samples, batch_size=8)
  want_ref = metrics.inception_features(module, params, references, batch_size=8)["pool3"]
  for g in got:
    for k in ("pool3", "logits"):
      np.testing.assert_allclose(g[f"{k}_21"], want[k], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(g[f"{k}_1"], want[k][:1], rtol=1e-5, atol=1e-6)
  # Each process scored its block (of 11 and 10 samples; of 1, and the last
  # image again), and of 7 and 6 reference images on the miss, none on the hit.
  assert [list(g["calls_samples"]) for g in got] == [[11, 1], [10, 1]]
  assert [list(g["calls_computed"]) for g in got] == [[7], [6]]
  assert [list(g["calls_cached"]) for g in got] == [[], []]
  mu, sigma = metrics.stats_from_features(want_ref)
  for phase in ("computed", "cached"):
    np.testing.assert_allclose(got[0][f"features_{phase}"], want_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0][f"mu_{phase}"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0][f"sigma_{phase}"], sigma, rtol=1e-4, atol=1e-6)
  assert len(os.listdir(tmp_path / "cache")) == 1
