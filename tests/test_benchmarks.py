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


@pytest.mark.slow  # 20-60 s on 2 quiet cores: the default run stays under 15 min
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


@pytest.mark.slow  # 20-60 s on 2 quiet cores: the default run stays under 15 min
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


def _matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every convolution and dot in a jaxpr (sub-jaxprs included)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      # Only the taps that land inside the input count (as XLA counts them).
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      dims = eqn.params["dimension_numbers"]  # specs: (batch/out, feature/in, *spatial)
      assert set(eqn.params["lhs_dilation"]) == {1}
      taps = 1
      for i, (lo, _) in enumerate(eqn.params["padding"]):
        size, k = lhs[dims.lhs_spec[2 + i]], rhs[dims.rhs_spec[2 + i]]
        stride, dil = eqn.params["window_strides"][i], eqn.params["rhs_dilation"][i]
        taps *= sum(0 <= o * stride + j * dil - lo < size
                    for o in range(out[dims.out_spec[2 + i]]) for j in range(k))
      total += (2 * out[dims.out_spec[0]] * out[dims.out_spec[1]] * rhs[dims.rhs_spec[1]]
                * taps)
    elif eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _matmul_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _matmul_flops(sub)
  return total


@pytest.mark.slow  # ~1-2.5 min on 2 cores: the default run stays under 15 min
def test_flops_are_the_direct_programs_on_the_cpu():
  """FLOPs come from XLA's CPU cost analysis of the direct-convolution programs
  (lowered for the CPU on any platform: a GPU's compiled count leaves out its
  cuDNN convolutions), whatever runs: the same count for a Winograd model. The
  forward's count is the network's convolutions and matmuls (counted here from
  the jaxpr) plus a little elementwise work."""
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.model.conv_algorithm = "direct"
  run = lambda: throughput.run_benchmark(config, batch_size=2, repeats=1, train_iters=1,
                                         sample_steps=2, matmul_size=256,
                                         parts=("train", "forward"), log=lambda _: None)
  direct = run()["ours"]
  model = models.create_model(config)
  x = jax.numpy.zeros((2, 8, 8, 1))
  t = jax.numpy.zeros((2,), jax.numpy.int32)
  params = model.init(jax.random.PRNGKey(0), x, t)["params"]
  matmuls = _matmul_flops(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t))(
      params).jaxpr)
  assert matmuls > 0
  assert 1.0 <= direct["forward_gflop"] * 1e9 / matmuls < 1.06
  # A train step is about three forward passes (forward, and two products back).
  assert 2.5 < direct["train_step_gflop"] / direct["forward_gflop"] < 3.5
  config.model.conv_algorithm = "winograd"
  winograd = run()["ours"]
  for key in ("train_step_gflop", "forward_gflop"):
    assert winograd[key] == pytest.approx(direct[key], rel=1e-6), key
  # Two steps per call (a lax.scan): still counted per step, and timed per step.
  scanned = throughput.run_benchmark(config, batch_size=2, repeats=1, train_iters=4,
                                     steps_per_call=2, matmul_size=256, parts=("train",),
                                     log=lambda _: None)
  assert scanned["setup"]["steps_per_call"] == 2
  assert scanned["ours"]["train_step_gflop"] == pytest.approx(direct["train_step_gflop"],
                                                              rel=1e-6)
  check_summary(scanned["ours"]["train_images_per_s"])
  # Model FLOPs: rematerialisation's recomputation is not counted.
  config.model.remat = True
  remat = throughput.run_benchmark(config, batch_size=2, repeats=1, train_iters=1,
                                   matmul_size=256, parts=("train",), log=lambda _: None)
  assert remat["setup"]["remat"]
  assert remat["ours"]["train_step_gflop"] == pytest.approx(direct["train_step_gflop"],
                                                            rel=1e-6)


