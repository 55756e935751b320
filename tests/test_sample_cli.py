"""`python -m ddpm_jax.sample` and the generation library behind it."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import checkpointing
from ddpm_jax import generation
from ddpm_jax import image_grid
from ddpm_jax import models
from ddpm_jax import sampling
from tiny_models import random_params, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, devices=2):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "ddpm_jax.sample", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def reference_samples(config, params, seed, n, steps=None, sampler="ancestral",
                      eta=0.0):
  """The same chains through the plain sampler API, one key per example."""
  d = models.create_diffusion(config)
  if steps is not None:
    d, _ = sampling.respace(d, steps)
  model = models.create_model(config)
  keys = generation.example_keys(seed, 0, n)
  model_fn = lambda x, t: model.apply({"params": params}, x, t)
  shape = (n, 8, 8, 1)
  if sampler == "ancestral":
    x = sampling.p_sample_loop(d, model_fn, shape, keys)
  else:
    x = sampling.ddim_sample_loop(d, model_fn, shape, keys, eta=eta)
  return image_grid.to_uint8(np.asarray(x))


def assert_images_close(a, b):
  """uint8 images equal but for rare one-level rounding flips."""
  diff = np.abs(a.astype(int) - b.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_generate_matches_the_sampler_and_ignores_batching(pretrained_run):
  config, params, _ = checkpointing.load_params(pretrained_run)
  ref = reference_samples(config, params, seed=3, n=10)
  a = generation.generate(config, params, num_samples=10, batch_size=8, seed=3,
                          progress=False)["samples"]
  b = generation.generate(config, params, num_samples=10, batch_size=16,
                          seed=3, progress=False)["samples"]
  assert a.dtype == np.uint8 and a.shape == (10, 8, 8, 1)
  assert_images_close(a, ref)
  assert_images_close(a, b)
  assert len({s.tobytes() for s in a}) == 10  # every sample differs


def test_generate_refuses_bad_counts_and_eta_before_sampling(pretrained_run):
  """A float count ran every batch, then failed slicing; eta = 3 gave NaN
  samples that became black uint8 images."""
  config, params, _ = checkpointing.load_params(pretrained_run)
  for kwargs, message in [
      (dict(num_samples=2.5), "num_samples must be an integer >= 1, got 2.5"),
      (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
      (dict(options=generation.SamplerOptions(sampler="ddim", steps=5, eta=3.0)),
       r"eta=3.0 is outside \[0, 1\]"),
      # Ignored before: the ancestral sampler has no eta.
      (dict(options=generation.SamplerOptions(sampler="ancestral", steps=5, eta=0.7)),
       "eta=0.7 is DDIM's noise scale; the ancestral sampler has none"),
  ]:
    with pytest.raises(ValueError, match=message):
      generation.generate(config, params, **{"num_samples": 4, "batch_size": 4,
                                             "progress": False, **kwargs})


def test_cli_writes_samples_and_grid(pretrained_run, tmp_path):
  out = str(tmp_path / "s.npz")
  r = run_cli("--workdir", pretrained_run, "--num_samples", "6", "--batch_size", "4",
              "--sampler", "ddim", "--steps", "ddim5", "--seed", "3",
              "--out", out)
  assert r.returncode == 0, r.stderr
  assert "images/s" in r.stdout
  samples = np.load(out)["samples"]
  config, params, _ = checkpointing.load_params(pretrained_run)
  # 1 process with 2 devices and batches of 4 vs the plain API on 8 devices.
  assert_images_close(samples, reference_samples(
      config, params, seed=3, n=6, steps="ddim5", sampler="ddim"))
  grid = np.asarray(Image.open(str(tmp_path / "s.png")))
  expected = image_grid.make_grid(samples.astype(np.float32) / 127.5 - 1.0)
  upscale = 64 // 8
  np.testing.assert_array_equal(grid[::upscale, ::upscale], expected[..., 0])


@pytest.mark.parametrize("sig, status, word", [(signal.SIGTERM, 143, "terminated"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_cli_stops_on_sigterm_or_ctrl_c_writing_nothing(pretrained_run, tmp_path, sig,
                                                        status, word):
  out, log = tmp_path / "s.npz", tmp_path / "stdout.txt"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  with open(log, "w") as stdout:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_jax.sample", "--workdir", pretrained_run,
         "--num_samples", "4000", "--batch_size", "8", "--out", str(out)],
        cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
      deadline = time.time() + 120
      while "Sampling" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
      proc.send_signal(sig)
      _, err = proc.communicate(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert proc.returncode == status and word in err, (proc.returncode, err[-2000:])
  assert "Traceback" not in err and not list(tmp_path.glob("s.*"))


def test_class_conditional_samples_carry_labels(tmp_path):
  config = tiny_config(num_classes=10)
  params = random_params(config)
  out = generation.generate(config, params, num_samples=12, batch_size=8,
                            seed=0, progress=False)
  labels = out["labels"]
  assert labels.shape == (12,) and labels.min() >= 0 and labels.max() < 10
  assert len(set(labels.tolist())) > 3  # drawn, not constant
  given = generation.generate(config, params, num_samples=4, batch_size=8,
                              labels=np.array([1, 2, 3, 4]), progress=False)
  np.testing.assert_array_equal(given["labels"], [1, 2, 3, 4])
  with pytest.raises(ValueError, match=r"0\.\.9, got \[10\]"):
    generation.generate(config, params, num_samples=2, batch_size=8,
                        labels=np.array([1, 10]), progress=False)


def test_cli_errors_exit_1_before_sampling_and_keep_old_output(pretrained_run, tmp_path):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  r = run_cli("--workdir", empty)
  assert r.returncode == 1 and "not a run directory" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--step", "7")
  assert r.returncode == 1 and "Step 7 does not exist" in r.stderr
  assert "[0]" in r.stderr  # names the steps that exist
  r = run_cli("--workdir", pretrained_run, "--steps", "50")
  assert r.returncode == 1 and "only T=20" in r.stderr
  blocker = tmp_path / "file"
  blocker.write_text("x")
  r = run_cli("--workdir", pretrained_run, "--out", str(blocker / "s.npz"))
  assert r.returncode == 1 and "Cannot write" in r.stderr
  # An existing output survives a failed run untouched.
  out = tmp_path / "keep.npz"
  out.write_bytes(b"old")
  r = run_cli("--workdir", pretrained_run, "--out", str(out), "--eta", "-1",
              "--sampler", "ddim")
  assert r.returncode == 1 and "eta" in r.stderr
  assert out.read_bytes() == b"old"
  assert "Traceback" not in r.stderr


def test_cli_inpainting_keeps_known_pixels_and_outpainting_the_centre(
    pretrained_run, tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (8, 8), dtype=np.uint8)
  mask = np.zeros((8, 8), np.uint8)
  mask[:, :4] = 255  # keep the left half
  Image.fromarray(image).save(tmp_path / "img.png")
  Image.fromarray(mask).save(tmp_path / "mask.png")
  out = str(tmp_path / "inp.npz")
  r = run_cli("--workdir", pretrained_run, "--num_samples", "3", "--inpaint",
              str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"),
              "--resample", "2", "--out", out, "--grid", "none")
  assert r.returncode == 0, r.stderr
  samples = np.load(out)["samples"][..., 0]
  # Known pixels come back exactly (within 1/255 after quantisation).
  assert np.abs(samples[:, :, :4].astype(int) - image[:, :4]).max() <= 1
  assert len({s[:, 4:].tobytes() for s in samples}) == 3  # filled differently
  small = rng.integers(0, 256, (4, 4), dtype=np.uint8)
  Image.fromarray(small).save(tmp_path / "small.png")
  r = run_cli("--workdir", pretrained_run, "--num_samples", "2", "--outpaint",
              str(tmp_path / "small.png"), "--out", out, "--grid", "none")
  assert r.returncode == 0, r.stderr
  samples = np.load(out)["samples"][..., 0]
  assert np.abs(samples[:, 2:6, 2:6].astype(int) - small).max() <= 1


def test_cli_conditional_request_errors(pretrained_run, tmp_path):
  r = run_cli("--workdir", pretrained_run, "--class_label", "3")
  assert r.returncode == 1 and "unconditional" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--guidance_scale", "2")
  assert r.returncode == 1 and "class-conditional model" in r.stderr
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
  r = run_cli("--workdir", pretrained_run, "--inpaint", str(tmp_path / "big.png"),
              "--mask", str(tmp_path / "big.png"))
  assert r.returncode == 1 and "16x16" in r.stderr and "8x8" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--mask", str(tmp_path / "big.png"))
  assert r.returncode == 1 and "both --inpaint" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--inpaint", str(tmp_path),
              "--mask", str(tmp_path / "big.png"))
  assert r.returncode == 1 and f"{tmp_path} is a directory: pass an image file" in r.stderr
  r = run_cli("--workdir", str(tmp_path / "big.png"))
  assert r.returncode == 1 and "big.png' is a file: it is not a run directory" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--classifier_workdir", pretrained_run)
  assert r.returncode == 1 and "not 'classifier'" in r.stderr


def test_cli_class_labels_are_checked_and_saved(tmp_path):
  workdir = str(tmp_path / "cond")
  config = tiny_config(num_classes=10)
  # Guidance needs the "no class" prediction, trained by label dropout.
  checkpointing.save_pretrained(str(tmp_path / "no_dropout"), config,
                                random_params(config))
  r = run_cli("--workdir", str(tmp_path / "no_dropout"), "--class_label", "4",
              "--guidance_scale", "1.5")
  assert r.returncode == 1 and "training.label_dropout=0" in r.stderr, r.stderr
  config.training.label_dropout = 0.1
  checkpointing.save_pretrained(workdir, config, random_params(config))
  out = str(tmp_path / "c.npz")
  r = run_cli("--workdir", workdir, "--num_samples", "3", "--class_label",
              "4,5,6", "--guidance_scale", "1.5", "--out", out)
  assert r.returncode == 0, r.stderr
  np.testing.assert_array_equal(np.load(out)["labels"], [4, 5, 6])
  r = run_cli("--workdir", workdir, "--class_label", "10")
  assert r.returncode == 1 and "0..9" in r.stderr
  r = run_cli("--workdir", workdir, "--num_samples", "3", "--class_label", "1,2")
  assert r.returncode == 1 and "give 1 or N" in r.stderr


def test_cli_two_stage_cascade_upsamples_the_base_samples(pretrained_run, tmp_path):
  from configs import digits_sr  # pylint: disable=g-import-not-at-top
  from ddpm_jax import super_resolution  # pylint: disable=g-import-not-at-top
  sr_dir = str(tmp_path / "sr")
  sr_config = digits_sr.get_config("test")
  sr_config.diffusion.num_timesteps = 20
  checkpointing.save_pretrained(sr_dir, sr_config, random_params(sr_config))
  out = str(tmp_path / "cascade.npz")
  r = run_cli("--workdir", pretrained_run, "--upsampler_workdir", sr_dir,
              "--num_samples", "3", "--seed", "4", "--out", out)
  assert r.returncode == 0, r.stderr
  with np.load(out) as f:
    low_res, samples = f["low_res"], f["samples"]
  assert low_res.shape == (3, 8, 8, 1) and samples.shape == (3, 16, 16, 1)
  # Stage 1 is the base model's own samples for the seed; stage 2 is the
  # upsampler's chain conditioned on them, with keys of its own (stream 1).
  config, params, _ = checkpointing.load_params(pretrained_run)
  assert_images_close(low_res, reference_samples(config, params, seed=4, n=3))
  sr_params = checkpointing.load_params(sr_dir)[1]
  model = models.create_model(sr_config)
  cond = jnp.asarray(low_res, jnp.float32) / 127.5 - 1.0
  model_fn = super_resolution.make_model_fn(
      lambda x, t, lr, s: model.apply({"params": sr_params}, x, t, low_res=lr,
                                      aug_t=s),
      models.create_diffusion(sr_config), cond)
  keys = generation.example_keys(4, 0, 3, stream=1)
  x = sampling.p_sample_loop(models.create_diffusion(sr_config), model_fn,
                             (3, 16, 16, 1), keys)
  assert_images_close(samples, image_grid.to_uint8(np.asarray(x)))


def _sr_run(tmp_path):
  from configs import digits_sr  # pylint: disable=g-import-not-at-top
  sr_dir = str(tmp_path / "sr")
  sr_config = digits_sr.get_config("test")
  sr_config.diffusion.num_timesteps = 20
  checkpointing.save_pretrained(sr_dir, sr_config, random_params(sr_config))
  return sr_dir


def test_cli_cascade_errors(pretrained_run, tmp_path):
  r = run_cli("--workdir", pretrained_run, "--upsampler_workdir", pretrained_run)
  assert r.returncode == 1 and "not a super-resolution model" in r.stderr
  assert "0x0" not in r.stderr
  r = run_cli("--workdir", pretrained_run, "--upsampler_workdir",
              _sr_run(tmp_path), "--upsampler_steps", "50")
  assert r.returncode == 1, r.stderr
  assert "error: --upsampler_steps 50: Respacing '50' asks for 50 steps" in r.stderr


_UPSAMPLER_PARAMS_SCRIPT = """
import sys
from absl import flags
from ddpm_jax import checkpointing, sample
base, sr, params = sys.argv[1:]
flags.FLAGS(["sample", "--workdir", base, "--upsampler_workdir", sr,
             "--params", params])
