#!/usr/bin/env bash
# Issue 24's GPU figures in one `run` call of at most 10 minutes on a fresh H100 / H200 (XLA
# compiles the default U-T&T step in 85-124 s there), new pieces first, what is known last:
#   prof_32, prof_128  supervised bf16 model step at batch 32 / 128: compile time (trace + lower,
#                      compile) beside step time, samples/s, multiple of the roofline bound, and a
#                      jax.profiler trace of 3 steps summarized on the machine
#                      (bench/profile_summary.py: busy vs wall, every op matched or its reason,
#                      time and TFLOP/s by category, top ops); the trace itself stays there
#   conv_layers        every distinct convolution of the model, fwd / dgrad / wgrad, TFLOP/s + GB/s
#   ref_32             the PyTorch reference's step (bf16 autocast, channels_last), eager, batch 32
#   ref_32_compiled    the same under torch.compile
#   sup_bf16_32        bench/train_step.py, batch 32, bf16 (known: 56.5 ms on an H100), with MFU
#                      and compile time
#
# Compile time. What makes it long on a GPU is autotuning, not XLA's passes: the model has no
# Python loop over dates or blocks that would grow the program (one HLO for any batch), but at the
# default xla_gpu_autotune_level=4 XLA runs every candidate cuDNN algorithm of each of the ~100
# convolutions x 3 directions on buffers of the real size, re-initializes them and checks each
# result against a reference; so the time grows with the batch (88 s at batch 8, 124 s at 32 on an
# H100; batch 128 did not finish in 166 s). Two remedies here:
# - one persistent compilation cache for all parts (JAX_COMPILATION_CACHE_DIR; jax then also keeps
#   XLA's per-fusion autotuning cache in it, jax_persistent_cache_enable_xla_caches), so a
#   convolution autotuned by one part is not autotuned again by the next (sup_bf16_32 reuses
#   prof_32's choices; a rerun of a part loads its whole program);
# - batch 128 autotunes at level 2 (time the candidates on initialized buffers, no re-init, no
#   correctness comparison): the same choice by speed, without the checks that cost most of the
#   compile (XLA's --xla_gpu_autotune_level, levels 0-4). AUTOTUNE_128=4 restores the default.
#
# Once, here (.whl/ and .ref/ are gitignored / excluded, never commit them):
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl clu==0.0.12 ml_collections==1.1.0
#   rm -rf .ref && cp -r ../shared/ref .ref && echo .ref >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .ref/whl segmentation-models-pytorch==0.6.0
# The device has jax/flax/optax/orbax and torch/torchvision/timm but no TensorFlow, no clu /
# ml_collections and no segmentation-models-pytorch: the wheels above bring them.
#
# Then ONE `run` call (run tool arguments):
#   command:   bash bench/device_check.sh
#   carry:     [".whl", ".ref"]
#   timeout_s: 600
# The script keeps to DEADLINE_S (default 560 s): each part gets `timeout` of at most what is left;
# parts that no longer fit are skipped and listed with the command that runs them later
# (`bash bench/device_check.sh PART...`). Results in $OUT (at most 8 files): device_check.log,
# prof_32.txt, prof_128.txt, conv_layers.json, ref.txt, sup_bf16_32.json, summary.txt.
#
# CPU dry run of the whole script at tiny sizes (tiny model, batch 2, one step, the reference at
# batch 1 when REF_PYTHON can import it), including the profile parser on a real CPU trace:
#   bash bench/device_check.sh --dry-run
#   REF_PYTHON="/work/refvenv/bin/python /work/refvenv/ref_shim.py" \
#     REF_SCRIPT=/work/shared/ref/ref_step.py bash bench/device_check.sh --dry-run
# (REF_PYTHON: a Python with torch + segmentation-models-pytorch; REF_SCRIPT: ref_step.py, default
# .ref/ref_step.py.)
set -u -o pipefail
OUT="${OUT:-/tmp/out}"
AUTOTUNE_128="${AUTOTUNE_128:-2}"
DEADLINE_S="${DEADLINE_S:-560}"
PY="${PYTHON:-python3}"
REF_PY="${REF_PYTHON:-python3}"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; OUT="${OUT%/}/dry_run"; fi
# Per-part time caps x CAP_MULT: a loaded 2-core CPU compiles even the tiny step for minutes.
CAP_MULT="${CAP_MULT:-$((DRY ? 4 : 1))}"
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
export PYTHONUNBUFFERED=1
# JAX preallocates 75% of the GPU by default; batch 128 needs more of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# The persistent compilation cache (jax's documented settings), shared by every part.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
cd "$(dirname "$0")/.."

if [ $DRY -eq 1 ]; then
  export JAX_PLATFORMS=cpu
  SIZE=(--preset tiny); B_SMALL=2; B_LARGE=4; DEVICE=cpu; REF_B=1; STEPS=(--steps 1)
  TIME_STEPS=1; REPEATS=1; REF_STEPS=(--steps 1 --warmup 0)
else
  SIZE=(--preset default); B_SMALL=32; B_LARGE=128; DEVICE=cuda; REF_B=32; STEPS=(--steps 3)
  TIME_STEPS=10; REPEATS=20; REF_STEPS=(--steps 10 --warmup 3)
fi

