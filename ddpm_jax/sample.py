r"""Draw samples from a run: `python -m ddpm_jax.sample --workdir DIR --out samples.npz`.

Loads the newest (or `--step`) checkpoint of a training run or of a converted
official model, and writes `samples` (uint8 [N, H, W, C], the FID protocol:
clip, (x + 1) * 127.5, round) and, for class-conditional models, `labels` to
an .npz (default: `WORKDIR/samples/sample_stepN_{sampler}{K}_n{N}_seed{S}.npz`,
with `_strided` or `_sections{a-b-c}`, `_eta{E}`, `_raw`, `_{dtype}` or
`_cond{hash}` before `_n` for the choice of the K steps, DDIM's eta, the raw
parameters, a `--dtype` other than the run's or conditioning), plus a PNG
grid of the first samples beside it. The output only replaces an existing
file once it is complete. Example:

  python -m ddpm_jax.sample --workdir runs/digits --num_samples 64 \
      --sampler ddim --steps 50 --out runs/digits/samples.npz

Conditional generation: `--class_label 3 --guidance_scale 2` (a class-
conditional model; classifier-free guidance), `--classifier_workdir CLS
--classifier_scale 1` (classifier guidance), `--inpaint IMAGE --mask MASK
[--resample 5]` (white = keep) or `--outpaint SMALL_IMAGE`. Every request is
checked before the first sampling step.

Several processes (a TPU pod, SLURM tasks, `launch/local.sh -m sample`) draw
the samples together over all their devices; process 0 writes them.
"""
import hashlib
import json
import os
import tempfile

from absl import app
from absl import flags

from ddpm_jax import cli
from ddpm_jax import cpu_memory
from ddpm_jax import files

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (training run or converted model).")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "EMA parameters (default) "
                  "or the raw ones (of both stages of a cascade).")
flags.DEFINE_integer("num_samples", 64, "Number of samples N.")
flags.DEFINE_integer("batch_size", 64, "Samples per compiled batch over all devices.")
flags.DEFINE_enum("sampler", "ancestral", ["ancestral", "ddim"], "Reverse-process sampler.")
flags.DEFINE_string("steps", None,
                    "Sampling steps: K (evenly respaced), 'ddimK' (strided) or "
                    "'a,b,c' (per-section counts); default: all T steps.")
flags.DEFINE_float("eta", 0.0, "DDIM noise scale (0 = deterministic).")
flags.DEFINE_integer("seed", 0, "Root seed: sample i depends only on it and i.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "The networks' compute dtype (default: each run's "
                  "model.dtype); parameters stay float32. bfloat16 is faster "
                  "on GPUs and TPUs, float32 on most CPUs.")
flags.DEFINE_string("out", None, "Output .npz (default: WORKDIR/samples/"
                    "sample_stepN_{sampler}{K}[_strided|_sections{a-b-c}]"
                    "[_eta{E}][_raw][_{dtype}][_cond{hash}]_n{N}_seed{S}.npz, K "
                    "sampling steps); missing folders are created.")
flags.DEFINE_string("grid", None, "Output .png grid of the first 100 samples "
                    "(default: --out with .png; 'none' to skip).")
cli.define_process_flags()
# Conditional generation.
flags.DEFINE_list("class_label", None,
                  "Class-conditional models: one label for all samples, or N "
                  "comma-separated labels (default: drawn at random).")
flags.DEFINE_float("guidance_scale", 0.0,
                   "Classifier-free guidance w: (1 + w) eps(x, y) - w eps(x, none).")
flags.DEFINE_string("classifier_workdir", None,
                    "A noise-aware classifier run (configs/digits_classifier.py) "
                    "for classifier guidance.")
flags.DEFINE_float("classifier_scale", 1.0, "Classifier guidance scale s.")
flags.DEFINE_string("inpaint", None, "Inpainting: the known image (PNG/JPEG or .npz "
                    "with 'image'), the model's size.")
flags.DEFINE_string("mask", None, "Inpainting mask: white = keep, black = fill.")
flags.DEFINE_string("outpaint", None, "Outpainting: a smaller image, centred on the "
                    "canvas; the border is filled.")
flags.DEFINE_integer("resample", 1, "RePaint resampling per step (inpainting).")
flags.DEFINE_string("upsampler_workdir", None,
                    "A super-resolution run (e.g. configs/digits_sr.py) whose "
                    "low-resolution size is this model's image size: a second "
                    "stage upsamples every sample (cascaded diffusion).")
flags.DEFINE_string("upsampler_steps", None, "The second stage's --steps.")
flags.DEFINE_integer("upsampler_aug_level", 0,
                     "Noise-augmentation level of the second stage's inputs (0 = clean).")
