r"""Evaluate a run: test-set bits/dim, and FID / IS / KID of its samples.

  python -m ddpm_jax.evaluate --workdir DIR --metric bpd [--split test] [--num_examples N]
  python -m ddpm_jax.evaluate --workdir DIR --metric fid,is,kid --num_samples 50000 \
      [--samples samples.npz] [--inception_weights pt_inception-2015-12-05-6726825d.pth]

bits/dim is the full variational bound (`diffusion.calc_bpd_loop`) of every
example of the split, reported as in the DDPM paper's Table 2. FID/IS/KID use
the FID Inception-v3 on uint8 samples (drawn here, or read from `--samples`,
an .npz written by `python -m ddpm_jax.sample`) against the training set's
statistics, computed once and cached (keyed by the weights file's sha256 and
the reference images). Every input of every metric is checked before any is
computed. Results are printed and saved as JSON under WORKDIR/eval/, in a file
named by the settings that change the numbers (`bpd_path`,
`sample_metrics_path`); the JSON records all of them. Several processes (a
TPU pod, SLURM tasks, `launch/local.sh -m evaluate`) share the sampling, the
bound and the Inception passes over all their devices; process 0 writes the
results.
"""
import hashlib
import json
import os
import re
from typing import Optional

import numpy as np
from absl import app
from absl import flags

from ddpm_jax import cli
from ddpm_jax import cpu_memory
from ddpm_jax import files

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (training run or converted model).")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "EMA parameters (default) or the raw ones.")
flags.DEFINE_list("metric", ["bpd"], "Comma-separated: bpd, fid, is, kid.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (bpd, sampling, Inception).")
flags.DEFINE_integer("seed", 0, "Root seed of the bound's noise and of the samples.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "The network's compute dtype for bits/dim and drawn samples "
                  "(default: the run's model.dtype).")
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
cli.define_process_flags()
flags.mark_flags_as_required(["workdir"])

METRICS = ("bpd", "fid", "is", "kid")
# The Inception Score protocol: 10 in-order splits of the samples.
IS_SPLITS = 10


def _write_json_atomic(path: str, data: dict) -> None:
  with files.atomic_write(path, "w") as f:
    json.dump(data, f, indent=2)


def _label(text) -> str:
  """`text` for a file name: runs of characters other than [A-Za-z0-9._-] -> '-'."""
  return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "-"


def _exact_label(text) -> str:
  """`_label(text)`, plus 8 hex digits of `text`'s sha256 when that changed it.

  Different texts get different labels: `test[:150]` and `test[150:]` both
  read `test-150`, and are told apart by the hash; a plain name such as
  `test` stays as it is.
  """
  text = str(text)
  label = _label(text)
  if label != text:
    label += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
  return label


def _training_images(source, start, stop):
  """Training images start..stop-1 as uint8 [n, H, W, C] chunks, in order."""
  chunk = 1000
  for first in range(start, stop, chunk):
    yield np.stack([source[i]["image"] for i in range(first, min(first + chunk, stop))])


def _shared_features(setup: dict, count: int, images, keys, *,
                     progress: bool) -> dict:
  """Inception features of `count` images, each process scoring 1/P of them.

  Args:
    setup: from `prepare_sample_metrics` (the Inception module and params).
    count: how many images, >= 1.
    images: `(start, stop) ->` images start..stop-1 (uint8 [n, H, W, C], or
      an iterable of such chunks), the same images on every process.
    keys: the features wanted, from 'pool3' and 'logits' (only they are
      gathered).
    progress: show this process's progress bar.

  Returns:
    Every image's {'pool3': float32 [count, 2048], 'logits': float32
    [count, 1008]} (those of `keys`) on every process, in order.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from ddpm_jax import metrics as m  # pylint: disable=g-import-not-at-top

  processes = jax.process_count()
  per = -(-count // processes)  # the gather needs one block size
  # A process past the end scores the last image again (dropped below):
  # every block holds at least one image.
  start = min(jax.process_index() * per, count - 1)
  stop = min(start + per, count)
  feats = m.inception_features(
      setup["module"], setup["inception_params"], images(start, stop),
      batch_size=min(-(-FLAGS.batch_size // processes), per), progress=progress,
      total=stop - start)
  feats = {k: feats[k] for k in keys}
  if processes == 1:
    return feats
  feats = {k: np.concatenate([v, np.repeat(v[-1:], per - len(v), axis=0)])
           for k, v in feats.items()}
  gathered = multihost_utils.process_allgather(feats, tiled=True)
  return {k: np.asarray(v)[:count] for k, v in gathered.items()}


def _process_0_says(flag: bool) -> bool:
  """Process 0's `flag`, on every process (each must call this once)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def bpd_path(eval_dir: str, step: int, num_examples: int, split: str,
             dtype_tag: str = "") -> str:
  """`bpd_<split>_step<S>_<params>[_<dtype>]_n<N>[_seed<seed>].json`: one file per setting.

  `split` is the split read (LSUN's 'test' is its 'validation': one name for
  one result). A split that is not a plain name (a slice such as
  `test[:150]`) is written `_exact_label`'s way, `test-150-<8 hex digits of
  its sha256>`.
  """
  seed = f"_seed{FLAGS.seed}" if FLAGS.seed else ""
  return os.path.join(eval_dir, f"bpd_{_exact_label(split)}_step{step}_"
                      f"{FLAGS.params}{dtype_tag}_n{num_examples}{seed}.json")