read = []
load = checkpointing.load_params
def spy(workdir, **kwargs):
  read.append(kwargs.get("which", "ema"))
  return load(workdir, **kwargs)
checkpointing.load_params = spy
sample._load_upsampler(load(base)[0], 2)
print(read)
"""


@pytest.mark.parametrize("params, which", [("raw", "params"), ("ema", "ema")])
def test_params_choice_applies_to_both_stages(pretrained_run, tmp_path, params,
                                              which):
  script = tmp_path / "spy.py"
  script.write_text(_UPSAMPLER_PARAMS_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, str(script), pretrained_run,
                      _sr_run(tmp_path), params], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == repr([which])


def test_batch_is_capped_at_the_samples_and_keeps_them(pretrained_run, monkeypatch):
  assert generation.batch_size_for(1, 64, num_devices=8) == 8
  assert generation.batch_size_for(10, 64, num_devices=8) == 16
  assert generation.batch_size_for(100, 64, num_devices=8) == 64
  assert generation.batch_size_for(5, 3, num_devices=2) == 4
  assert generation.batch_size_for(1, 64, num_devices=2) == 2
  config, params, _ = checkpointing.load_params(pretrained_run)
  small = generation.generate(config, params, num_samples=10, batch_size=8,
                              seed=3, progress=False)
  traced = []
  sample_steps = sampling.sample_steps

  def recording(d, model_fn, x, *args, **kwargs):
    traced.append(x.shape[0])
    return sample_steps(d, model_fn, x, *args, **kwargs)

  monkeypatch.setattr(sampling, "sample_steps", recording)
  capped = generation.generate(config, params, num_samples=10, batch_size=64,
                               seed=3, progress=False)
  # 10 samples on 8 devices: one batch of 16 chains, not 64.
  assert capped["batch_size"] == 16 and traced and set(traced) == {16}
  assert small["batch_size"] == 8
  np.testing.assert_array_equal(capped["samples"], small["samples"])


def test_seeds_outside_uint32_are_refused(pretrained_run):
  top = generation.example_keys(2**32 - 1, 0, 2)
  assert not np.array_equal(top, generation.example_keys(0, 0, 2))
  for seed in (2**32, -1, 10**30):
    with pytest.raises(ValueError, match=r"0\.\.4294967295"):
      generation.example_keys(seed, 0, 2)
  config, params, _ = checkpointing.load_params(pretrained_run)
  with pytest.raises(ValueError, match=r"got 4294967296"):  # not seed 0's samples
    generation.generate(config, params, num_samples=2, batch_size=2,
                        seed=2**32, progress=False)
  for seed in ("4294967296", "100000000000000000000000"):
    r = run_cli("--workdir", pretrained_run, "--seed", seed)
    assert r.returncode == 1 and "0..4294967295" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Sampling" not in r.stdout


def test_cli_output_names_are_checked_before_sampling(pretrained_run, tmp_path):
  new = tmp_path / "newd"
  r = run_cli("--workdir", pretrained_run, "--out", str(new / "a.png"))
  assert r.returncode == 1 and "--out must end in .npz" in r.stderr
  r = run_cli("--workdir", pretrained_run, "--out", str(new / "a.npz"),
              "--grid", str(new / "a.npz"))
  assert r.returncode == 1 and "--grid must end in .png" in r.stderr
  out = tmp_path / "s.npz"
  out.write_bytes(b"old")
  (tmp_path / "g.png").symlink_to(out)
  r = run_cli("--workdir", pretrained_run, "--out", str(out), "--grid",
              str(tmp_path / "g.png"))
  assert r.returncode == 1 and "same file" in r.stderr
  assert out.read_bytes() == b"old" and not new.exists()
  assert "Sampling" not in r.stdout


def test_cli_default_output_is_named_by_its_contents(tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config()
  params = random_params(config)
  checkpointing.save_pretrained(str(workdir), config, params)
  trainer_grid = workdir / "samples" / "step_0.png"  # the trainer's own grid
  os.makedirs(trainer_grid.parent)
  trainer_grid.write_bytes(b"trainer")
  # '4,1' keeps 5 of T=20 steps: K in the name is the steps actually run.
  r = run_cli("--workdir", str(workdir), "--num_samples", "2", "--sampler",
              "ddim", "--steps", "4,1", "--seed", "7")
  assert r.returncode == 0, r.stderr
  assert "in batches of 2 on 2 device(s)" in r.stdout  # not the default 64
  assert trainer_grid.read_bytes() == b"trainer"
  name = workdir / "samples" / "sample_step0_ddim5_sections4-1_n2_seed7"
  assert sorted(os.listdir(workdir / "samples")) == [
      f"{name.name}.npz", f"{name.name}.png", "step_0.png"]
  samples = np.load(f"{name}.npz")["samples"]
  assert_images_close(samples, reference_samples(
      config, params, seed=7, n=2, steps="4,1", sampler="ddim"))
  grid = np.asarray(Image.open(f"{name}.png"))
  expected = image_grid.make_grid(samples.astype(np.float32) / 127.5 - 1.0)
  np.testing.assert_array_equal(grid[::8, ::8], expected[..., 0])


def test_cli_default_names_keep_different_requests_apart(tmp_path):
  """eta, raw parameters and conditioning (image files by content) name the output."""
  workdir = tmp_path / "run"
  config = tiny_config()
  checkpointing.save_pretrained(str(workdir), config, random_params(config))
  mask = np.zeros((8, 8), np.uint8)
  mask[:, :4] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  for i in range(2):
    Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(tmp_path / f"img{i}.png")
  requests = [["--sampler", "ddim", "--eta", "0.5", "--params", "raw"]] + [
      ["--inpaint", str(tmp_path / f"img{i}.png"), "--mask", str(tmp_path / "mask.png")]
      for i in range(2)]
  for request in requests:
    r = run_cli("--workdir", str(workdir), "--num_samples", "1", "--steps", "5",
                "--grid", "none", *request)
    assert r.returncode == 0, r.stderr
  names = sorted(os.listdir(workdir / "samples"))
  assert len(names) == 3 and names[2] == "sample_step0_ddim5_eta0.5_raw_n1_seed0.npz", names
  assert all(re.fullmatch(r"sample_step0_ancestral5_cond[0-9a-f]{8}_n1_seed0\.npz", n)
             for n in names[:2]), names
  # One file per image: their known halves are the two images.
  known = sorted(int(np.load(workdir / "samples" / n)["samples"][0, :, :4].mean())
                 for n in names[:2])
  assert known == [0, 60]


def test_cli_dtype_sets_the_compute_dtype_and_names_a_change(tmp_path):
  """--dtype bfloat16 on a float32 run: bfloat16 samples, in a file of their own."""
  workdir = tmp_path / "run"
  config = tiny_config()
  params = random_params(config)
  checkpointing.save_pretrained(str(workdir), config, params)
  outputs = {}
  for dtype in ("bfloat16", "float32"):
    r = run_cli("--workdir", str(workdir), "--num_samples", "3", "--steps", "5",
                "--grid", "none", "--seed", "3", "--dtype", dtype, devices=1)
    assert r.returncode == 0, r.stderr
    assert f"(ema params, {dtype}) with ancestral" in r.stdout, r.stdout
  names = sorted(os.listdir(workdir / "samples"))
  # float32 is the run's own dtype: no tag.
  assert names == ["sample_step0_ancestral5_bfloat16_n3_seed3.npz",
                   "sample_step0_ancestral5_n3_seed3.npz"], names
  for name, dtype in zip(names, ("bfloat16", "float32")):
    outputs[dtype] = np.load(workdir / "samples" / name)["samples"].astype(int)
  bf16_config = tiny_config()
  bf16_config.model.dtype = "bfloat16"
  want = {"float32": reference_samples(config, params, seed=3, n=3, steps="5"),
          "bfloat16": reference_samples(bf16_config, params, seed=3, n=3, steps="5")}
  for dtype in outputs:  # one device: the library's program, bit for bit
    assert_images_close(outputs[dtype], want[dtype])
  # bfloat16 rounding shows in the images (36 levels over 192 pixels here).
  assert np.abs(want["bfloat16"].astype(int) - want["float32"]).sum() > 10


_OUT_NAMES = r"""
import json, sys
from ddpm_jax import diffusion, sample, schedules
d = diffusion.GaussianDiffusion.create(schedules.get_beta_schedule("linear", 20))
names = []
for flag, step in json.loads(sys.argv[1]):
  sample.FLAGS.unparse_flags()
  sample.FLAGS(["sample", "--workdir=w", f"--{flag}=other_run"])
  names.append(sample._default_out(4, d, 20, False, {flag: step}))