flags.mark_flags_as_required(["workdir"])

_GRID_MAX = 100


def _given(name: str) -> bool:
  """Whether the command line set flag `name` to a value other than its default."""
  flag = FLAGS[name]
  return flag.present and flag.value != flag.default


def _check_flag_combinations() -> None:
  """Refuses flags that the rest of the request would silently ignore."""
  if not FLAGS.upsampler_workdir:
    for name in ("upsampler_steps", "upsampler_aug_level"):
      if _given(name):
        raise ValueError(f"--{name} is for the second stage of a cascade: pass "
                         "--upsampler_workdir SR with it.")
  if not FLAGS.classifier_workdir and _given("classifier_scale"):
    raise ValueError("--classifier_scale needs --classifier_workdir CLS (a "
                     "noise-aware classifier run); classifier-free guidance is "
                     "--guidance_scale.")
  if FLAGS.sampler == "ancestral" and _given("eta"):
    raise ValueError("--eta is DDIM's noise scale: pass --sampler ddim with it "
                     "(the ancestral sampler has none).")


# Flags that condition what is drawn; image files count by their content.
_CONDITIONING_FLAGS = ("class_label", "guidance_scale", "classifier_workdir",
                       "classifier_scale", "inpaint", "mask", "outpaint",
                       "resample", "upsampler_workdir", "upsampler_steps",
                       "upsampler_aug_level")
_IMAGE_FLAGS = ("inpaint", "mask", "outpaint")