def sample_metrics_path(eval_dir: str, metrics, step: int, setup: dict,
                        dtype_tag: str = "") -> str:
  """The result file of FID/IS/KID, named by every setting that changes them.

  Drawn samples: `fid_is_kid_step<S>_<params>_<sampler>-<steps|all>[-eta<eta>]
  [_<dtype>]_n<N>[_seed<seed>][_ref<R>]_inception<W>.json`; samples from --samples
  FILE: `fid_is_kid_samples-<FILE's basename>-<F>_n<N>[_ref<R>]_inception<W>
  .json`. F and W are the first 8 hex digits of the sha256 of the samples
  file and of the Inception weights file (`setup`'s 'samples_sha256' and
  'weights_sha256'): other samples or weights never share a file, whatever
  their names. eta is written exactly (`repr`).
  """
  name = "_".join(metrics)
  if FLAGS.samples:
    stem = os.path.splitext(os.path.basename(FLAGS.samples))[0]
    name += f"_samples-{_label(stem)}-{setup['samples_sha256'][:8]}"
  else:
    name += f"_step{step}_{FLAGS.params}_{FLAGS.sampler}-{_label(FLAGS.steps or 'all')}"
    if FLAGS.sampler == "ddim" and FLAGS.eta:
      name += f"-eta{float(FLAGS.eta)!r}"
    name += dtype_tag
  name += f"_n{setup['num_samples']}"
  if not FLAGS.samples and FLAGS.seed:
    name += f"_seed{FLAGS.seed}"
  if FLAGS.num_reference and ("fid" in metrics or "kid" in metrics):
    name += f"_ref{setup['num_reference']}"
  name += f"_inception{setup['weights_sha256'][:8]}"
  return os.path.join(eval_dir, name + ".json")


