"""Where the time goes in a `jax.profiler` trace: XLA ops grouped by kind.

  python -m benchmarks.trace_summary PATH [--top 25] [--steps N]

PATH is a `*.trace.json.gz` file or a directory holding one (as written by
`jax.profiler.trace(dir)` or `benchmarks.throughput --profile DIR`; the
newest is read). On a GPU/TPU trace it sums the kernels on the device's
streams and reports how busy the device was over the traced span (idle
time = launch gaps and host work); on a CPU trace it sums the XLA op events
of the runtime's threads. Op names lose their numeric suffix
(`loop_add_fusion.12` -> `loop_add_fusion`), so the rows are kinds of op.
On a CPU trace each op counts its own (exclusive) time: an op event nested in
another on the same thread (the ops of a CPU `while` loop's body inside the `while` event)
is subtracted from the enclosing one, so nothing is counted twice. Times are
for the whole trace, or per step with `--steps N` (the steps it holds).
A GPU kernel counts under its HLO op, except inside an XLA command buffer (a
CUDA graph of many ops, whose op name says nothing): there it counts under
its own kernel name, with cuDNN convolutions as `cudnn conv fprop/dgrad/wgrad`
and cuBLAS matmuls as `cublas gemm`.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Any, Optional

# An XLA instruction name: `fusion.12`, `ynn_fusion.616`, `copy-start.3`.
_HLO_NAME = re.compile(r"^[A-Za-z_][\w\-]*(\.\d+)*$")
# Host-side annotations of the CPU runtime, not ops.
_NOT_OPS = ("Wait", "Thunk", "PjRt", "Pjit", "Parse", "Common", "Execute", "Allocate")


def find_trace(path: str) -> str:
  """`path` itself if a file, else the newest `*.trace.json.gz` below it."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
  if not found:
    raise ValueError(f"no *.trace.json.gz under {path!r} (write one with "
                     "jax.profiler.trace or benchmarks.throughput --profile).")
  return max(found, key=os.path.getmtime)


def _kind(name: str) -> str:
  return re.sub(r"(\.\d+)+$", "", name)


def _device_kind(event: dict) -> str:
  """The kind of a GPU kernel or TPU op event (see the module docstring)."""
  op = (event.get("args") or {}).get("hlo_op") or event["name"]
  if not op.startswith("command_buffer"):
    return _kind(op)
  name = event["name"]
  if "cudnn" in name:
    for role in ("fprop", "dgrad", "wgrad"):
      if role in name:
        return f"cudnn conv {role}"
  if name.startswith(("nvjet", "cutlass")) or "sgemm" in name or "hgemm" in name:
    return "cublas gemm"
  return re.sub(r"(_\d+)+$", "", name)  # `loop_add_fusion_154`


def _busy_us(intervals) -> float:
  """Length of the union of [start, end) intervals (overlapping streams count once)."""
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def _self_times(ops) -> list[float]:
  """Exclusive duration of each `(kind, ts, dur, thread)`: less its nested events.

  An event that starts inside another on the same thread is its child (the
  CPU runtime's `while` contains its body's ops); its overlap is taken off
  the parent's time, so the sum over events is the union of the outermost.
  """
  self_us = [dur for _, _, dur, _ in ops]
  by_thread = collections.defaultdict(list)
  for i, (_, ts, dur, thread) in enumerate(ops):
    by_thread[thread].append((ts, -dur, i))
  for events in by_thread.values():
    stack = []  # (end, index) of the enclosing events
    for ts, neg_dur, i in sorted(events):
      while stack and stack[-1][0] <= ts:
        stack.pop()
      end = ts - neg_dur
      if stack:
        parent_end, parent = stack[-1]
        self_us[parent] -= min(end, parent_end) - ts
      stack.append((end, i))
  return [max(0.0, t) for t in self_us]


def summarize(path: str, steps: Optional[int] = None, unit: str = "step") -> dict[str, Any]:
  """Per-kind op time of one trace: in all, or per step with `steps`.

  Returns:
    dict(trace, device (the traced device, or 'cpu'), per ('per step', or
    'whole trace' without `steps`; `unit` names the step, e.g. 'call'),
    span_ms (first op start to last op end), busy_ms (union of op
    intervals), ops: list of dict(kind, ms (exclusive time, see the module
    docstring), count, percent) sorted by time, all divided by `steps`).
  """
  if steps is not None and steps < 1:
    raise ValueError(f"--steps must be >= 1, got {steps}.")
  per = f"per {unit}" if steps is not None else "whole trace"
  steps = steps or 1
  trace = find_trace(path)
  with gzip.open(trace) as f:
    events = json.load(f)["traceEvents"]
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in processes.items()
             if name.startswith(("/device:GPU", "/device:TPU"))}
  ops = []
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if devices:
      if e["pid"] not in devices:
        continue
      # GPU kernels carry their HLO op in args; TPU events are the op.
      kind = _device_kind(e)
    else:
      name = e["name"]
      if not _HLO_NAME.match(name) or name.startswith(_NOT_OPS):
        continue
      kind = _kind(name)
    ops.append((kind, float(e["ts"]), float(e["dur"]), (e["pid"], e.get("tid"))))
  if not ops:
    raise ValueError(f"{trace}: no op events found (was anything run while tracing?).")
  by_kind = collections.defaultdict(lambda: [0.0, 0])
  # GPU kernels do not nest (overlaps there are concurrent streams).
  self_times = [d for _, _, d, _ in ops] if devices else _self_times(ops)
  for (kind, _, _, _), self_us in zip(ops, self_times):
    by_kind[kind][0] += self_us
    by_kind[kind][1] += 1
  total = sum(v[0] for v in by_kind.values()) or 1.0
  rows = [dict(kind=k, ms=v[0] / 1e3 / steps, count=v[1] / steps, percent=100 * v[0] / total)
          for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])]
  span = max(t + d for _, t, d, _ in ops) - min(t for _, t, _, _ in ops)
  busy = _busy_us((t, t + d) for _, t, d, _ in ops)
  return dict(trace=trace, device=", ".join(sorted(processes[p] for p in devices)) or "cpu",
              per=per, span_ms=span / 1e3 / steps, busy_ms=busy / 1e3 / steps, ops=rows)


def report(summary: dict, top: int = 25, log=print) -> None:
  log(f"{summary['trace']} ({summary['device']}), {summary['per']}: ops span "
      f"{summary['span_ms']:.2f} ms, busy {summary['busy_ms']:.2f} ms "
      f"({100 * summary['busy_ms'] / summary['span_ms']:.0f}%)")
  log(f"{'op kind':<48}{'ms':>10}{'count':>8}{'%':>7}")
  for row in summary["ops"][:top]:
    log(f"{row['kind'][:47]:<48}{row['ms']:10.3f}{row['count']:8.0f}{row['percent']:7.1f}")


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.trace_summary", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("path", help="a *.trace.json.gz file or a directory holding one")
  parser.add_argument("--top", type=int, default=25, help="rows to print")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps the trace holds; times are divided by it (default: "
                      "times for the whole trace)")
  args = parser.parse_args(argv)
  try:
    report(summarize(args.path, args.steps), args.top)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
