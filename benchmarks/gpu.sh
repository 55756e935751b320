#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md (~15 min on an H100, most of
# it compiling; run a few steps per call where calls are limited).
#
#   bash benchmarks/gpu.sh [--smoke] [--budget SECONDS] [--steps mfu,sample,...] [OUTDIR]
#
# On the first GPU that JAX sees, the steps named by --steps in the order
# named (default: mfu,sample,mem256,peer):
#   1. mfu:     CIFAR-10 U-Net, bfloat16, batch 128: training images/s and MFU
#               (of the H100 SXM's 989 dense bf16 TFLOP/s), sampling evals/s.
#   2. sample:  50,000 CIFAR-10 samples, bfloat16, 1000 ancestral steps and
#               DDIM-50, timed on part of one batch and extrapolated.
#   3. mem256:  the 256x256 model (CelebA-HQ config), bfloat16, batch 64, train
#               step with rematerialisation: peak GPU memory and images/s
#               (its train step compiled in 108 s on an H100).
#   4. peer:    CIFAR-10, float32 (TF32 on both sides), batch 128, against
#               diffusers' UNet2DModel on the same GPU.
#   5. profile: as mfu, one jax.profiler trace of 16 train steps (8 per
#               call, where the step is GPU-bound), 5 sampling steps and a
#               forward pass: per-op summaries in profile.log,
#               the traces as OUTDIR/{train,sample,forward}.trace.json.gz
#               (the step prints the trace_summary command for each, with
#               its --steps).
#   6. scale:   training at batch 256 and 512 with 8 steps per call (batch
#               256 compiled in 69 s on an H200), and the 50k samples at
#               batch 5000.
#   7. attn:    the 50k samples (batch 2500) and training (batch 128, 8 steps
#               per call) with model.attention_algorithm einsum, then cudnn
#               (cuDNN's flash attention), one after the other; --smoke runs
#               einsum only (cudnn needs a GPU).
# Each step has its own time limit and log; JSON results and logs go to
# OUTDIR (default gpu_results/). --budget caps the whole run (a lease's
# minutes): each step's limit shrinks to what is left, and a step with under
# 30 s left is skipped. --smoke runs the same steps on the tiny digits model
# (CPU is fine): a check of this script, not a measurement.
# Python: $PYTHON if set, else the repository's .venv/bin/python if there is
# one, else python3. Exits 1 if any step failed (a step skipped for lack of
# --budget is not a failure), 2 on bad options.
set -uo pipefail

usage() { sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
smoke=0
budget=0
out=gpu_results
steps=mfu,sample,mem256,peer
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --smoke) smoke=1 ;;
    --budget)
      budget=${2:-}
      [[ "$budget" =~ ^[0-9]+$ ]] || { echo "error: --budget needs whole seconds, got '$budget'" >&2; exit 2; }
      shift ;;
    --steps)
      steps=${2:-}
      shift ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
for s in ${steps//,/ }; do
  case "$s" in
    mfu|sample|mem256|peer|profile|scale|attn) ;;
    *) echo "error: unknown step '$s' in --steps (mfu, sample, mem256, peer, profile, scale, attn)" >&2
       exit 2 ;;
  esac
done
if [[ -z "${steps//,/}" ]]; then
  echo "error: --steps needs a comma-separated list of mfu, sample, mem256, peer, profile, scale, attn" >&2
  exit 2
fi
mkdir -p "$out"
py=${PYTHON:-}
if [[ -z "$py" ]]; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  if [[ -x "$here/.venv/bin/python" ]]; then py="$here/.venv/bin/python"; else py=python3; fi
fi
export PYTHONUNBUFFERED=1

