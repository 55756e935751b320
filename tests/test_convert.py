"""Tests of ddpm_jax.convert against the real diffusers UNet2DModel (peer implementation)."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from ddpm_jax import convert, models  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The google/ddpm-cifar10-32 UNet2DModel configuration.
CIFAR10_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, norm_eps=1e-6, act_fn="silu", attention_head_dim=None,
    freq_shift=1, flip_sin_to_cos=False, time_embedding_type="positional",
    downsample_padding=0, center_input_sample=False,
    resnet_time_scale_shift="default", add_attention=True)

# Small, with attention on the down path, in the middle and on the up path.
SMALL_CONFIG = dict(CIFAR10_CONFIG, sample_size=16, block_out_channels=(32, 64),
                    layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def make_unet(config, seed=0):
  """A diffusers UNet2DModel with every parameter random and non-zero."""
  torch.manual_seed(seed)
  unet = diffusers.UNet2DModel(**config)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim == 1:  # GroupNorm scale
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:  # fan-in scaling keeps activations O(1) through the depth
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  return unet.eval()


def save_unet(unet, directory, scheduler=None):
  unet.save_pretrained(directory, safe_serialization=True)
  if scheduler is not None:
    with open(os.path.join(directory, convert.SCHEDULER_FILE), "w") as f:
      json.dump(scheduler, f)
  return directory


def diffusers_output(unet, x_nhwc, t):
  with torch.no_grad():
    out = unet(torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2)),
               torch.from_numpy(np.asarray(t, np.int64))).sample
  return out.numpy().transpose(0, 2, 3, 1)


def our_output(params, config, x, t):
  model = models.create_model(config)
  return np.asarray(jax.jit(model.apply)({"params": params}, x, t))


def random_batch(size, batch, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  return x


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(diffusers model, saved directory) of the small configuration."""
  unet = make_unet(SMALL_CONFIG)
  directory = save_unet(
      unet, str(tmp_path_factory.mktemp("small")),
      scheduler={"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
                 "beta_start": 1e-4, "beta_end": 0.02,
                 "beta_schedule": "linear", "variance_type": "fixed_small",
                 "clip_sample": True})
  return unet, directory


def test_small_model_matches_diffusers(small):
  unet, directory = small
  params, config = convert.from_diffusers(directory)
  assert config.data.image_size == 16 and config.data.channels == 3
  assert config.model.ch == 32 and tuple(config.model.ch_mult) == (1, 2)
  assert config.model.num_res_blocks == 1
  assert tuple(config.model.attn_resolutions) == (8,)
  assert config.model.num_classes == 0
  assert config.diffusion.model_var_type == "fixedsmall"
  x = random_batch(16, 4)
  t = np.array([0, 17, 500, 999], np.int32)
  expected = diffusers_output(unet, x, t)
  assert np.abs(expected).mean() > 0.1  # a test that can fail
  got = our_output(params, config, x, t)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_multi_head_scale_shift_model_matches_diffusers(tmp_path):
  """Improved DDPM's blocks: 4 heads of 16 channels, scale-shift GroupNorm."""
  unet = make_unet(dict(SMALL_CONFIG, attention_head_dim=16,
                        resnet_time_scale_shift="scale_shift",
                        attn_norm_num_groups=32), seed=5)
  params, config = convert.from_diffusers(save_unet(unet, str(tmp_path)))
  assert config.model.num_heads == 4 and config.model.scale_shift_norm
  assert params["mid_block_0"]["temb_proj"]["kernel"].shape == (128, 128)
  x = random_batch(16, 2, seed=6)
  t = np.array([3, 700], np.int32)
  expected = diffusers_output(unet, x, t)
  np.testing.assert_allclose(our_output(params, config, x, t), expected,
                             atol=1e-4, rtol=0)
  # The same weights with one head are another function: the test can fail.
  config.model.num_heads = 1
  assert np.abs(our_output(params, config, x, t) - expected).max() > 1e-2


