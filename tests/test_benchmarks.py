"""Smoke tests of the benchmarks: they run end to end on a tiny model, against
the diffusers peer, and report positive finite numbers. No speed assertions:
timings belong in benchmarks/RESULTS.md, not in tests.
"""
import collections
import fractions
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import pytest

from benchmarks import measure
from benchmarks import peer
from benchmarks import peer_process
from benchmarks import sample_time
from benchmarks import throughput


def tiny_config():
  """digits:test shrunk to one level: compiles in seconds on a loaded CPU."""
  config = measure.load_config("configs/digits.py:test")
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.diffusion.num_timesteps = 20
  return config


def finite_positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_summary(s):
  assert s["n"] >= 1
  assert all(finite_positive(s[k]) for k in ("min", "median", "max")), s
  assert s["min"] <= s["median"] <= s["max"]


def test_cifar10_peer_is_the_published_network():
  """Our CIFAR-10 config maps to google/ddpm-cifar10-32, with the paper's 35,746,307 params."""
  config = measure.load_config("configs/cifar10.py")
  cfg = peer.diffusers_unet_config(config)
  assert cfg.pop("dropout") == 0.1
  assert cfg == peer.GOOGLE_DDPM_CIFAR10_32
  unet = peer.create_unet(config)
  assert peer.num_params(unet) == 35_746_307


def test_peer_train_step_uses_dropout_after_sampling():
  """The peer module is shared by its train step and its sampler: the train
  step must run in training mode (dropout on) whatever ran before it."""
  config = tiny_config()
  config.model.dropout = 0.5
  unet = peer.create_unet(config)
  step = peer.make_train_step(config, unet, batch_size=2)
  _, init, run = peer.make_sampler(config, unet, batch_size=2)
  run(init(), [5])
  seen = []
  hook = unet.register_forward_hook(lambda module, args, out: seen.append(module.training))
  step()
  hook.remove()
  assert seen == [True]
  run(init(), [5])
  assert not unet.training


def test_peer_rejects_models_it_cannot_mirror():
  config = tiny_config()
  config.model.num_classes = 10
  with pytest.raises(ValueError, match="unconditional fixed-variance"):
    peer.diffusers_unet_config(config)


def test_throughput_smoke():
  lines = []
  result = throughput.run_benchmark(tiny_config(), batch_size=2, repeats=1, train_iters=1,
                                    sample_steps=2, compare="diffusers", matmul_size=256,
                                    log=lines.append)
  ours, theirs = result["ours"], result["theirs"]
  assert ours["num_params"] == theirs["num_params"] > 0
  for side in (ours, theirs):
    for key in ("train_images_per_s", "sample_evals_per_s", "forward_gflops",
                "forward_fraction_of_matmul", "train_gflops", "train_fraction_of_matmul"):
      if key in side:
        check_summary(side[key])
    assert "train_images_per_s" in side and "sample_evals_per_s" in side
  for kind in ("train", "sample", "forward"):
    check_summary(result["ratio"][kind])
    check_summary(result["ratio_cpu_time"][kind])
  for side in (ours, theirs):
    for s in side["cpu_s"].values():
      check_summary(s)
  check_summary(result["matmul_gflops"])
  assert finite_positive(ours["forward_gflop"])
  # A train step costs more than a forward pass (backward, optimiser).
  assert ours["train_step_gflop"] > 2 * ours["forward_gflop"]
  assert all(finite_positive(v) for v in ours["compile_s"].values())
  assert finite_positive(result["peak_memory"]["bytes"])
  text = "\n".join(lines)
  assert "ours / theirs" in text and "train images/s" in text


def test_throughput_train_only():
  """--parts train compiles and times the train step alone (the memory check of
  the 256x256 models); the forward FLOPs are still counted."""
  lines = []
  result = throughput.run_benchmark(tiny_config(), batch_size=2, repeats=1, train_iters=1,
                                    sample_steps=2, matmul_size=256, parts=("train",),
                                    log=lines.append)
  ours = result["ours"]
  check_summary(ours["train_images_per_s"])
  check_summary(ours["train_gflops"])
  assert "sample_evals_per_s" not in ours and "forward_s" not in ours
  assert list(ours["compile_s"]) == ["train"]
  assert set(ours["cpu_s"]) == {"train_step"}
  assert ours["train_step_gflop"] > 2 * ours["forward_gflop"] > 0
  assert result["setup"]["parts"] == ["train"]
  text = "\n".join(lines)
  assert "train images/s" in text and "sample evals/s" not in text


def test_throughput_profile(tmp_path):
  """--profile traces each part once more and summarises it per op kind."""
  lines = []
  result = throughput.run_benchmark(tiny_config(), batch_size=2, repeats=1, train_iters=2,
                                    sample_steps=2, matmul_size=256, parts=("train", "forward"),
                                    profile_dir=str(tmp_path), log=lines.append)
  assert set(result["profile"]) == {"train", "forward"}
  for part in ("train", "forward"):
    summary = result["profile"][part]
    assert summary["trace"].startswith(str(tmp_path / part))
    assert summary["ops"] and 0 < summary["busy_ms"] <= summary["span_ms"]
  assert any(line.startswith("== profile of ours, train") for line in lines)