def prepare_sample_metrics(config, metrics) -> dict:
  """Checks every input of FID/IS/KID and loads what they need; computes nothing.

  Returns:
    dict: 'num_samples', 'samples' (uint8 [N, H, W, C] from --samples, else
    None), 'options' (the sampler's, else None), 'module' and
    'inception_params', 'weights' (the weights file) and 'weights_sha256',
    'samples_sha256' (of the --samples file, else None), 'source' (the
    training split) and 'num_reference'.

  Raises:
    ValueError (or OSError): naming the bad flag or file.
  """
  from ddpm_jax import generation  # pylint: disable=g-import-not-at-top
  from ddpm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from ddpm_jax import metrics as m  # pylint: disable=g-import-not-at-top

  setup = {"samples": None, "options": None, "samples_sha256": None}
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  if FLAGS.samples:
    # (--seed and --params still apply to bits/dim.)
    ignored = [f"--{name}" for name in ("num_samples", "sampler", "steps", "eta")
               if FLAGS[name].present]
    if ignored:
      raise ValueError(f"{', '.join(ignored)} set how samples are drawn, but "
                       f"--samples {FLAGS.samples} gives them; pass one or the other.")
    if not os.path.isfile(FLAGS.samples):
      raise ValueError(
          f"--samples {FLAGS.samples}: no such file"
          + (" (it is a directory)" if os.path.isdir(FLAGS.samples) else "")
          + "; write one with `python -m ddpm_jax.sample --out FILE.npz`.")
    # Hashed before it is read: the hash names the result file (a file
    # changed in between gets a name no other samples have).
    setup["samples_sha256"] = m.file_sha256(FLAGS.samples)
    samples = m.read_npz(
        FLAGS.samples, "samples", keys=["samples"],
        hint="Write samples with `python -m ddpm_jax.sample --out FILE.npz`.")["samples"]
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[1:] != image_shape:
      raise ValueError(
          f"{FLAGS.samples} holds samples {samples.dtype} {list(samples.shape)}; this "
          f"run's data set ({config.data.dataset}) needs uint8 [N, "
          f"{', '.join(map(str, image_shape))}]. Score samples with the run that "
          "made them (a cascade's with the upsampler's --workdir).")
    setup["samples"] = samples
    setup["num_samples"] = len(samples)
  else:
    if FLAGS.num_samples < 1:
      raise ValueError(f"--num_samples must be >= 1, got {FLAGS.num_samples}.")
    if int(config.model.get("low_res_size", 0)):
      raise ValueError(
          "This run is a super-resolution model: it needs low-resolution inputs "
          "to sample. Draw a cascade's samples with `python -m ddpm_jax.sample "
          "--upsampler_workdir` and score them with --samples.")
    options = generation.SamplerOptions(sampler=FLAGS.sampler, steps=FLAGS.steps,
                                        eta=FLAGS.eta)
    generation.sampling_diffusion(config, options)  # bad options fail here
    setup["options"] = options
    setup["num_samples"] = FLAGS.num_samples
  n = setup["num_samples"]
  min_is = m.MIN_SAMPLES_PER_SPLIT * IS_SPLITS
  if "is" in metrics and n < min_is:
    raise ValueError(
        f"The Inception Score uses {IS_SPLITS} splits of the samples and needs at "
        f"least {m.MIN_SAMPLES_PER_SPLIT} samples per split, so at least "
        f"{min_is} samples; got {n}" + ("." if FLAGS.samples else
                                       " (raise --num_samples)."))
  if ("fid" in metrics or "kid" in metrics) and n < 2:
    raise ValueError(f"FID and KID need at least 2 samples, got {n}.")
  source = input_pipeline.create_source(config, "train")
  num_reference = FLAGS.num_reference or len(source)
  if not 2 <= num_reference <= len(source):
    raise ValueError(f"--num_reference must be in [2, {len(source)}] (the training "
                     f"split's size), got {num_reference}.")
  if "fid" in metrics or "kid" in metrics:
    # Now, not after the Inception pass over the samples and the training
    # set. Process 0 alone reads and writes the cache.
    cli.on_process_0(lambda: _check_writable_directory(
        os.path.expanduser(FLAGS.stats_cache), "--stats_cache"))
  weights = m.resolve_weights_path(FLAGS.inception_weights)
  setup["module"], setup["inception_params"] = m.load_inception(weights)
  setup.update(weights=os.path.abspath(weights),
               weights_sha256=m.file_sha256(weights),
               source=source, num_reference=num_reference)
  return setup


