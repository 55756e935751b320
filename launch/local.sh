#!/usr/bin/env bash
# Run N training processes on this machine, joined by jax.distributed over
# 127.0.0.1 with CPU (gloo) collectives: a multi-host run without a cluster.
#
# Usage: launch/local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT]
#                        [--dry-run] -- TRAIN_ARGS...
# Example:
#   launch/local.sh -n 2 -d 2 -- --config configs/digits.py:test --workdir runs/mh
# Process I logs to LOG_DIR/process_I.log (default /tmp/ddpm_local_PORT).
# Exits non-zero if any process fails.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

num=2 devices=1 port=${PORT:-12355} dry_run=0
python=${PYTHON:-}
if [[ -z "$python" ]]; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|-d|-p)
      [[ $# -ge 2 ]] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }
      case "$1" in -n) num=$2 ;; -d) devices=$2 ;; -p) port=$2 ;; esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (use -- before the training arguments)" >&2; usage >&2; exit 2 ;;
  esac
done
for v in "$num" "$devices" "$port"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "error: -n, -d and -p take positive integers, got '$v'" >&2; exit 2; }
done
log_dir=${LOG_DIR:-/tmp/ddpm_local_$port}

pids=()
# shellcheck disable=SC2317  # called by the trap
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < num; i++)); do
  cmd=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu
       "$python" -m ddpm_jax.train "$@"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num" "--process_id=$i")
  if ((dry_run)); then
    printf '%q ' "${cmd[@]}"; echo
    continue
  fi
  mkdir -p "$log_dir"
  "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
((dry_run)) && exit 0

status=0
for ((i = 0; i < num; i++)); do
  while :; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    # A trapped signal (SIGTERM passed on to the processes) ends `wait` early
    # with 128+n while the process is still saving: wait for it again.
    if ((rc > 128)) && kill -0 "${pids[$i]}" 2>/dev/null; then continue; fi
    break
  done
  if ((rc != 0)); then
    echo "process $i failed (exit $rc); see $log_dir/process_$i.log" >&2
    status=1
  fi
done
exit $status