print(json.dumps(names))
"""


def test_default_names_tell_a_guide_or_upsampler_checkpoint_apart():
  """A classifier or upsampler run trained on kept its path, and so the name:
  the newer weights' samples overwrote the older ones."""
  cases = [["upsampler_workdir", 4], ["upsampler_workdir", 6],
           ["classifier_workdir", 4], ["classifier_workdir", 8]]
  r = subprocess.run([sys.executable, "-c", _OUT_NAMES, json.dumps(cases)],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  names = json.loads(r.stdout)
  assert all(re.fullmatch(r"w/samples/sample_step4_ancestral20_cond[0-9a-f]{8}_n64_seed0\.npz", n)
             for n in names), names
  assert len(set(names)) == 4, names


@pytest.mark.slow  # 20-60 s on 2 quiet cores: the default run stays under 15 min
def test_cli_default_names_tell_the_steps_and_count_apart(tmp_path):
  """Requests running the same number K of different steps, or another
  number of samples, keep their own files; K evenly spread steps have one name."""
  workdir = tmp_path / "run"
  config = tiny_config()  # T = 20
  checkpointing.save_pretrained(str(workdir), config, random_params(config))
  for steps, n in [("4", 1), ("ddim4", 1), ("3,1", 1), ("1,3", 1), ("4", 2)]:
    r = run_cli("--workdir", str(workdir), "--num_samples", str(n), "--steps",
                steps, "--grid", "none")
    assert r.returncode == 0, r.stderr
  prefix = "sample_step0_ancestral4"
  assert sorted(os.listdir(workdir / "samples")) == sorted([
      f"{prefix}_n1_seed0.npz", f"{prefix}_strided_n1_seed0.npz",
      f"{prefix}_sections3-1_n1_seed0.npz", f"{prefix}_sections1-3_n1_seed0.npz",
      f"{prefix}_n2_seed0.npz"])
  # 20 evenly spread steps of T = 20 are all of them: the same as no --steps.
  r = run_cli("--workdir", str(workdir), "--num_samples", "1", "--steps",
              "ddim20", "--grid", "none")
  assert r.returncode == 0, r.stderr
  assert os.path.exists(workdir / "samples" / "sample_step0_ancestral20_n1_seed0.npz")


def test_cli_request_errors_come_before_sampling_and_create_nothing(
    pretrained_run, tmp_path):
  out = str(tmp_path / "newd" / "s.npz")
  for args, message in [
      (["--class_label", "3"], "unconditional"),
      (["--resample", "2"], "inpainting only"),
      (["--classifier_workdir", pretrained_run], "not 'classifier'"),
      (["--upsampler_workdir", pretrained_run], "not a super-resolution"),
  ]:
    r = run_cli("--workdir", pretrained_run, "--out", out, *args)
    assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
    assert "Sampling" not in r.stdout, args
    assert not os.path.exists(tmp_path / "newd"), args


def test_cli_refuses_flags_it_would_ignore(pretrained_run):
  for args, message in [
      (["--upsampler_steps", "5"], "--upsampler_steps is for the second stage"),
      (["--upsampler_aug_level", "3"], "--upsampler_aug_level is for the second"),
      (["--classifier_scale", "2"], "--classifier_scale needs --classifier_workdir"),
      (["--eta", "0.5"], "pass --sampler ddim"),
  ]:
    r = run_cli("--workdir", pretrained_run, *args)
    assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
  # Default values are not refused: the next check (K > T) reports instead.
  r = run_cli("--workdir", pretrained_run, "--eta", "0", "--classifier_scale",
              "1", "--steps", "50")
  assert r.returncode == 1 and "only T=20" in r.stderr, r.stderr


def test_a_classifier_run_is_refused_as_the_model():
  from configs import digits_classifier  # pylint: disable=g-import-not-at-top
  from ddpm_jax.metrics import bpd  # pylint: disable=g-import-not-at-top
  config = digits_classifier.get_config("test")
  with pytest.raises(ValueError, match="--classifier_workdir"):
    generation.sampling_diffusion(config, generation.SamplerOptions())
  with pytest.raises(ValueError, match="no likelihood"):
    bpd.evaluate_bpd(config, {}, num_examples=2)
