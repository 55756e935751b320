#!/usr/bin/env bash
# Run N processes of training (or sampling, or evaluation) on this machine,
# joined by jax.distributed over 127.0.0.1 with CPU (gloo) collectives: a
# multi-host run without a cluster.
#
# Usage: launch/local.sh [N | -n N] [-d DEVICES_PER_PROCESS] [-p PORT]
#                        [-m train|sample|evaluate] [--dry-run] -- ARGS...
# N: the number of processes (default 2), first or with -n.
# Examples:
#   launch/local.sh -n 2 -d 2 -- --config configs/digits.py:test --workdir runs/mh
#   launch/local.sh -n 2 -d 2 -m sample -- --workdir runs/mh --num_samples 64
# -m picks the command, python -m ddpm_jax.MODULE ARGS (default train); the
# processes share its work and process 0 writes its outputs.
# The coordinator listens on 127.0.0.1:PORT: by default a free port the OS
# picks, so several runs can share the machine; a -p PORT (or env PORT) that
# something already listens on is refused.
# Process I logs to LOG_DIR/process_I.log (default
# ${TMPDIR:-/tmp}/ddpm_local_DATE-TIME_PORT, printed at the start); the last
# lines of a failed process's log are printed. XLA_FLAGS is passed on with
# --xla_force_host_platform_device_count=DEVICES_PER_PROCESS appended.
# Ctrl-C: every process saves its current step and stops; exit 130, and the
# same command resumes the run (sample and evaluate just stop). A second
# Ctrl-C kills them at once (the last saved checkpoint stays). SIGTERM is
# passed on: training saves its step and exits 0 (a preempted run that saved
# is no failure); sample and evaluate stop, writing nothing: exit 143.
# --dry-run prints the commands instead of running them.
# Exits 1 if any process fails, 2 on bad options.
set -euo pipefail

# The usage text is the header comment.
usage() { sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

num=2 devices=1 port=${PORT:-} module=train dry_run=0
python=${PYTHON:-}
if [[ -z "$python" ]]; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
if [[ $# -gt 0 && "$1" != -* ]]; then num=$1; shift; fi  # launch/local.sh N ...
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|-d|-p|-m)
      [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
      case "$1" in -n) num=$2 ;; -d) devices=$2 ;; -p) port=$2 ;; -m) module=$2 ;; esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (use -- before the arguments of ddpm_jax.$module)" >&2; usage >&2; exit 2 ;;
  esac
done
case "$module" in train|sample|evaluate) ;; *) die "-m takes train, sample or evaluate, got '$module'" ;; esac
for v in "$num" "$devices"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "-n and -d take positive integers, got '$v'"
done

# True if something listens on 127.0.0.1:$1.
listening() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
if [[ -n "$port" ]]; then
  if ! [[ "$port" =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then
    die "-p/PORT takes a port number from 1 to 65535, got '$port'"
  fi
  if listening "$port"; then
    die "port $port is in use (another run's coordinator?); leave out -p and PORT for a free one"
  fi
else
  # Ask the OS for a free port (any python3 will do).
  free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  port=$(python3 -c "$free_port" 2> /dev/null || "$python" -c "$free_port" 2> /dev/null || true)
  [[ "$port" =~ ^[1-9][0-9]*$ ]] || die "could not pick a free port (no python3?); pass -p PORT"
fi
log_dir=${LOG_DIR:-${TMPDIR:-/tmp}/ddpm_local_$(date +%Y%m%d-%H%M%S)_$port}
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"

pids=() interrupts=0 terminated=0
signal_all() { for p in "${pids[@]}"; do kill -s "$1" "$p" 2> /dev/null || true; done; }
# The processes ignore SIGINT (background jobs of a script do): Ctrl-C reaches
# them as SIGTERM (save, then stop), a second one as SIGKILL.
# shellcheck disable=SC2317  # called by the traps
on_int() {
  interrupts=$((interrupts + 1))
  if ((interrupts == 1)); then
    if [[ "$module" == train ]]; then
      echo "local.sh: Ctrl-C: saving the current step, then stopping (Ctrl-C again kills the processes)" >&2
    else
      echo "local.sh: Ctrl-C: stopping the processes" >&2
    fi
    signal_all TERM
  else
    echo "local.sh: second Ctrl-C: killing the processes without saving" >&2
    signal_all KILL
  fi
}
trap on_int INT
trap 'terminated=1; signal_all TERM' TERM

if ((!dry_run)); then
  mkdir -p "$log_dir"
  echo "local.sh: $num process(es) x $devices CPU device(s), coordinator 127.0.0.1:$port," \
    "logs in $log_dir/process_I.log" >&2
fi
for ((i = 0; i < num; i++)); do
  cmd=(env "XLA_FLAGS=$xla_flags" JAX_PLATFORMS=cpu
       "$python" -m "ddpm_jax.$module" "$@"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num" "--process_id=$i")
  if ((dry_run)); then
    printf '%q ' "${cmd[@]}"; echo
    continue
  fi
  ((interrupts || terminated)) && break
  "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
((dry_run)) && exit 0

failed=0 other_failure=0  # other: an exit status but 143 (SIGTERM)
for ((i = 0; i < ${#pids[@]}; i++)); do
  while :; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    # A trapped signal ends `wait` early with 128+n while the process is
    # still saving: wait for it again.
    if ((rc > 128)) && kill -0 "${pids[$i]}" 2> /dev/null; then continue; fi
    break
  done
  if ((rc != 0)); then
    failed=1
    ((rc != 143)) && other_failure=1
    # Killed by Ctrl-C (SIGKILL, or SIGTERM before the trainer's handler was
    # set) or stopped by a SIGTERM passed on: nothing to show.
    ((interrupts > 1 || ((interrupts || terminated) && rc == 143))) && continue
    log="$log_dir/process_$i.log"
    echo "local.sh: process $i failed (exit $rc); the end of $log:" >&2
    tail -n 10 "$log" | sed "s/^/  /" >&2 || true
  fi
done
if ((interrupts)); then
  if [[ "$module" != train ]]; then
    echo "local.sh: interrupted" >&2
  elif ((failed)); then
    echo "local.sh: interrupted; run the same command to resume from the last saved checkpoint" >&2
  else
    echo "local.sh: interrupted; the run saved its current step: run the same command to resume" >&2
  fi
  exit 130
fi
if ((terminated && failed && !other_failure)); then
  echo "local.sh: terminated" >&2
  exit 143
fi
if ((failed)); then exit 1; fi
echo "local.sh: all $num processes finished; logs in $log_dir" >&2
