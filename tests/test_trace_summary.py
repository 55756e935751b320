"""benchmarks.trace_summary on a hand-written GPU trace (exact numbers) and on
a real CPU trace of a jitted function."""
import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import trace_summary


def write_trace(path, events):
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def gpu_trace(path):
  meta = lambda pid, name: {"ph": "M", "pid": pid, "name": "process_name",
                            "args": {"name": name}}
  kernel = lambda ts, dur, name, op=None, pid=2: {
      "ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": dur, "name": name,
      "args": {"hlo_op": op} if op else {}}
  write_trace(path, [
      meta(1, "/host:CPU"), meta(2, "/device:GPU:0 (NVIDIA H100)"),
      kernel(0, 50, "python work", pid=1),           # host: ignored
      kernel(100, 10, "sm90_gemm_kernel", "dot.1"),  # named by its HLO op
      kernel(105, 10, "other_stream", "dot.2"),      # overlaps: busy counts once
      kernel(200, 30, "loop_add_fusion.3"),
      kernel(300, 20, "loop_add_fusion.4.1"),
  ])


def test_gpu_trace_kinds_busy_and_span(tmp_path):
  path = tmp_path / "x.trace.json.gz"
  gpu_trace(path)
  s = trace_summary.summarize(str(path), steps=2)
  assert s["device"] == "/device:GPU:0 (NVIDIA H100)"
  # Device events only: 100..320 us; busy = 15 (100-115) + 30 + 20 = 65 us; per step / 2.
  assert s["span_ms"] == pytest.approx(0.220 / 2)
  assert s["busy_ms"] == pytest.approx(0.065 / 2)
  assert [(r["kind"], r["ms"], r["count"]) for r in s["ops"]] == [
      ("loop_add_fusion", pytest.approx(0.025), 1), ("dot", pytest.approx(0.010), 1)]
  assert sum(r["percent"] for r in s["ops"]) == pytest.approx(100)


def test_kernels_inside_command_buffers_count_by_kernel_name(tmp_path):
  """A command buffer's op name hides what ran: its kernels are named instead."""
  meta = {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}}
  kernel = lambda ts, name, op: {"ph": "X", "pid": 1, "tid": 1, "ts": ts, "dur": 4,
                                 "name": name, "args": {"hlo_op": op}}
  conv = "sm90_xmma_{}_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_kernel__5x_cudnn"
  write_trace(tmp_path / "g.trace.json.gz", [meta,
      kernel(0, conv.format("fprop"), "cudnn-conv-bias-activation.3"),
      kernel(10, conv.format("wgrad"), "command_buffer_12"),
      kernel(20, "nvjet_sm90_tst_128x96_64x7_2x4_h_bz_TNT", "command_buffer_12"),
      kernel(30, "input_reduce_fusion_474", "command_buffer_12"),
      kernel(40, "input_reduce_fusion_7", "command_buffer_1837"),
      kernel(50, "loop_add_fusion", "command_buffer_1")])
  s = trace_summary.summarize(str(tmp_path))
  assert {r["kind"]: r["count"] for r in s["ops"]} == {
      "cudnn-conv-bias-activation": 1, "cudnn conv wgrad": 1, "cublas gemm": 1,
      "input_reduce_fusion": 2, "loop_add_fusion": 1}


def test_directory_takes_the_trace_inside(tmp_path):
  (tmp_path / "plugins" / "profile" / "run").mkdir(parents=True)
  gpu_trace(tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz")
  assert trace_summary.summarize(str(tmp_path))["ops"][0]["kind"] == "loop_add_fusion"


def test_cpu_trace_of_a_real_program(tmp_path):
  f = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1.0)
  a = jnp.ones((256, 256))
  f(a, a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      f(a, a).block_until_ready()
  s = trace_summary.summarize(str(tmp_path), steps=3)
  assert s["device"] == "cpu"
  kinds = {r["kind"]: r for r in s["ops"]}
  # One matmul per call (XLA names it dot, or a YNNPACK/oneDNN fusion).
  matmul = [k for k in kinds if "dot" in k or k.endswith("_fusion")]
  assert matmul and all(r["ms"] > 0 for r in s["ops"])
  assert 0 < s["busy_ms"] <= s["span_ms"]


def test_cli_errors(tmp_path, capsys):
  assert trace_summary.main([str(tmp_path)]) == 2
  assert "no *.trace.json.gz" in capsys.readouterr().err
  write_trace(tmp_path / "empty.trace.json.gz", [])
  assert trace_summary.main([str(tmp_path / "empty.trace.json.gz")]) == 2
  assert "no op events" in capsys.readouterr().err


def test_cpu_ops_nested_on_a_thread_count_once(tmp_path):
  """A CPU `while` event holds its body's op events on the same thread: each
  op counts its exclusive time, so the totals are the time the thread spent."""
  op = lambda ts, dur, name, tid=5: {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur,
                                     "name": name}
  write_trace(tmp_path / "c.trace.json.gz", [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      op(0, 100, "while.1"),
      op(10, 30, "loop_add_fusion.2"),   # inside the while
      op(50, 40, "loop_add_fusion.3"),   # inside the while
      op(20, 50, "loop_add_fusion.4", tid=6),  # another thread: not nested
  ])
  s = trace_summary.summarize(str(tmp_path))
  rows = {r["kind"]: (r["ms"], r["count"]) for r in s["ops"]}
  assert rows == {"loop_add_fusion": (pytest.approx(0.120), 3),
                  "while": (pytest.approx(0.030), 1)}
  assert sum(r["ms"] for r in s["ops"]) == pytest.approx(0.150)  # 100 + 50 us
  assert sum(r["percent"] for r in s["ops"]) == pytest.approx(100)


def test_per_step_only_with_steps(tmp_path, capsys):
  """Without --steps the numbers are the whole trace's, and say so."""
  gpu_trace(tmp_path / "x.trace.json.gz")
  whole = trace_summary.summarize(str(tmp_path))
  assert whole["per"] == "whole trace"
  assert whole["span_ms"] == pytest.approx(0.220)
  assert trace_summary.summarize(str(tmp_path), steps=2)["per"] == "per step"
  assert trace_summary.main([str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "whole trace" in out and "per step" not in out
  assert trace_summary.main([str(tmp_path), "--steps", "2"]) == 0
  assert "per step" in capsys.readouterr().out
