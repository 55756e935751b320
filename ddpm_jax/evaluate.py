"""Evaluate a run: test-set bits/dim, and FID / IS / KID of its samples.

  python -m ddpm_jax.evaluate --workdir DIR --metric bpd [--split test] [--num_examples N]
  python -m ddpm_jax.evaluate --workdir DIR --metric fid,is,kid --num_samples 50000 \
      [--samples samples.npz] [--inception_weights pt_inception-2015-12-05-6726825d.pth]

bits/dim is the full variational bound (`diffusion.calc_bpd_loop`) of every
example of the split, reported as in the DDPM paper's Table 2. FID/IS/KID use
the FID Inception-v3 on uint8 samples (drawn here, or read from `--samples`,
an .npz written by `python -m ddpm_jax.sample`) against the training set's
statistics, computed once and cached. Results are printed and saved as JSON
under WORKDIR/eval/.
"""
import json
import os

import numpy as np
from absl import app
from absl import flags

from ddpm_jax import cli
from ddpm_jax import cpu_memory

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (training run or converted model).")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "EMA parameters (default) or the raw ones.")
flags.DEFINE_list("metric", ["bpd"], "Comma-separated: bpd, fid, is, kid.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (bpd, sampling, Inception).")
flags.DEFINE_integer("seed", 0, "Root seed of the bound's noise and of the samples.")
# bits/dim
flags.DEFINE_string("split", "test", "Data split for bits/dim.")
flags.DEFINE_integer("num_examples", None, "Evaluate the first N examples (default: all).")
# FID / IS / KID
flags.DEFINE_integer("num_samples", 50000, "Samples for FID/IS/KID (50k is the protocol).")
flags.DEFINE_string("samples", None, "An .npz of uint8 samples to score instead of sampling.")
flags.DEFINE_enum("sampler", "ancestral", ["ancestral", "ddim"], "Sampler for FID samples.")
flags.DEFINE_string("steps", None, "Sampling steps: K, 'ddimK' or 'a,b,c' (default: all T).")
flags.DEFINE_float("eta", 0.0, "DDIM noise scale.")
flags.DEFINE_string("inception_weights", None,
                    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its "
                    ".npz conversion (default: $DDPM_JAX_INCEPTION_WEIGHTS).")
flags.DEFINE_integer("num_reference", None,
                     "Use the first N training images for the reference statistics "
                     "(default: the whole training split, the protocol).")
flags.DEFINE_string("stats_cache", os.path.join("~", ".cache", "ddpm_jax", "fid_stats"),
                    "Directory caching the training set's Inception statistics.")
flags.mark_flags_as_required(["workdir"])

METRICS = ("bpd", "fid", "is", "kid")


def _write_json_atomic(path: str, data: dict) -> None:
  from ddpm_jax import files  # pylint: disable=g-import-not-at-top
  with files.atomic_write(path, "w") as f:
    json.dump(data, f, indent=2)


def _training_images(source, count):
  """The first `count` training images as uint8 [n, H, W, C] chunks, in order."""
  chunk = 1000
  for start in range(0, count, chunk):
    yield np.stack([source[i]["image"] for i in range(start, min(start + chunk, count))])