@pytest.mark.slow  # 20-60 s on 2 quiet cores: the default run stays under 15 min
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
    (throughput, ["--config", "configs/digits.py:test", "--train_iters", "3",
                  "--steps_per_call", "2"], "must be a multiple of --steps_per_call"),
    (sample_time, ["--config", "configs/digits.py:test", "--num_samples", "0"],
     "--num_samples must be >= 1"),
])
def test_cli_errors(module, args, message, capsys):
  assert module.main(args) == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("module, args, message", [
    (throughput, ["--config", "configs/digits_cond.py", "--compare", "diffusers"],
     "unconditional fixed-variance"),
    (throughput, ["--compare", "diffusers", "--torch_threads", "0"],
     "--torch_threads must be >= 1"),
    (throughput, ["--compare", "diffusers", "--torch_threads", "-1"],
     "--torch_threads must be >= 1"),
    (throughput, ["--sample_steps", "0"], "--sample_steps must be in 1..100"),
    (throughput, ["--quick", "--sample_steps", "101"], "--sample_steps must be in 1..100"),
    (throughput, ["--json", "{afile}/x.json"], "is not a directory"),
    (throughput, ["--json", "{tmp}"], "is a directory"),
    (throughput, ["--profile", "{afile}"], "exists and is not a directory"),
    (throughput, ["--profile", "{afile}/sub/dir"], "is not a directory"),
    (sample_time, ["--config", "configs/digits_cond.py", "--compare", "diffusers"],
     "unconditional fixed-variance"),
    (sample_time, ["--torch_threads", "0"], "--torch_threads must be >= 1"),
    (sample_time, ["--ddim_steps", "101"], "--ddim_steps must be in 1..100"),
    (sample_time, ["--json", "{afile}/x.json"], "is not a directory"),
])
def test_cli_errors_come_before_compiling(module, args, message, tmp_path, monkeypatch,
                                          capsys):
  """Arguments that cannot work are refused in seconds with one line, before
  our programs compile (minutes for the large models) and not after the run."""
  def compiles(*unused_args, **unused_kwargs):
    raise AssertionError("compiled before the arguments were checked")
  monkeypatch.setattr(throughput, "Ours", compiles)
  monkeypatch.setattr(sample_time, "_ours", compiles)
  monkeypatch.setattr(measure, "matmul_peak_gflops", compiles)
  afile = tmp_path / "afile"
  afile.write_text("")
  args = [a.format(afile=afile, tmp=tmp_path) for a in args]
  if "--config" not in args:
    args = ["--config", "configs/digits.py:test", *args]
  assert module.main(args) == 2
  err = capsys.readouterr().err
  assert message in err and err.startswith("error: ") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("module, args, expected", [
    (throughput, ["--quick"], dict(repeats=1, train_iters=1, sample_steps=2)),
    (throughput, ["--quick", "--repeats", "3", "--sample_steps", "7"],
     dict(repeats=3, train_iters=1, sample_steps=7)),
    (throughput, ["--train_iters", "4"], dict(repeats=5, train_iters=4, sample_steps=4)),
    (sample_time, ["--quick"], dict(repeats=1, measured_steps=2)),
    (sample_time, ["--quick", "--measured_steps", "9"], dict(repeats=1, measured_steps=9)),
    (sample_time, [], dict(repeats=3, measured_steps=20)),
])
def test_explicit_flags_win_over_quick(module, args, expected, monkeypatch):
  seen = {}
  monkeypatch.setattr(module, "run_benchmark",
                      lambda config, **kwargs: seen.update(kwargs) or {})
  assert module.main(["--config", "configs/digits.py:test", *args]) == 0
  assert {k: seen[k] for k in expected} == expected


def test_write_json_is_atomic_with_the_umask_mode(tmp_path):
  path = tmp_path / "sub" / "r.json"
  old = os.umask(0o022)
  try:
    measure.write_json(str(path), {"a": 1})
  finally:
    os.umask(old)
  assert json.loads(path.read_text()) == {"a": 1}
  assert (os.stat(path).st_mode & 0o777) == 0o644
  assert os.listdir(path.parent) == ["r.json"]


GPU_SH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "gpu.sh")


def run_gpu_sh(*args, env=None):
  return subprocess.run(["bash", GPU_SH, *args], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(os.path.dirname(GPU_SH)),
                        env=env or {**os.environ, "PYTHON": sys.executable})