def test_cifar10_model_matches_diffusers(tmp_path):
  unet = make_unet(CIFAR10_CONFIG, seed=1)
  assert sum(p.numel() for p in unet.parameters()) == 35_746_307
  directory = save_unet(unet, str(tmp_path))
  params, config = convert.from_diffusers(directory)
  assert sum(p.size for p in jax.tree.leaves(params)) == 35_746_307
  assert tuple(config.model.ch_mult) == (1, 2, 2, 2)
  assert tuple(config.model.attn_resolutions) == (16,)
  x = random_batch(32, 2, seed=1)
  t = np.array([3, 742], np.int32)
  expected = diffusers_output(unet, x, t)
  got = our_output(params, config, x, t)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_old_attention_names_are_accepted(small, tmp_path):
  _, directory = small
  state = load_file(os.path.join(directory, convert.SAFETENSORS_FILE))
  old = {}
  for key, value in state.items():
    for new, old_name in convert._OLD_ATTN_NAMES.items():
      key = key.replace(f".{new}.", f".{old_name}.")
    old[key] = value
  assert any(".proj_attn." in k for k in old)
  save_file(old, str(tmp_path / convert.SAFETENSORS_FILE))
  with open(os.path.join(directory, convert.CONFIG_FILE)) as f:
    (tmp_path / convert.CONFIG_FILE).write_text(f.read())
  params_new, _ = convert.from_diffusers(directory)
  params_old, _ = convert.from_diffusers(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params_new, params_old)