main() {
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; return 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
REF_PATH=""
if [ -d .ref/whl ] && ls .ref/whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/refsite .ref/whl/*.whl \
    && REF_PATH=/tmp/refsite
fi
REF_SCRIPT="${REF_SCRIPT:-.ref/ref_step.py}"
[ $DRY -eq 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" || return 1

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(prof_32 prof_128 conv_layers ref_32 ref_32_compiled sup_bf16_32)
SKIPPED=()

# step NAME CAP_S MIN_S CMD...: runs CMD under `timeout` of min(CAP_S, time left); skips it when
# less than MIN_S is left.
step() {
  local name=$1 cap=$(($2 * CAP_MULT)) min=$3; shift 3
  local left=$((DEADLINE_S - SECONDS))
  if [ "$left" -lt "$min" ]; then
    echo "== $name: skipped ($left s left, needs ~$min s)"; SKIPPED+=("$name"); return 99
  fi
  local limit=$((cap < left ? cap : left))
  echo "== $name (timeout ${limit} s, at ${SECONDS} s): $*"
  if [ -n "${STEP_OUT:-}" ]; then timeout "$limit" "$@" > "$STEP_OUT" 2>&1; else timeout "$limit" "$@"; fi
  local rc=$?
  echo "== $name: rc=$rc after ${SECONDS} s"
  return $rc
}

prof() {  # prof NAME BATCH [ENV=VALUE...]: timed steps, then a 3-step trace summarized here
  local name=$1 batch=$2; shift 2
  step "$name" 200 120 env "$@" "$PY" bench/profile_summary.py "${SIZE[@]}" --batch "$batch" --dtype bfloat16 \
    "${STEPS[@]}" --time-steps "$TIME_STEPS" --out "/tmp/$name" --summary "$OUT/$name.txt"
  local rc=$?
  rm -f "$OUT/$name.json"  # the per-op JSON stays out of the 8 files; the text has the top ops
  return $rc
}

ref() {  # ref NAME EXTRA...: the reference's step at batch REF_B, bf16 autocast
  local name=$1; shift
  # shellcheck disable=SC2086  # REF_PY may be "python shim.py"
  STEP_OUT="/tmp/$name.out" step "$name" 220 60 env PYTHONPATH="$REF_PATH" $REF_PY "$REF_SCRIPT" \
    --device="$DEVICE" --batch="$REF_B" --amp "${REF_STEPS[@]}" "$@"
  local rc=$?
  # Its JSON line and '<rate> samples/s' (or the end of the error).
  tail -3 "/tmp/$name.out" | sed "s/^/$name: /" >> "$OUT/ref.txt"
  tail -3 "/tmp/$name.out"
  return $rc
}

for part in "${PARTS[@]}"; do
  case "$part" in
    prof_32) prof prof_32 "$B_SMALL" ;;
    prof_128) prof prof_128 "$B_LARGE" \
                XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=$AUTOTUNE_128" ;;
    conv_layers) step conv_layers 150 60 "$PY" bench/conv_layers.py "${SIZE[@]}" \
                   --batch "$B_SMALL" --dtype bfloat16 --repeats "$REPEATS" \
                   --json "$OUT/conv_layers.json" ;;
    ref_32) ref ref_32 ;;
    ref_32_compiled) ref ref_32_compiled --compile ;;
    sup_bf16_32) step sup_bf16_32 200 120 "$PY" bench/train_step.py "${SIZE[@]}" \
                   --task=supervised --dtype=bfloat16 --batch="$B_SMALL" "${STEPS[@]}" \
                   --warmup=2 --json="$OUT/sup_bf16_32.json" ;;
    # Not in the default set (issue 6's figures, measured or still open): ask for them by name.
    sup_fp32_16) step sup_fp32_16 240 150 "$PY" bench/train_step.py "${SIZE[@]}" \
                   --task=supervised --dtype=float32 --batch=16 --steps=10 --warmup=2 \
                   --json="$OUT/sup_fp32_16.json" ;;
    ssl) step ssl 300 150 "$PY" bench/train_step.py --step=real --task=simclr --ssl-impl=gradcache \
           --dtype=bfloat16 --chunks=32 --batch=1024 --steps=2 --warmup=1 \
           --json="$OUT/ssl_real_1024.json" ;;
    ntxent) step ntxent 120 60 "$PY" bench/ntxent.py --sizes 1024,4096,8192 --repeats 5 \
              --out "$OUT/ntxent.json" ;;
    *) echo "unknown part $part (prof_32 prof_128 conv_layers ref_32 ref_32_compiled sup_bf16_32;" \
            "on request: sup_fp32_16 ssl ntxent)" ;;
  esac
done

{
  for f in "$OUT/prof_32.txt" "$OUT/prof_128.txt"; do [ -f "$f" ] && sed -n 1,3p "$f"; done
  [ -f "$OUT/prof_128.txt" ] && echo "(prof_128 autotuned at xla_gpu_autotune_level=$AUTOTUNE_128)"
  [ -f "$OUT/ref.txt" ] && grep "samples/s" "$OUT/ref.txt"
  [ -f "$OUT/sup_bf16_32.json" ] && "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); \
print('sup_bf16_32: compile %.1f s, %.2f ms, %.1f samples/s, MFU %s, %s x roofline' % (d['compile_s'], \
d['step_s_median'] * 1e3, d['samples_per_s'], d.get('mfu'), d.get('step_over_bound')))" "$OUT/sup_bf16_32.json"
} | tee "$OUT/summary.txt"
if [ ${#SKIPPED[@]} -gt 0 ]; then
  echo "skipped for lack of time: ${SKIPPED[*]} -> run: bash bench/device_check.sh ${SKIPPED[*]}"
fi
}

main "$@" 2>&1 | tee -a "$LOG"
