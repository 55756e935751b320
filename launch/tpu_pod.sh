#!/usr/bin/env bash
# Train (or sample, or evaluate) on every worker of an existing Cloud TPU VM
# slice (v4-32, v5e-64, ...).
#
# Usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT]
#          [--remote-dir DIR] [--jax-spec SPEC] [--env VAR=VALUE]...
#          [--module train|sample|evaluate] [--no-install] [--detach]
#          [--dry-run] -- ARGS...
# Example:
#   launch/tpu_pod.sh --tpu my-v4-32 --zone us-central2-b \
#     --env TFDS_DATA_DIR=/mnt/shared/tfds -- \
#     --config configs/cifar10.py --workdir /mnt/shared/runs/cifar10
# Steps, each one `gcloud compute tpus tpu-vm ... --worker=all`:
#   1. copy the committed tree (git archive HEAD) to every worker;
#   2. unpack it over DIR (default ddpm_jax, in the home directory), make a
#      virtual environment and pip install SPEC (default jax[tpu]) and the
#      project (skip with --no-install once done);
#   3. run `python -m ddpm_jax.MODULE ARGS` (--module, default train) on all
#      workers at once, each logging to ~/ddpm_MODULE.log, with
#      DDPM_JAX_DISTRIBUTED=1: every worker calls jax.distributed.initialize(),
#      which needs no arguments on TPU. The workers share the work; worker 0
#      writes sample and evaluate outputs.
# --env exports VAR=VALUE for the processes (repeatable).
# --detach starts them under nohup and returns; follow them with
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 --command 'tail -f ~/ddpm_train.log'
#   (~/ddpm_sample.log or ~/ddpm_evaluate.log with --module)
# --workdir must be a directory every worker shares (NFS, Filestore, a gcsfuse
# mount): all workers write to the same checkpoints.
# --dry-run prints the commands instead of running them. Exits non-zero on error.
set -euo pipefail

# The usage text is the header comment (minus #SBATCH lines).
usage() { sed -n '2,/^[^#]/p' "$0" | grep '^#' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; echo "Run $0 --help for usage." >&2; exit 2; }

tpu='' zone='' project='' remote_dir=ddpm_jax jax_spec='jax[tpu]'
module=train install=1 detach=0 dry_run=0
envs=()
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) need_value "$@"; tpu="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --remote-dir) need_value "$@"; remote_dir="$2"; shift 2 ;;
    --jax-spec) need_value "$@"; jax_spec="$2"; shift 2 ;;
    --env) need_value "$@"; envs+=("$2"); shift 2 ;;
    --module) need_value "$@"; module="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (put the arguments of ddpm_jax.$module after --)" ;;
  esac
done
case "$module" in train|sample|evaluate) ;; *) die "--module takes train, sample or evaluate, got '$module'" ;; esac
[[ -n "$tpu" ]] || die "--tpu NAME is required (the TPU VM slice, see 'gcloud compute tpus tpu-vm list')"
[[ -n "$zone" ]] || die "--zone ZONE is required (the slice's zone, e.g. us-central2-b)"
if [[ "$module" == train ]]; then
  [[ $# -gt 0 ]] || die "no training arguments; give at least -- --config CONFIG --workdir DIR"
else
  [[ $# -gt 0 ]] || die "no $module arguments; give at least -- --workdir DIR"
fi
[[ "$remote_dir" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--remote-dir '$remote_dir' may use only letters, digits and . _ / -"
for e in "${envs[@]}"; do
  [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env takes VAR=VALUE, got '$e'"
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
archive=/tmp/ddpm_jax_src_$$.tar.gz
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" --worker=all)
[[ -n "$project" ]] && where+=(--project "$project")

# Shell-quotes each argument (single quotes unless plainly safe), so each
# printed/evaluated step keeps every argument one word and stays readable.
quote() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$a")
    else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s ' "${out[@]}"
}
install_cmd="set -euo pipefail; mkdir -p $remote_dir"
install_cmd+=" && tar -xzf ~/ddpm_jax_src.tar.gz -C $remote_dir && cd $remote_dir"
install_cmd+=" && python3 -m venv .venv && .venv/bin/pip install -q -U pip"
install_cmd+=" && .venv/bin/pip install -q $(quote "$jax_spec") -e ."
train_cmd="cd $remote_dir && "
((detach)) && train_cmd+="nohup "
# A TPU VM slice lists its workers in the metadata server, not in the
# environment: tell ddpm_jax.MODULE to call jax.distributed.initialize().
train_cmd+="env DDPM_JAX_DISTRIBUTED=1 "
((${#envs[@]})) && train_cmd+="$(quote "${envs[@]}")"
train_cmd+="$(quote .venv/bin/python -m "ddpm_jax.$module" "$@")"
# shellcheck disable=SC2088  # the ~ is for the worker's shell to expand
log="~/ddpm_$module.log"
if ((detach)); then
  # All three streams redirected, so ssh returns at once. $(hostname) is
  # meant to expand on the worker.
  # shellcheck disable=SC2016
  train_cmd+="> $log 2>&1 < /dev/null & "'echo "$(hostname): started, log in '"$log\""
else
  train_cmd="set -o pipefail; $train_cmd""2>&1 | tee $log"
fi

steps=()
if ((install)); then
  steps+=("$(quote git -C "$repo" archive --format=tar.gz -o "$archive" HEAD)")
  steps+=("$(quote "${gcloud_tpu[@]}" scp "$archive" "$tpu:ddpm_jax_src.tar.gz" "${where[@]}")")
  steps+=("$(quote "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command "$install_cmd")")
fi
steps+=("$(quote "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command "$train_cmd")")

if ((dry_run)); then
  printf '%s\n' "${steps[@]}"
  exit 0
fi
command -v gcloud > /dev/null || die "gcloud not found; install the Google Cloud CLI and run 'gcloud auth login'"
if ((install)); then
  trap 'rm -f "$archive"' EXIT
  echo "Copying commit $(git -C "$repo" rev-parse --short HEAD) to every worker of $tpu" >&2
  if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]]; then
    echo "warning: uncommitted changes are not copied (git archive HEAD)" >&2
  fi
fi
for step in "${steps[@]}"; do
  echo "+ $step" >&2
  eval "$step"
done