def test_layouts_are_transposed_as_flax_expects(small):
  _, directory = small
  state = load_file(os.path.join(directory, convert.SAFETENSORS_FILE))
  params, _ = convert.from_diffusers(directory)
  np.testing.assert_array_equal(  # conv OIHW -> HWIO
      params["conv_in"]["kernel"],
      state["conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(  # linear (out, in) -> (in, out)
      params["up_1_attn_0"]["proj_out"]["kernel"],
      state["up_blocks.0.attentions.0.to_out.0.weight"].T)
  np.testing.assert_array_equal(  # 1x1 conv shortcut -> Dense
      params["up_0_block_1"]["shortcut"]["kernel"],
      state["up_blocks.1.resnets.1.conv_shortcut.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(
      params["norm_out"]["scale"], state["conv_norm_out.weight"])


def test_pipeline_layout_and_scheduler_mapping(small, tmp_path):
  _, directory = small
  unet_dir = tmp_path / "unet"
  unet_dir.mkdir()
  for name in (convert.CONFIG_FILE, convert.SAFETENSORS_FILE):
    (unet_dir / name).write_bytes(open(os.path.join(directory, name),
                                       "rb").read())
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / convert.SCHEDULER_FILE).write_text(json.dumps({
      "_class_name": "DDPMScheduler", "num_train_timesteps": 4000,
      "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_large",
      "prediction_type": "v_prediction"}))
  _, config = convert.from_diffusers(str(tmp_path))
  d = config.diffusion
  assert (d.num_timesteps, d.beta_schedule, d.model_var_type,
          d.model_mean_type) == (4000, "cosine", "fixedlarge", "v")

  # Without a scheduler config: the project defaults.
  (tmp_path / "scheduler" / convert.SCHEDULER_FILE).unlink()
  _, config = convert.from_diffusers(str(tmp_path))
  d = config.diffusion
  assert (d.num_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
          d.model_var_type) == (1000, "linear", 1e-4, 0.02, "fixedlarge")


def write_config_only(tmp_path, **changes):
  config = dict(SMALL_CONFIG, _class_name="UNet2DModel")
  config.update(changes)
  config = {k: v for k, v in config.items() if v is not KeyError}
  (tmp_path / convert.CONFIG_FILE).write_text(json.dumps(config))
  return str(tmp_path)


@pytest.mark.parametrize("changes, match", [
    (dict(freq_shift=0), "freq_shift=0"),
    (dict(freq_shift=KeyError), "freq_shift=0"),  # missing: diffusers default
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos=True"),
    (dict(downsample_padding=1), "downsample_padding=1"),
    (dict(norm_eps=1e-5), "norm_eps=1e-05"),
    (dict(attention_head_dim=48), "attention_head_dim=48 .*number of heads"),
    (dict(num_class_embeds=10), "num_class_embeds=10"),
    (dict(resnet_time_scale_shift="scale_shift"), "attn_norm_num_groups=None"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
    (dict(up_block_types=("UpBlock2D", "AttnUpBlock2D")),
     "different resolutions"),
    (dict(down_block_types=("DownBlock2D", "SkipDownBlock2D")),
     "SkipDownBlock2D"),
    (dict(block_out_channels=(32, 48)), "multiples"),
    (dict(block_out_channels=(48, 96)), "model.ch=48"),
    (dict(out_channels=4), "out_channels=4"),
    (dict(_class_name="UNet2DConditionModel"), "UNet2DModel"),
    # Wrong types name the file, the key and the expected form.
    (dict(block_out_channels=32),
     r"config\.json: block_out_channels=32 must be a non-empty list of "
     r"positive ints"),
    (dict(block_out_channels="abc"),
     r"config\.json: block_out_channels='abc' must be a non-empty list"),
    (dict(block_out_channels=[32, 0]), r"block_out_channels=\[32, 0\]"),
    (dict(down_block_types="DownBlock2D"),
     r"down_block_types='DownBlock2D' must be a non-empty list"),
    (dict(layers_per_block="2"), r"layers_per_block='2' must be a positive"),
    (dict(in_channels=3.5), r"in_channels=3\.5 must be a positive int"),
    (dict(attention_head_dim="8"), r"attention_head_dim='8' must be"),
    (dict(norm_eps="1e-6"), r"norm_eps='1e-6' must be a number"),
])
def test_unrepresentable_configs_are_refused(tmp_path, changes, match):
  directory = write_config_only(tmp_path, **changes)
  with pytest.raises(convert.ConversionError, match=match):
    convert.from_diffusers(directory)


def test_missing_files(tmp_path):
  with pytest.raises(convert.ConversionError, match="not a directory"):
    convert.from_diffusers(str(tmp_path / "nope"))
  with pytest.raises(convert.ConversionError, match="no config.json"):
    convert.from_diffusers(str(tmp_path))
  directory = write_config_only(tmp_path)
  with pytest.raises(convert.ConversionError, match="neither"):
    convert.from_diffusers(directory)


def test_scheduler_errors(small, tmp_path):
  _, directory = small
  for name in (convert.CONFIG_FILE, convert.SAFETENSORS_FILE):
    (tmp_path / name).write_bytes(open(os.path.join(directory, name),
                                       "rb").read())
  for scheduler, match in [({"variance_type": "learned_range"}, "2C|C output"),
                           ({"beta_schedule": "sigmoid"}, "beta_schedule"),
                           ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
                           ({"rescale_betas_zero_snr": True},
                            "rescale_betas_zero_snr=True is not supported")]:
    (tmp_path / convert.SCHEDULER_FILE).write_text(json.dumps(scheduler))
    with pytest.raises(convert.ConversionError, match=match):
      convert.from_diffusers(str(tmp_path))


@pytest.mark.parametrize("scheduler, match", [
    ({"num_train_timesteps": 0}, r"num_train_timesteps=0 must be a positive"),
    ({"num_train_timesteps": -5}, r"num_train_timesteps=-5 must be"),
    ({"num_train_timesteps": "1000"}, r"num_train_timesteps='1000' must be"),
    ({"beta_end": 2.0}, r"scheduler_config\.json .*beta_end=2\.0 .*outside"),
    ({"beta_start": 0.0}, r"scheduler_config\.json .*beta_start=0\.0"),
    ({"beta_start": "x"}, r"scheduler_config\.json: beta_start='x' must be a"),
])
def test_invalid_schedules_are_refused_before_writing(tmp_path, scheduler,
                                                      match):
  """Every later tool builds the schedule: convert refuses what they would."""
  directory = write_config_only(tmp_path)
  (tmp_path / convert.SCHEDULER_FILE).write_text(json.dumps(scheduler))
  # The config alone is refused (before any weights are read).
  with pytest.raises(convert.ConversionError, match=match):
    convert.config_from_diffusers(directory)
  with pytest.raises(convert.ConversionError, match=match):
    convert.convert_to_workdir(directory, str(tmp_path / "out" / "run"))
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheduler", [
    {"clip_sample": False}, {"clip_sample_range": 2.0}, {"thresholding": True}])