def sample_metrics(config, params, metrics, setup: dict, *, step) -> Optional[dict]:
  """FID / IS / KID of samples (drawn now or read from --samples).

  Every process must call it (they share the sampling and the Inception
  passes); process 0 gets the results, the others None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import generation  # pylint: disable=g-import-not-at-top
  from ddpm_jax import metrics as m  # pylint: disable=g-import-not-at-top

  result = {"metrics": list(metrics), "num_samples": setup["num_samples"]}
  if FLAGS.samples:
    samples = setup["samples"]
    result.update(samples_file=os.path.abspath(FLAGS.samples),
                  samples_sha256=setup["samples_sha256"])
  else:
    samples = generation.generate(config, params, num_samples=FLAGS.num_samples,
                                  batch_size=FLAGS.batch_size, options=setup["options"],
                                  seed=FLAGS.seed)["samples"]
    result.update(step=step, params=FLAGS.params, sampler=FLAGS.sampler,
                  steps=FLAGS.steps or "all", eta=FLAGS.eta, seed=FLAGS.seed,
                  dtype=config.model.dtype)
  result.update(inception_weights=setup["weights"],
                inception_weights_sha256=setup["weights_sha256"])
  # The processes share the Inception passes; process 0 alone shows the bars,
  # computes the scores and reads and writes the statistics' cache.
  first = jax.process_index() == 0
  against_reference = "fid" in metrics or "kid" in metrics
  keys = ((["pool3"] if against_reference else []) +
          (["logits"] if "is" in metrics else []))
  feats = _shared_features(setup, len(samples), lambda a, b: samples[a:b], keys,
                           progress=first)
  if against_reference:
    ref = _reference_stats(config, setup, keep_features="kid" in metrics,
                           first=first)
  if not first:
    return None
  if "is" in metrics:
    result["is_splits"] = IS_SPLITS
    result["is"], result["is_std"] = m.inception_score(feats["logits"],
                                                       splits=IS_SPLITS)
  if against_reference:
    result["reference"] = (f"{config.data.dataset} train, first "
                           f"{int(ref['num_examples'])} images")
    result["num_reference"] = int(ref["num_examples"])
    if "fid" in metrics:
      mu, sigma = m.stats_from_features(feats["pool3"])
      result["fid"] = m.fid_from_stats(mu, sigma, ref["mu"], ref["sigma"])
    if "kid" in metrics:
      n = min(len(samples), len(ref["features"]), 1000)
      result["kid_subset_size"] = n
      result["kid"], result["kid_std"] = m.kernel_inception_distance(
          feats["pool3"], ref["features"], subset_size=n)
  return result


def _reference_stats(config, setup: dict, *, keep_features: bool, first: bool):
  """The training images' statistics on process 0 (None on the others).

  Process 0 reads them from the cache (its disk may be the only one that
  has them); on a miss, every process scores its share of the images and
  process 0 writes the cache.
  """
  from ddpm_jax import metrics as m  # pylint: disable=g-import-not-at-top

  num_reference, source = setup["num_reference"], setup["source"]
  compute = lambda: _shared_features(
      setup, num_reference, lambda a, b: _training_images(source, a, b),
      ["pool3"], progress=first)["pool3"]
  if not first:
    if _process_0_says(False):  # process 0 missed its cache
      compute()
    return None
  asked = []

  def compute_on_every_process():
    asked.append(_process_0_says(True))
    return compute()

  data = config.data
  # An image folder's files can change under the same name and count.
  data_fingerprint = (source.fingerprint(num_reference)
                      if hasattr(source, "fingerprint") else "")
  name, fingerprint = m.reference_key(
      dataset=data.dataset, split="train", image_size=data.image_size,
      channels=data.channels, num_examples=num_reference,
      weights_sha256=setup["weights_sha256"], data_fingerprint=data_fingerprint)
  ref = m.reference_stats(name, compute_on_every_process,
                          os.path.expanduser(FLAGS.stats_cache),
                          keep_features=keep_features, fingerprint=fingerprint)
  if not asked:
    _process_0_says(False)
  return ref


# Flags that only some metrics read: given without them, they would be ignored.
_SAMPLE_FLAGS = ("num_samples", "samples", "sampler", "steps", "eta",
                 "inception_weights", "stats_cache")
_BPD_FLAGS = ("split", "num_examples")


def _check_flags_apply(metrics) -> None:
  """Refuses a flag that none of `metrics` reads (it would be silently ignored)."""
  given = lambda names: [f"--{n}" for n in names if FLAGS[n].present]
  if "bpd" not in metrics and given(_BPD_FLAGS):
    raise ValueError(f"{', '.join(given(_BPD_FLAGS))} set bits/dim's data; add "
                     "bpd to --metric or drop them.")
  if metrics == ["bpd"] and given(_SAMPLE_FLAGS + ("num_reference",)):
    raise ValueError(
        f"{', '.join(given(_SAMPLE_FLAGS + ('num_reference',)))} set FID/IS/KID's "
        "samples and weights, but --metric bpd draws no samples; add fid, is "
        "or kid to --metric or drop them.")
  reference = given(("num_reference", "stats_cache"))
  if reference and not {"fid", "kid"} & set(metrics):
    one = len(reference) == 1
    raise ValueError(f"{', '.join(reference)} set{'s' if one else ''} FID/KID's "
                     "reference statistics; the Inception Score has none. Add "
                     f"fid or kid to --metric or drop {'it' if one else 'them'}.")
  if FLAGS.dtype and FLAGS.samples and "bpd" not in metrics:
    raise ValueError("--dtype sets the network's compute dtype, but scoring "
                     "--samples runs no network; drop --dtype.")
  if FLAGS["eta"].present and FLAGS.sampler != "ddim":
    raise ValueError(f"--eta is DDIM's noise scale; the {FLAGS.sampler} sampler "
                     "has none: pass --sampler ddim, or drop --eta.")


def _check_directory(path: str, what: str) -> None:
  """A clear error when `path`, where results go, exists as a file."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{what} {path} is a file, not a directory; move it away "
                     "or choose another path.")