def test_gpu_sh_static_checks():
  if shutil.which("shellcheck"):
    proc = subprocess.run(["shellcheck", GPU_SH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
  proc = run_gpu_sh("--help")
  assert proc.returncode == 0 and "--steps" in proc.stdout and "set -uo" not in proc.stdout
  for args, message in ((["--steps", "mfu,bogus"], "unknown step 'bogus'"),
                        (["--steps", ""], "--steps needs"), (["--fast"], "unknown option"),
                        (["--budget", "10m"], "--budget needs whole seconds")):
    proc = run_gpu_sh(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.slow  # ~1-2.5 min on 2 cores: the default run stays under 15 min
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


def test_gpu_sh_budget_skips_what_does_not_fit(tmp_path):
  """Steps run in the order named; a step with under 30 s of --budget left is
  skipped, which is not a failure."""
  proc = run_gpu_sh("--smoke", "--budget", "20", "--steps", "sample,mem256", str(tmp_path))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  skipped = [line.split(":")[0] for line in proc.stdout.splitlines()
             if line.endswith("s of the --budget left")]
  assert skipped == ["== sample", "== mem256"]
  assert "== done: 0 step(s) ran, 0 failed, 2 skipped" in proc.stdout
  assert os.listdir(tmp_path) == []


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


@pytest.mark.slow
def test_gpu_sh_smoke_scale(tmp_path):
  """The scale step's three benchmarks run end to end (tiny model)."""
  proc = run_gpu_sh("--smoke", "--steps", "scale", str(tmp_path))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  names = ["scale_train_b4", "scale_train_b8", "scale_sample"]
  for name in names:
    assert f"== {name}: exit 0" in proc.stdout, proc.stdout
  assert sorted(os.listdir(tmp_path)) == sorted(
      f"{n}.{ext}" for n in names for ext in ("json", "log"))
  with open(tmp_path / "scale_train_b8.json") as f:
    result = json.load(f)
  assert result["setup"]["batch_size"] == 8 and result["setup"]["steps_per_call"] == 2


def fake_python(path, body):
  """A python that runs `body` (bash) for `-m MODULE ...` and the real one otherwise."""
  path.write_text(f'#!/bin/bash\nif [[ "$1" == -m ]]; then {body}; fi\n'
                  f'exec {sys.executable} "$@"\n')
  path.chmod(0o755)
  return str(path)


def test_gpu_sh_exits_1_when_a_step_fails(tmp_path):
  """Every step runs; failures are listed at the end and the exit status is 1."""
  py = fake_python(tmp_path / "python", 'echo "step $2"; [[ $2 == benchmarks.sample_time ]]; exit')
  proc = run_gpu_sh("--smoke", "--steps", "mfu,sample,mem256", str(tmp_path / "out"),
                    env={**os.environ, "PYTHON": py})
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "== mfu: exit 1" in proc.stdout and "== sample: exit 0" in proc.stdout
  assert "== mem256: exit 1" in proc.stdout
  assert proc.stdout.splitlines()[-1] == (
      "== FAILED: 3 step(s) ran, 2 failed, 0 skipped for the --budget; failed: "
      "mfu (exit 1) mem256 (exit 1)")


def test_gpu_sh_uses_the_repository_venv(tmp_path):
  """Without $PYTHON, the repository's .venv/bin/python (README's quick start, not
  activated) runs the steps; $PYTHON overrides it."""
  repo = tmp_path / "repo"
  (repo / "benchmarks").mkdir(parents=True)
  shutil.copy(GPU_SH, repo / "benchmarks" / "gpu.sh")
  (repo / ".venv" / "bin").mkdir(parents=True)
  fake_python(repo / ".venv" / "bin" / "python", 'echo "venv python ran $2"; exit 0')
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--smoke", "--steps", "mfu", "out"],
                        capture_output=True, text=True, timeout=300, cwd=repo, env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "venv python ran benchmarks.throughput" in proc.stdout
  assert "PYTHON" in run_gpu_sh("--help").stdout