def test_flops_without_lowered_cost_analysis(monkeypatch):
  """On GPU, JAX 0.11 gives no cost analysis of lowered programs: a direct-conv
  model then counts the compiled program's FLOPs, close to the lowered count."""
  config = tiny_config()
  config.model.conv_algorithm = "direct"
  run = lambda: throughput.run_benchmark(config, batch_size=2, repeats=1, train_iters=1,
                                         sample_steps=2, matmul_size=256,
                                         parts=("train", "forward"), log=lambda _: None)
  lowered = run()["ours"]
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
  compiled = run()["ours"]
  for key in ("train_step_gflop", "forward_gflop"):
    assert compiled[key] == pytest.approx(lowered[key], rel=0.05), key
  # A program that runs Winograd convolutions is not the direct count: none then.
  config.model.conv_algorithm = "winograd"
  assert run()["ours"]["train_step_gflop"] == 0


def test_sample_time_smoke():
  lines = []
  result = sample_time.run_benchmark(tiny_config(), num_samples=3, batch_size=2,
                                     measured_steps=2, ddim_steps=5, repeats=1,
                                     compare="diffusers", log=lines.append)
  assert set(result) >= {"ancestral", "ddim5"}
  for label, steps in (("ancestral", 20), ("ddim5", 5)):
    entry = result[label]
    assert entry["steps"] == steps and entry["measured_steps"] == 2 and entry["extrapolated"]
    for side in ("ours", "theirs"):
      check_summary(entry[side]["step_s"])
      check_summary(entry[side]["step_cpu_s"])
      # 2 batches of the full chain, extrapolated from the median step time.
      assert entry[side]["total_s"] == pytest.approx(
          entry[side]["step_s"]["median"] * steps * 2)
    check_summary(entry["ratio"])
    check_summary(entry["ratio_cpu_time"])
  assert any("extrapolated from 2 of 20 steps" in line for line in lines)


@pytest.mark.parametrize("module, args, message", [
    (throughput, ["--config", "configs/nope.py"], "no such file"),
    (throughput, ["--config", "configs/digits.py:test", "--dtype", "bfloat16",
                  "--compare", "diffusers"], "float32 on both sides"),
    (throughput, ["--config", "configs/digits.py:test", "--parts", "train,backward"],
     "--parts must be a non-empty subset of train,sample,forward"),
    (sample_time, ["--config", "configs/digits.py:test", "--num_samples", "0"],
     "--num_samples must be >= 1"),
])
def test_cli_errors(module, args, message, capsys):
  assert module.main(args) == 2
  assert message in capsys.readouterr().err


GPU_SH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "gpu.sh")


def run_gpu_sh(*args, **kwargs):
  return subprocess.run(["bash", GPU_SH, *args], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(os.path.dirname(GPU_SH)),
                        env={**os.environ, "PYTHON": sys.executable}, **kwargs)


def test_gpu_sh_static_checks():
  if shutil.which("shellcheck"):
    proc = subprocess.run(["shellcheck", GPU_SH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
  proc = run_gpu_sh("--help")
  assert proc.returncode == 0 and "--steps" in proc.stdout and "set -uo" not in proc.stdout
  for args, message in ((["--steps", "mfu,bogus"], "unknown step 'bogus'"),
                        (["--steps", ""], "--steps needs"), (["--fast"], "unknown option")):
    proc = run_gpu_sh(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_gpu_sh_smoke_runs_the_chosen_step(tmp_path):
  """--smoke --steps mem256 runs that step alone (tiny model) and writes its JSON."""
  proc = run_gpu_sh("--smoke", "--steps", "mem256", str(tmp_path))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "== mem256: exit 0" in proc.stdout and "== mfu" not in proc.stdout
  assert sorted(os.listdir(tmp_path)) == ["mem256.json", "mem256.log"]
  with open(tmp_path / "mem256.json") as f:
    result = json.load(f)
  assert result["setup"]["parts"] == ["train"] and result["setup"]["remat"]
  check_summary(result["ours"]["train_images_per_s"])


def test_peer_process_calls_and_errors():
  """The peer object lives in another process: calls return its results, its
  exceptions are raised again here, and close() ends the process."""
  with peer_process.PeerProcess(collections.Counter, "abcab") as counter:
    assert counter.most_common(2) == [("a", 2), ("b", 2)]
    with pytest.raises(AttributeError, match="no_such_method"):
      counter.no_such_method()
    assert counter.total() == 5  # still serving after an error
    process = counter._process  # pylint: disable=protected-access
    assert process.pid != os.getpid()
  assert not process.is_alive()
  with pytest.raises(ZeroDivisionError):
    peer_process.PeerProcess(fractions.Fraction, 1, 0)