def sample_metrics(config, params, metrics, *, step) -> dict:
  """FID / IS / KID of samples (drawn now or read from --samples)."""
  from ddpm_jax import generation  # pylint: disable=g-import-not-at-top
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from ddpm_jax import metrics as m  # pylint: disable=g-import-not-at-top

  module, inception_params = m.load_inception(FLAGS.inception_weights)  # fails early
  source = input_pipeline.create_source(config, "train")
  num_reference = FLAGS.num_reference or len(source)
  if not 2 <= num_reference <= len(source):
    raise ValueError(f"--num_reference must be in [2, {len(source)}] (the training "
                     f"split's size), got {num_reference}.")
  if FLAGS.samples:
    with np.load(FLAGS.samples) as f:
      if "samples" not in f.files:
        raise ValueError(f"{FLAGS.samples} has no 'samples' array (it has {f.files}).")
      samples = f["samples"]
    origin = FLAGS.samples
  else:
    options = generation.SamplerOptions(sampler=FLAGS.sampler, steps=FLAGS.steps,
                                        eta=FLAGS.eta)
    generation.sampling_diffusion(config, options)  # bad options fail before work
    samples = generation.generate(config, params, num_samples=FLAGS.num_samples,
                                  batch_size=FLAGS.batch_size, options=options,
                                  seed=FLAGS.seed)["samples"]
    origin = f"{FLAGS.num_samples} {FLAGS.sampler} samples (steps={FLAGS.steps or 'T'})"
  if samples.dtype != np.uint8 or samples.ndim != 4:
    raise ValueError(f"Samples must be uint8 [N, H, W, C], got {samples.dtype} "
                     f"{samples.shape}.")
  feats = m.inception_features(module, inception_params, samples,
                               batch_size=FLAGS.batch_size, progress=True)
  result = {"samples": origin, "num_samples": int(len(samples)), "step": step}
  if "is" in metrics:
    result["is"], result["is_std"] = m.inception_score(
        feats["logits"], splits=min(10, len(samples)))
  if "fid" in metrics or "kid" in metrics:
    weights = FLAGS.inception_weights or os.environ.get(m.WEIGHTS_ENV_VAR, "")
    name = (f"{config.data.dataset}-train{num_reference}-{config.data.image_size}"
            f"x{config.data.channels}")
    ref = m.reference_stats(
        name, lambda: m.inception_features(
            module, inception_params, _training_images(source, num_reference),
            batch_size=FLAGS.batch_size, progress=True)["pool3"],
        os.path.expanduser(FLAGS.stats_cache), keep_features="kid" in metrics,
        fingerprint=os.path.basename(weights))
    result["reference"] = f"{name} ({int(ref['num_examples'])} images)"
    if "fid" in metrics:
      mu, sigma = m.stats_from_features(feats["pool3"])
      result["fid"] = m.fid_from_stats(mu, sigma, ref["mu"], ref["sigma"])
    if "kid" in metrics:
      n = min(len(samples), len(ref["features"]), 1000)
      result["kid"], result["kid_std"] = m.kernel_inception_distance(
          feats["pool3"], ref["features"], subset_size=n)
  return result


def run(argv) -> None:
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  metrics = [x.strip().lower() for x in FLAGS.metric]
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown or not metrics:
    raise ValueError(f"Unknown metric(s) {unknown}; choose from {', '.join(METRICS)}.")
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from ddpm_jax.metrics import bpd  # pylint: disable=g-import-not-at-top

  config, params, step = checkpointing.load_params(
      FLAGS.workdir, step=FLAGS.step,
      which="ema" if FLAGS.params == "ema" else "params")
  writer = jax.process_index() == 0
  eval_dir = os.path.join(FLAGS.workdir, "eval")
  if "bpd" in metrics:
    result = bpd.evaluate_bpd(config, params, split=FLAGS.split,
                              batch_size=FLAGS.batch_size,
                              num_examples=FLAGS.num_examples, seed=FLAGS.seed)
    result["step"] = step
    path = os.path.join(eval_dir, f"bpd_{FLAGS.split}_step{step}.json")
    if writer:
      _write_json_atomic(path, result)
    print(f"{FLAGS.split} bits/dim at step {step} over {result['num_examples']} "
          f"examples: {result['total_bpd']:.4f}  (L_T prior {result['prior_bpd']:.4f}, "
          f"L_0 decoder {result['decoder_bpd']:.4f}, sum L_1..L_T-1 "
          f"{result['vb_sum_bpd']:.4f}) -> {path}", flush=True)
  sample_wanted = [x for x in metrics if x != "bpd"]
  if sample_wanted:
    result = sample_metrics(config, params, sample_wanted, step=step)
    path = os.path.join(eval_dir, f"{'_'.join(sample_wanted)}_step{step}.json")
    if writer:
      _write_json_atomic(path, result)
    parts = [f"{k.upper()} {result[k]:.4f}" for k in ("fid", "is", "kid") if k in result]
    print(f"{', '.join(parts)} of {result['num_samples']} samples at step {step} "
          f"-> {path}", flush=True)


def main(argv):
  cli.exit_on_user_error(cpu_memory.reuse_scratch)  # before JAX starts
  cli.quiet_orbax()
  cli.exit_on_user_error(run, argv)


if __name__ == "__main__":
  app.run(main)