def test_other_clipping_converts_with_a_warning(tmp_path, scheduler):
  directory = write_config_only(tmp_path)
  (tmp_path / convert.SCHEDULER_FILE).write_text(json.dumps(scheduler))
  (key, value), = scheduler.items()
  with pytest.warns(convert.ConversionWarning,
                    match=rf"{key}={value!r}: ddpm_jax's samplers clip"):
    convert.config_from_diffusers(directory)
  # diffusers' defaults (the official google/ddpm-* schedulers) warn of nothing.
  (tmp_path / convert.SCHEDULER_FILE).write_text(json.dumps(
      {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": False}))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    convert.config_from_diffusers(directory)


def test_ddpm_jax_run_directory_is_not_a_diffusers_folder(tmp_path):
  # The config.json a ddpm_jax run writes (checkpointing.write_config).
  (tmp_path / convert.CONFIG_FILE).write_text(
      convert._default_config().to_json_best_effort(indent=2))
  with pytest.raises(convert.ConversionError,
                     match="is a ddpm_jax run directory.*--workdir"):
    convert.config_from_diffusers(str(tmp_path))
  (tmp_path / convert.CONFIG_FILE).write_text(json.dumps({"foo": 1}))
  with pytest.raises(convert.ConversionError,
                     match="is not a diffusers UNet2DModel folder"):
    convert.config_from_diffusers(str(tmp_path))


def test_digits_base_config_needs_a_greyscale_model(tmp_path):
  from configs import digits  # pylint: disable=g-import-not-at-top
  directory = write_config_only(tmp_path)
  with pytest.raises(convert.ConversionError,
                     match=r"'digits', which is greyscale .* 3 input channels"):
    convert.config_from_diffusers(directory, digits.get_config())
  # A greyscale model is fine: the digits are resized to any image size.
  directory = write_config_only(tmp_path, in_channels=1, out_channels=1)
  config = convert.config_from_diffusers(directory, digits.get_config())
  assert config.data.dataset == "digits" and config.data.channels == 1
  assert config.data.image_size == 16


def test_default_config_names_a_data_set_of_the_model_channels(tmp_path):
  # Without --config a greyscale model gets the built-in greyscale data set
  # (CIFAR-10 is RGB: evaluate and fine-tuning would refuse the run).
  (tmp_path / "grey").mkdir()
  (tmp_path / "rgb").mkdir()
  grey = convert.config_from_diffusers(
      write_config_only(tmp_path / "grey", in_channels=1, out_channels=1))
  assert (grey.data.dataset, grey.data.channels) == ("digits", 1)
  assert not grey.data.random_flip
  rgb = convert.config_from_diffusers(write_config_only(tmp_path / "rgb"))
  assert (rgb.data.dataset, rgb.data.channels) == ("cifar10", 3)


@pytest.mark.parametrize("edit, match", [
    ("shape", r"conv_in\.weight"),
    ("missing", r"mid_block\.attentions\.0\.to_k\.bias"),
    ("extra", r"class_embedding\.weight"),
])
def test_weight_errors_name_the_parameter(small, tmp_path, edit, match):
  _, directory = small
  state = load_file(os.path.join(directory, convert.SAFETENSORS_FILE))
  if edit == "shape":
    state["conv_in.weight"] = state["conv_in.weight"][:, :2]
  elif edit == "missing":
    del state["mid_block.attentions.0.to_k.bias"]
  else:
    state["class_embedding.weight"] = np.zeros((10, 128), np.float32)
  save_file(state, str(tmp_path / convert.SAFETENSORS_FILE))
  (tmp_path / convert.CONFIG_FILE).write_bytes(
      open(os.path.join(directory, convert.CONFIG_FILE), "rb").read())
  with pytest.raises(convert.ConversionError, match=match):
    convert.from_diffusers(str(tmp_path))


def run_cli(*args, cwd=REPO_ROOT):
  # From another directory: the installed package only, no checkout on the path.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT if cwd == REPO_ROOT else "")
  return subprocess.run([sys.executable, "-m", "ddpm_jax.convert", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_cli_writes_a_run_that_loads(small, tmp_path):
  checkpointing = pytest.importorskip("ddpm_jax.checkpointing")
  unet, directory = small
  workdir = str(tmp_path / "run")
  result = run_cli("--diffusers", directory, "--workdir", workdir)
  assert result.returncode == 0, result.stderr
  # orbax's INFO lines are silenced, as in sample/evaluate/train.
  assert "_NonBlockingMetadataStore" not in result.stderr, result.stderr
  assert not [n for n in os.listdir(tmp_path) if n != "run"]  # no temp left
  config, params, step = checkpointing.load_params(workdir)
  assert step == 0
  assert tuple(config.model.attn_resolutions) == (8,)
  assert config.diffusion.model_var_type == "fixedsmall"
  expected_params, _ = convert.from_diffusers(directory)
  jax.tree.map(np.testing.assert_array_equal, expected_params, params)
  x = random_batch(16, 2, seed=3)
  t = np.array([5, 321], np.int32)
  np.testing.assert_allclose(our_output(params, config, x, t),
                             diffusers_output(unet, x, t), atol=1e-4, rtol=0)

  # --variance fixedlarge: the paper's CIFAR-10 sampling, in the run's config.
  result = run_cli("--diffusers", directory, "--workdir", workdir + "_large",
                   "--variance", "fixedlarge")
  assert result.returncode == 0, result.stderr
  assert "fixedlarge" in result.stdout
  large, large_params, _ = checkpointing.load_params(workdir + "_large")
  assert large.diffusion.model_var_type == "fixedlarge"
  jax.tree.map(np.testing.assert_array_equal, params, large_params)
  # The sampler's variance at t = 1: beta_t, versus the posterior's
  # beta_t (1 - abar_{t-1}) / (1 - abar_t), in float64 here.
  from ddpm_jax import diffusion  # pylint: disable=g-import-not-at-top
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  abar = np.cumprod(1 - betas)
  want = {"fixedlarge": betas[1],
          "fixedsmall": betas[1] * (1 - abar[0]) / (1 - abar[1])}
  for c in (config, large):
    got = diffusion.p_mean_variance(
        models.create_diffusion(c), jnp.zeros((1, 16, 16, 3)),
        jnp.zeros((1, 16, 16, 3)), jnp.array([1], jnp.int32))["variance"]
    np.testing.assert_allclose(float(got.ravel()[0]),
                               want[c.diffusion.model_var_type], rtol=1e-5)
  assert want["fixedlarge"] > 1.5 * want["fixedsmall"]  # the two differ
  # A second conversion into the same workdir is refused; nothing changes.
  before = sorted(os.listdir(workdir))
  with pytest.raises(convert.ConversionError, match="already holds"):
    convert.convert_to_workdir(directory, workdir)
  assert sorted(os.listdir(workdir)) == before


def test_cli_prints_the_clipping_warning_as_one_line(small, tmp_path):
  _, directory = small
  source = tmp_path / "source"
  shutil.copytree(directory, source)
  scheduler = json.loads((source / convert.SCHEDULER_FILE).read_text())
  (source / convert.SCHEDULER_FILE).write_text(
      json.dumps(dict(scheduler, clip_sample=False)))
  result = run_cli("--diffusers", str(source), "--workdir", str(tmp_path / "run"))
  assert result.returncode == 0, result.stderr
  warning, = [line for line in result.stderr.splitlines() if "clip" in line]
  assert warning.startswith("warning: scheduler_config.json: clip_sample=False: "
                            "ddpm_jax's samplers clip"), result.stderr
  assert "warnings.warn" not in result.stderr


def test_cli_runs_from_another_directory(small, tmp_path):
  """configs/default.py is found beside the package; bad overrides are one line."""
  _, directory = small
  result = run_cli("--diffusers", directory, "--workdir", "run", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  with open(tmp_path / "run" / convert.CONFIG_FILE) as f:
    assert json.load(f)["data"]["image_size"] == 16
  result = run_cli("--diffusers", directory, "--workdir", "run2", "--config",
                   os.path.join(REPO_ROOT, "configs", "cifar10.py"),
                   "--config.training.bogus=1", cwd=tmp_path)
  assert result.returncode == 1
  assert "unknown config key" in result.stderr and "bogus" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run2").exists()


def test_cli_errors_exit_1_and_write_nothing(small, tmp_path):
  (tmp_path / "src").mkdir()
  bad = write_config_only(tmp_path / "src", downsample_padding=1)
  workdir = tmp_path / "out"
  result = run_cli("--diffusers", bad, "--workdir", str(workdir))
  assert result.returncode == 1
  assert "downsample_padding=1" in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()
  # A shape mismatch found late (after the config passed) also writes nothing.
  _, directory = small
  state = load_file(os.path.join(directory, convert.SAFETENSORS_FILE))
  state["conv_out.bias"] = np.zeros((4,), np.float32)
  save_file(state, str(tmp_path / "src" / convert.SAFETENSORS_FILE))
  write_config_only(tmp_path / "src")
  with pytest.raises(convert.ConversionError, match=r"conv_out\.bias"):
    convert.convert_to_workdir(str(tmp_path / "src"), str(workdir))
  assert not workdir.exists()
  assert sorted(os.listdir(tmp_path)) == ["src"]


def test_workdir_under_a_file_is_refused(tmp_path):
  directory = write_config_only(tmp_path)
  (tmp_path / "afile").write_text("x")
  for workdir in (tmp_path / "afile" / "sub", tmp_path / "afile" / "a" / "b"):
    with pytest.raises(convert.ConversionError,
                       match=r"--workdir .*parent .*afile is a file"):
      convert.convert_to_workdir(directory, str(workdir))
  assert (tmp_path / "afile").read_text() == "x"


def test_base_config_keeps_data_and_training_fields(small):
  from configs import lsun_church256  # pylint: disable=g-import-not-at-top
  _, directory = small
  _, config = convert.from_diffusers(directory, lsun_church256.get_config())
  assert config.data.dataset == "lsun/church_outdoor"
  assert config.optim.lr == 2e-5
  # The model and schedule come from the source, not the base config.
  assert config.data.image_size == 16
  assert tuple(config.model.ch_mult) == (1, 2)
  assert config.diffusion.model_var_type == "fixedsmall"


def test_base_config_loss_fits_the_source_variance(tmp_path):
  """A hybrid-loss base config with a fixed-variance source trains with mse."""
  from configs import cifar10_improved  # pylint: disable=g-import-not-at-top
  base = cifar10_improved.get_config()
  assert base.diffusion.loss_type == "hybrid"
  config = convert.config_from_diffusers(write_config_only(tmp_path), base)
  assert config.diffusion.model_var_type == "fixedlarge"
  assert config.diffusion.loss_type == "mse"
  models.create_diffusion(config)


def test_torch_bin_weights_give_the_same_params(small, tmp_path):
  unet, directory = small
  unet.save_pretrained(str(tmp_path), safe_serialization=False)
  assert os.path.exists(tmp_path / convert.BIN_FILE)
  assert not os.path.exists(tmp_path / convert.SAFETENSORS_FILE)
  params_bin, _ = convert.from_diffusers(str(tmp_path))
  params_st, _ = convert.from_diffusers(directory)
  jax.tree.map(np.testing.assert_array_equal, params_st, params_bin)


def test_learned_variance_model(tmp_path):
  unet = make_unet(dict(SMALL_CONFIG, out_channels=6), seed=2)
  directory = save_unet(unet, str(tmp_path), scheduler={
      "_class_name": "DDPMScheduler", "variance_type": "learned_range"})
  with pytest.raises(convert.ConversionError, match="predicts its variances"):
    convert.convert_to_workdir(directory, str(tmp_path / "run"), variance="fixedlarge")
  assert not (tmp_path / "run").exists()
  params, config = convert.from_diffusers(directory)
  assert config.diffusion.model_var_type == "learned_range"
  # The default config's 'mse' does not train a learned variance: the run
  # gets improved DDPM's hybrid loss, which later tools accept.
  assert config.diffusion.loss_type == "hybrid"
  models.create_diffusion(config)
  assert models.create_model(config).out_ch == 6
  x = random_batch(16, 1, seed=4)
  t = np.array([250], np.int32)
  np.testing.assert_allclose(our_output(params, config, x, t),
                             diffusers_output(unet, x, t), atol=1e-4, rtol=0)


def test_published_256_config_is_the_paper_architecture(tmp_path):
  # config.json and scheduler_config.json as published for google/ddpm-cat-256.
  (tmp_path / convert.CONFIG_FILE).write_text(json.dumps({
      "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4",
      "act_fn": "silu", "attention_head_dim": None,
      "block_out_channels": [128, 128, 256, 256, 512, 512],
      "center_input_sample": False,
      "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D",
                           "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
      "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
      "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3,
      "sample_size": 256, "time_embedding_type": "positional",
      "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D",
                         "UpBlock2D", "UpBlock2D", "UpBlock2D"]}))
  (tmp_path / convert.SCHEDULER_FILE).write_text(json.dumps({
      "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1",
      "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
      "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
      "variance_type": "fixed_small"}))
  config = convert.config_from_diffusers(str(tmp_path))
  assert config.data.image_size == 256
  assert tuple(config.model.ch_mult) == (1, 1, 2, 2, 4, 4)
  assert tuple(config.model.attn_resolutions) == (16,)
  assert config.model.ch == 128 and config.model.num_res_blocks == 2
  d = config.diffusion
  assert (d.num_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
          d.model_mean_type, d.model_var_type) == (
              1000, "linear", 1e-4, 0.02, "eps", "fixedsmall")
  assert config.optim.lr == 2e-5  # the 256x256 fine-tuning recipe
  model = models.create_model(config)
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)},
                         jnp.zeros((1, 256, 256, 3)), jnp.zeros((1,), jnp.int32)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 113_673_219


@pytest.mark.slow
def test_256_model_matches_diffusers(tmp_path):
  # The google/ddpm-church-256 (and celebahq/bedroom) configuration.
  config = dict(
      CIFAR10_CONFIG, sample_size=256,
      block_out_channels=(128, 128, 256, 256, 512, 512),
      down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",
                                               "DownBlock2D"),
      up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
  unet = make_unet(config, seed=3)
  assert sum(p.numel() for p in unet.parameters()) == 113_673_219
  params, ours = convert.from_diffusers(save_unet(unet, str(tmp_path)))
  x = random_batch(256, 1, seed=5)
  t = np.array([611], np.int32)
  np.testing.assert_allclose(our_output(params, ours, x, t),
                             diffusers_output(unet, x, t), atol=1e-4, rtol=0)