cifar=configs/cifar10.py
big=configs/celebahq256.py
failed=()   # "name (exit N)" of each step that failed
skipped=()  # steps skipped for lack of --budget
ran=0
# name limit_s args...: runs one benchmark, logging to $out/name.log, within
# its limit and what is left of --budget.
step() {
  local name=$1 limit=$2
  shift 2
  if ((budget)); then
    local left=$((budget - SECONDS))
    if ((left < 30)); then
      echo "== $name: skipped, ${left} s of the --budget left"
      skipped+=("$name")
      return 0
    fi
    ((left < limit)) && limit=$left
  fi
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$py" -m "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc$( ((rc == 124)) && echo " (timed out after ${limit} s)")"
  ran=$((ran + 1))
  ((rc == 0)) || failed+=("$name (exit $rc)")
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv 2>/dev/null || echo "(no nvidia-smi)"
"$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' || exit 1

if ((smoke)); then
  # The tiny digits model and sizes: compile in seconds on a CPU.
  cifar=configs/digits.py:test
  big=configs/digits.py:test
  mfu_args=(--batch_size 4 --repeats 1 --train_iters 1 --sample_steps 2)
  sample_args=(--num_samples 8 --batch_size 4 --measured_steps 2 --repeats 1)
  mem_args=(--batch_size 4 --repeats 1 --train_iters 1)
  peer_args=(--batch_size 4 --repeats 1 --train_iters 1 --sample_steps 2)
  profile_train_iters=2
  profile_sample_steps=2
  profile_args=(--batch_size 4 --repeats 1 --steps_per_call 2)
  scale_batches=(4 8)
  many_steps=2  # steps per call in scale
  scale_args=(--repeats 1 --train_iters 2)
  scale_sample_args=(--num_samples 16 --batch_size 8 --measured_steps 2 --repeats 1)
  attentions=(einsum)
  attn_sample_args=(--num_samples 16 --batch_size 8 --measured_steps 2 --repeats 1)
  attn_train_args=(--batch_size 4 --repeats 1 --train_iters 2 --steps_per_call 2)
else
  mfu_args=(--batch_size 128 --repeats 3 --train_iters 20 --sample_steps 20)
  sample_args=(--num_samples 50000 --batch_size 2500 --measured_steps 20 --repeats 3)
  mem_args=(--batch_size 64 --repeats 2 --train_iters 3)
  peer_args=(--batch_size 128 --repeats 3 --train_iters 10 --sample_steps 10)
  profile_train_iters=16
  profile_sample_steps=5
  profile_args=(--batch_size 128 --repeats 1 --steps_per_call 8)
  scale_batches=(256 512)
  many_steps=8
  scale_args=(--repeats 3 --train_iters 16)
  scale_sample_args=(--num_samples 50000 --batch_size 5000 --measured_steps 10 --repeats 3)
  attentions=(einsum cudnn)
  attn_sample_args=(--num_samples 50000 --batch_size 2500 --measured_steps 10 --repeats 3)
  attn_train_args=(--batch_size 128 --repeats 3 --train_iters 16 --steps_per_call 8)
fi

run_step() {
  case "$1" in
    mfu)
      step mfu 180 benchmarks.throughput --config "$cifar" --dtype bfloat16 --peak_tflops 989 \
        "${mfu_args[@]}" ;;
    sample)
      step sample 240 benchmarks.sample_time --config "$cifar" --dtype bfloat16 \
        "${sample_args[@]}" ;;
    mem256)
      # Up to 95% of the GPU's memory (JAX takes 75% by default): the question
      # is whether the step fits on the card.
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 step mem256 420 benchmarks.throughput \
        --config "$big" --dtype bfloat16 --remat --parts train --peak_tflops 989 \
        "${mem_args[@]}" ;;
    peer)
      # JAX takes 75% of the GPU's memory by default; leave torch room beside it.
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 step peer 180 benchmarks.throughput \
        --config "$cifar" --compare diffusers "${peer_args[@]}" ;;
    profile)
      local traces part newest
      traces=$(mktemp -d)
      step profile 240 benchmarks.throughput --config "$cifar" --dtype bfloat16 \
        --peak_tflops 989 --profile "$traces" --train_iters "$profile_train_iters" \
        --sample_steps "$profile_sample_steps" "${profile_args[@]}"
      for part in train sample forward; do
        newest=$(find "$traces/$part" -name '*.trace.json.gz' 2>/dev/null | sort | tail -1)
        if [[ -n "$newest" ]] && cp "$newest" "$out/$part.trace.json.gz"; then
          local n=1
          [[ $part == train ]] && n=$profile_train_iters
          [[ $part == sample ]] && n=$profile_sample_steps
          echo "== read with: $py -m benchmarks.trace_summary $out/$part.trace.json.gz --steps $n"
        fi
      done
      rm -rf "$traces" ;;
    scale)
      local b
      for b in "${scale_batches[@]}"; do
        step "scale_train_b$b" 200 benchmarks.throughput --config "$cifar" --dtype bfloat16 \
          --peak_tflops 989 --parts train --batch_size "$b" --steps_per_call "$many_steps" "${scale_args[@]}"
      done
      step scale_sample 200 benchmarks.sample_time --config "$cifar" --dtype bfloat16 \
        "${scale_sample_args[@]}" ;;
    attn)
      local a
      for a in "${attentions[@]}"; do
        step "attn_sample_$a" 150 benchmarks.sample_time --config "$cifar" --dtype bfloat16 \
          --attention_algorithm "$a" "${attn_sample_args[@]}"
      done
      for a in "${attentions[@]}"; do
        step "attn_train_$a" 150 benchmarks.throughput --config "$cifar" --dtype bfloat16 \
          --peak_tflops 989 --parts train --attention_algorithm "$a" "${attn_train_args[@]}"
      done ;;
  esac
}

for s in ${steps//,/ }; do
  run_step "$s"
done
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv 2>/dev/null || true
summary="$ran step(s) ran, ${#failed[@]} failed, ${#skipped[@]} skipped for the --budget"
if ((${#failed[@]})); then
  echo "== FAILED: $summary; failed: ${failed[*]}"
  exit 1
fi
echo "== done: $summary${skipped[*]:+ (${skipped[*]})}"