def _spacing_tag(d, num_timesteps: int) -> str:
  """'' when `d` keeps K evenly spread steps of T, else how `--steps` chose them.

  `--steps 20`, `ddim20` and `5,10,5` all run 20 steps but different ones.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top
  kept = np.asarray(d.timestep_map).tolist()
  if kept == sampling.space_timesteps(num_timesteps, len(kept)):
    return ""
  spec = FLAGS.steps.replace(" ", "")
  if spec.startswith("ddim"):
    return "_strided"
  return "_sections" + spec.replace(",", "-")


def _default_out(step: int, d, num_timesteps: int, dtype_changed: bool,
                 workdir_steps: dict) -> str:
  """`WORKDIR/samples/sample_step{N}_{sampler}{K}[_strided|_sections{a-b-c}][_eta{E}][_raw][_{dtype}][_cond{H}]_n{num}_seed{S}.npz`.

  Named by what the samples depend on, so that different requests keep
  different files (and never the trainer's own `samples/step_N.png`). `K`:
  the steps run; `dtype`: --dtype where it differs from a run's own; `H`: 8
  hex digits of a hash of the conditioning flags given (a classifier or
  upsampler run by its path and the checkpoint step loaded, `workdir_steps`).
  """
  name = (f"sample_step{step}_{FLAGS.sampler}{d.num_timesteps}"
          f"{_spacing_tag(d, num_timesteps)}")
  if FLAGS.sampler == "ddim" and FLAGS.eta:
    name += f"_eta{FLAGS.eta!r}"  # exact: 0.1234567 and 0.1234568 differ
  if FLAGS.params == "raw":
    name += "_raw"
  if dtype_changed:
    name += f"_{FLAGS.dtype}"
  conditioning = {}
  for flag in _CONDITIONING_FLAGS:
    if _given(flag):
      value = FLAGS[flag].value
      if flag in _IMAGE_FLAGS:
        value = files.file_sha256(value)
      elif flag.endswith("_workdir"):
        # Its newer checkpoints make other samples: the step names them too.
        value = [os.path.realpath(value), workdir_steps[flag]]
      conditioning[flag] = value
  if conditioning:
    digest = hashlib.sha256(json.dumps(conditioning, sort_keys=True).encode())
    name += f"_cond{digest.hexdigest()[:8]}"
  return os.path.join(FLAGS.workdir, "samples",
                      f"{name}_n{FLAGS.num_samples}_seed{FLAGS.seed}.npz")


def _check_output_names(out: str | None, grid: str | None) -> None:
  """`--out` must be an .npz and `--grid` a .png or 'none' (None: the default)."""
  if out and not out.lower().endswith(".npz"):
    raise ValueError(f"--out must end in .npz (the samples), got {out!r}; the "
                     "PNG grid goes to --grid.")
  if grid and grid != "none" and not grid.lower().endswith(".png"):
    raise ValueError(f"--grid must end in .png or be 'none', got {grid!r}.")


def _check_writable(path: str) -> None:
  """Fails early (before sampling) when `path` cannot be written.

  Creates nothing: a missing parent directory is made only when the output is
  written, so its nearest existing ancestor must be a writable directory.
  """
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory; give a file name for the output.")
  if os.path.exists(path) and not os.path.isfile(path):
    raise ValueError(f"{path} exists and is not a regular file; choose another "
                     "output path.")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"Cannot write {path}: {parent} is not a directory.")
  try:
    with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
      pass
  except OSError as e:
    raise ValueError(f"Cannot write {path}: {e.strerror or e}.") from None


def _load_upsampler(config, num_samples: int):
  """The second stage's (config, params, options, step loaded); checked like the first."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from ddpm_jax import generation  # pylint: disable=g-import-not-at-top
  sr_config, sr_params, sr_step = checkpointing.load_params(
      FLAGS.upsampler_workdir, which="ema" if FLAGS.params == "ema" else "params")
  low_res_size = int(sr_config.model.get("low_res_size", 0))
  if not low_res_size:
    raise ValueError(
        f"{FLAGS.upsampler_workdir} is not a super-resolution model (its config "
        "has no model.low_res_size): --upsampler_workdir takes a run trained "
        "like configs/digits_sr.py.")
  if low_res_size != config.data.image_size or (
      sr_config.data.channels != config.data.channels):
    raise ValueError(
        f"{FLAGS.upsampler_workdir} upsamples {low_res_size}x{low_res_size}x"
        f"{sr_config.data.channels} images, but this model makes "
        f"{config.data.image_size}x{config.data.image_size}x"
        f"{config.data.channels}.")
  if not 0 <= FLAGS.upsampler_aug_level <= sr_config.diffusion.num_timesteps:
    raise ValueError(f"--upsampler_aug_level must lie in 0.."
                     f"{sr_config.diffusion.num_timesteps}, got "
                     f"{FLAGS.upsampler_aug_level}.")
  sr_options = generation.SamplerOptions(sampler=FLAGS.sampler,
                                         steps=FLAGS.upsampler_steps,
                                         eta=FLAGS.eta)
  low_res = np.broadcast_to(np.float32(0), (  # only its shape is checked
      num_samples, low_res_size, low_res_size, config.data.channels))
  try:
    generation.sampling_diffusion(sr_config, sr_options)
  except ValueError as e:  # say which stage's steps
    raise ValueError(f"--upsampler_steps {FLAGS.upsampler_steps}: {e}") from None
  generation.check_request(
      sr_config, num_samples=num_samples, batch_size=FLAGS.batch_size,
      options=sr_options, seed=FLAGS.seed, low_res=low_res,
      aug_level=FLAGS.upsampler_aug_level)
  return sr_config, sr_params, sr_options, sr_step


def run(argv) -> None:
  """Validates everything, then samples and writes the outputs."""
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  # Imported after flag parsing so that `--help` is fast.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ddpm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from ddpm_jax import generation  # pylint: disable=g-import-not-at-top
  from ddpm_jax import image_grid  # pylint: disable=g-import-not-at-top
  from ddpm_jax import inpainting_io  # pylint: disable=g-import-not-at-top
  from ddpm_jax import keys  # pylint: disable=g-import-not-at-top

  # The flags alone, before anything is loaded.
  if FLAGS.num_samples < 1 or FLAGS.batch_size < 1:
    raise ValueError("--num_samples and --batch_size must be >= 1.")
  keys.check_seed(FLAGS.seed)
  _check_flag_combinations()
  _check_output_names(FLAGS.out, FLAGS.grid)
  labels = None
  if FLAGS.class_label:
    try:
      labels = [int(v) for v in FLAGS.class_label]
    except ValueError:
      raise ValueError(f"--class_label must be integers, got {FLAGS.class_label}.") from None
    if len(labels) == 1:
      labels = labels * FLAGS.num_samples
    elif len(labels) != FLAGS.num_samples:
      raise ValueError(f"--class_label has {len(labels)} labels for "
                       f"--num_samples={FLAGS.num_samples}: give 1 or N.")
  if (FLAGS.inpaint or FLAGS.mask) and (
      not (FLAGS.inpaint and FLAGS.mask) or FLAGS.outpaint):
    raise ValueError("Inpainting takes both --inpaint IMAGE and --mask MASK "
                     "(and no --outpaint).")
  cli.initialize_processes()  # before anything touches a device
  cli.stop_on_sigterm()
  # The runs and inputs; every check of the request runs before "Sampling".
  classifier, dtype_changed, workdir_steps = None, False, {}
  if FLAGS.classifier_workdir:
    cls_config, cls_params, workdir_steps["classifier_workdir"] = (
        checkpointing.load_params(FLAGS.classifier_workdir))
    dtype_changed = cli.apply_dtype(cls_config, FLAGS.dtype)
    classifier = (cls_config, cls_params)
  options = generation.SamplerOptions(
      sampler=FLAGS.sampler, steps=FLAGS.steps, eta=FLAGS.eta,
      guidance_scale=FLAGS.guidance_scale,
      classifier_scale=FLAGS.classifier_scale if classifier else 0.0,
      resample=FLAGS.resample)
  config, params, step = checkpointing.load_params(
      FLAGS.workdir, step=FLAGS.step,
      which="ema" if FLAGS.params == "ema" else "params")
  dtype_changed |= cli.apply_dtype(config, FLAGS.dtype)
  generation.sampling_diffusion(config, options)  # K > T etc. before any image
  known = known_mask = None
  if FLAGS.inpaint:
    known, known_mask = inpainting_io.load_inpainting(
        FLAGS.inpaint, FLAGS.mask, config.data.image_size, config.data.channels)
  elif FLAGS.outpaint:
    known, known_mask = inpainting_io.load_outpainting(
        FLAGS.outpaint, config.data.image_size, config.data.channels)
  d = generation.check_request(
      config, num_samples=FLAGS.num_samples, batch_size=FLAGS.batch_size,
      options=options, seed=FLAGS.seed, labels=labels, known=known,
      known_mask=known_mask,
      classifier_config=classifier[0] if classifier else None)
  upsampler = None
  if FLAGS.upsampler_workdir:
    upsampler = _load_upsampler(config, FLAGS.num_samples)
    dtype_changed |= cli.apply_dtype(upsampler[0], FLAGS.dtype)
    workdir_steps["upsampler_workdir"] = upsampler[3]
  out = FLAGS.out or _default_out(step, d, config.diffusion.num_timesteps,
                                  dtype_changed, workdir_steps)
  grid = FLAGS.grid or os.path.splitext(out)[0] + ".png"
  if grid != "none" and (
      os.path.realpath(out) == os.path.realpath(grid) or (
          os.path.exists(out) and os.path.exists(grid)
          and os.path.samefile(out, grid))):
    raise ValueError(f"--out {out} and --grid {grid} are the same file; give "
                     "the grid another .png name (or --grid none).")
  writer = jax.process_index() == 0

  def check_outputs():
    _check_writable(out)
    if grid != "none":
      _check_writable(grid)

  cli.on_process_0(check_outputs)  # the writer's paths; every process stops
  batch_size = generation.batch_size_for(FLAGS.num_samples, FLAGS.batch_size)
  if writer:  # one console for all processes
    print(f"Sampling {FLAGS.num_samples} images from {FLAGS.workdir} step {step} "
          f"({FLAGS.params} params, {config.model.dtype}) with {FLAGS.sampler}, "
          f"{d.num_timesteps} steps, in batches of {batch_size} on "
          f"{jax.device_count()} device(s).", flush=True)
  result = generation.generate(
      config, params, num_samples=FLAGS.num_samples,
      batch_size=FLAGS.batch_size, options=options, seed=FLAGS.seed,
      labels=labels, known=known, known_mask=known_mask, classifier=classifier)
  arrays = {"samples": result["samples"]}
  if upsampler:
    sr_config, sr_params, sr_options, _ = upsampler
    if writer:
      print(f"Upsampling to {sr_config.data.image_size}x"
            f"{sr_config.data.image_size} with {FLAGS.upsampler_workdir}.",
            flush=True)
    arrays["low_res"] = result["samples"]
    stage2 = generation.generate(
        sr_config, sr_params, num_samples=FLAGS.num_samples,
        batch_size=FLAGS.batch_size, options=sr_options, seed=FLAGS.seed,
        low_res=result["samples"].astype("float32") / 127.5 - 1.0,
        aug_level=FLAGS.upsampler_aug_level, stream=1)
    arrays["samples"] = stage2["samples"]
    result["seconds"] += stage2["seconds"]
    config = sr_config
  if "labels" in result:
    arrays["labels"] = result["labels"]
  if writer:  # the parent directories are made here, once the samples exist
    with files.atomic_write(out) as f:
      np.savez(f, **arrays)
    if grid != "none":
      images = arrays["samples"][:_GRID_MAX].astype("float32") / 127.5 - 1.0
      image_grid.save_image_grid(images, grid,
                                 upscale=max(1, 64 // config.data.image_size))
    rate = FLAGS.num_samples / result["seconds"]
    print(f"Wrote {out}" + ("" if grid == "none" else f" and {grid}") +
          f": {FLAGS.num_samples} samples in {result['seconds']:.1f} s "
          f"({rate:.2f} images/s).", flush=True)


def main(argv):
  cli.exit_on_user_error(cpu_memory.reuse_scratch)  # before JAX starts
  cli.quiet_orbax()
  cli.exit_on_user_error(run, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