def _check_writable_directory(path: str, what: str) -> None:
  """Creates directory `path` if needed and checks a file can be made in it.

  Raises:
    ValueError: naming `what` and `path`, without a bare errno.
  """
  _check_directory(path, what)
  try:
    files.check_can_write(path)
  except OSError as e:
    raise ValueError(f"{what} {path} cannot be written to ({e.strerror or e}); "
                     "choose a directory you can write to.") from e


def run(argv) -> None:
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  asked = [x.strip().lower() for x in FLAGS.metric if x.strip()]
  if not asked:
    raise ValueError(f"--metric needs one or more of {','.join(METRICS)} "
                     "(comma-separated), e.g. --metric bpd or --metric fid,is,kid.")
  unknown = sorted(set(asked) - set(METRICS))
  if unknown:
    raise ValueError(f"Unknown metric(s) {unknown}; choose from {', '.join(METRICS)}.")
  metrics = [x for x in METRICS if x in asked]  # one order, for the file names
  _check_flags_apply(metrics)
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {FLAGS.batch_size}.")
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from ddpm_jax.metrics import bpd  # pylint: disable=g-import-not-at-top

  cli.initialize_processes()  # before anything touches a device
  cli.stop_on_sigterm()
  config, params, step = checkpointing.load_params(
      FLAGS.workdir, step=FLAGS.step,
      which="ema" if FLAGS.params == "ema" else "params")
  # `_<dtype>` in result names when --dtype differs from the run's own.
  dtype_tag = f"_{FLAGS.dtype}" if cli.apply_dtype(config, FLAGS.dtype) else ""
  writer = jax.process_index() == 0
  eval_dir = os.path.join(FLAGS.workdir, "eval")
  # Every metric's inputs are checked before any of them computes anything.
  if "bpd" in metrics:
    num_examples = bpd.check_inputs(config, split=FLAGS.split,
                                    num_examples=FLAGS.num_examples)
  sample_wanted = [x for x in metrics if x != "bpd"]
  if sample_wanted:
    setup = prepare_sample_metrics(config, sample_wanted)
  cli.on_process_0(lambda: _check_writable_directory(eval_dir, "The results directory"))

  if "bpd" in metrics:
    result = bpd.evaluate_bpd(config, params, split=FLAGS.split,
                              batch_size=FLAGS.batch_size,
                              num_examples=FLAGS.num_examples, seed=FLAGS.seed)
    result.update(step=step, params=FLAGS.params, seed=FLAGS.seed,
                  batch_size=FLAGS.batch_size, dtype=config.model.dtype)
    path = bpd_path(eval_dir, step, num_examples, result["split"], dtype_tag)
    if writer:  # one file and one console for all processes
      _write_json_atomic(path, result)
      read_as = ("" if result["split"] == FLAGS.split else
                 f" (--split {FLAGS.split}: this data set has no such split)")
      print(f"{result['split']} bits/dim{read_as} at step {step} ({FLAGS.params}) "
            f"over {result['num_examples']} examples: {result['total_bpd']:.4f}  "
            f"(L_T prior {result['prior_bpd']:.4f}, L_0 decoder "
            f"{result['decoder_bpd']:.4f}, sum L_1..L_T-1 "
            f"{result['vb_sum_bpd']:.4f}) -> {path}", flush=True)
  if sample_wanted:
    result = sample_metrics(config, params, sample_wanted, setup, step=step)
    path = sample_metrics_path(eval_dir, sample_wanted, step, setup,
                               "" if FLAGS.samples else dtype_tag)
    if writer:
      _write_json_atomic(path, result)
      parts = [f"{k.upper()} {result[k]:.4f}" for k in ("fid", "is", "kid")
               if k in result]
      origin = (f"samples from {FLAGS.samples}" if FLAGS.samples else
                f"samples at step {step} ({FLAGS.params}, {FLAGS.sampler}, "
                f"steps={FLAGS.steps or 'all'})")
      print(f"{', '.join(parts)} of {result['num_samples']} {origin} -> {path}",
            flush=True)


def main(argv):
  cli.exit_on_user_error(cpu_memory.reuse_scratch)  # before JAX starts
  cli.quiet_orbax()
  cli.exit_on_user_error(run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
