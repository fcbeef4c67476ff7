#!/usr/bin/env bash
# The pending GPU figures of docs/BENCHMARKS.md in one go, on a lent H100 / H200 (about 15 minutes of
# device time per session, at most 10 minutes per `run` call).
#
# Once, here (the wheels are pure Python, 180 KiB; .whl/ is gitignored, never commit it):
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl clu==0.0.12 ml_collections==1.1.0
# The device has every other requirement of the two (absl-py, etils[epath], flax, jax, numpy,
# packaging, PyYAML, typing-extensions, wrapt: `unzip -p .whl/NAME-*.whl '*/METADATA' | grep
# ^Requires-Dist`, checked against KINDS.md's package list), but no TensorFlow: bench/train_step.py
# imports lcssl.train without it (clu's writers are imported only inside train.run).
#
# Then ONE `run` call (run tool arguments):
#   command:   bash bench/device_check.sh
#   carry:     [".whl"]
#   timeout_s: 600
# The script keeps to DEADLINE_S (default 560 s): each step gets `timeout` of at most what is left,
# and steps that no longer fit are skipped and listed with the command that runs them (a later call:
# `bash bench/device_check.sh PART...`, PART in sup_bf16_32 ssl conv_layers sup_fp32_16
# ntxent sup_bf16_16 sup_bf16_8). The most wanted figures run first. Results: $OUT/device_check.log, one JSON per step
# and summary.txt (at most 8 files come back from $OUT).
#
# SSL chunk count (global batch 1024 = 2048 views, default U-T&T; estimated for fp32, run in bf16): BENCHMARKS.md's CPU figure
# for the SimCLR model step is 1.55 GiB XLA peak at 2 patches, about 0.75 GiB per patch with the
# 27 M parameters' ~0.3 GiB (params, grads, momentum) left in. GradCache keeps one chunk's
# activations alive: 1024 / C patches x 0.75 GiB. The non-chunked part grows with the whole batch:
# raw inputs 2.1 MB, normalized 6 MB, two views 12 MB and their interleaved copy 12 MB per patch,
# ~32 MB x 1024 = ~32 GiB at most at once (less where XLA frees the non-interleaved views).
# C = 16: 48 + ~32 GiB > 78 GiB; C = 32: 24 + ~32 = ~56 GiB on an H100's 78 GiB, so 32, and 64 if
# 32 fails. XLA's own peak is printed (xla_peak_bytes) to correct this estimate. The SSL step
# compiles once (FLOPs come from lcssl.flops, not from a second compile).
# Seen on an H100 (2026-11-26, jax 0.11.2): XLA compiles the default U-T&T step in 85-124 s
# (autotuning included), hence the 240 s cap per supervised part; SSL at 1024 with 32 chunks in bf16
# ran with a 28.2 GiB XLA peak.
set -u -o pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
DEADLINE_S="${DEADLINE_S:-560}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# JAX preallocates 75% of the GPU by default; the SSL step may need more of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
cd "$(dirname "$0")/.."

main() {
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; return 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" || return 1

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(sup_bf16_32 ssl conv_layers sup_fp32_16 ntxent sup_bf16_16 sup_bf16_8)
SKIPPED=()

# step NAME CAP_S MIN_S CMD...: runs CMD under `timeout` of min(CAP_S, time left); skips it when
# less than MIN_S is left.
step() {
  local name=$1 cap=$2 min=$3; shift 3
  local left=$((DEADLINE_S - SECONDS))
  if [ "$left" -lt "$min" ]; then
    echo "== $name: skipped ($left s left, needs ~$min s)"; SKIPPED+=("$name"); return 99
  fi
  local limit=$((cap < left ? cap : left))
  echo "== $name (timeout ${limit} s, at ${SECONDS} s): $*"
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: rc=$rc after ${SECONDS} s"
  return $rc
}

sup() {  # sup PART DTYPE BATCH: the model step (fwd + bwd + SGD), as in BENCHMARKS.md's CPU table
  step "$1" 240 150 "$PY" bench/train_step.py --task=supervised --dtype="$2" --batch="$3" \
    --steps=10 --warmup=2 --json="$OUT/$1.json"
}

ssl() {  # ssl CHUNKS: lcssl.train's real SSL step, bf16 compute as one trains on a GPU
  step ssl 300 150 "$PY" bench/train_step.py --step=real --task=simclr --ssl-impl=gradcache \
    --dtype=bfloat16 --chunks="$1" --batch=1024 --steps=2 --warmup=1 --json="$OUT/ssl_real_1024.json"
}

for part in "${PARTS[@]}"; do
  case "$part" in
    sup_bf16_8) sup "$part" bfloat16 8 ;;
    sup_bf16_16) sup "$part" bfloat16 16 ;;
    sup_bf16_32) sup "$part" bfloat16 32 ;;
    sup_fp32_16) sup "$part" float32 16 ;;
    ssl) ssl 32; rc=$?
         if [ $rc -ne 0 ] && [ $rc -ne 99 ]; then echo "retrying with 64 chunks"; ssl 64; fi ;;
    conv_layers) step conv_layers 150 60 "$PY" bench/conv_layers.py --batch 32 --dtype bfloat16 \
                   --repeats 20 ;;
    ntxent) step ntxent 120 60 "$PY" bench/ntxent.py --sizes 1024,4096,8192 --repeats 5 \
              --out "$OUT/ntxent.json" ;;
    *) echo "unknown part $part (sup_bf16_8 sup_bf16_16 sup_bf16_32 sup_fp32_16 ssl conv_layers ntxent)" ;;
  esac
done

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    d = json.load(open(path))
    if "step_s_median" not in d:
        continue
    name = os.path.basename(path)[:-5]
    impl = f" {d['ssl_impl']}/{d['num_chunks']}" if d.get("ssl_impl") else ""
    peak = d.get("xla_peak_bytes")
    mfu = d.get("mfu_vs_bf16_peak")
    rows.append(f"{name:<16} {d.get('step', 'model'):<5} {d.get('task', d.get('mode')):<10}{impl:<14} {d['batch']:>5} "
                f"{d['dtype']:<8} {d['step_s_median'] * 1e3:>9.1f} {d['samples_per_s']:>9.2f} "
                f"{d['model_flops_per_step'] / 1e12:>8.2f} "
                f"{peak / 2**30 if peak else float('nan'):>8.2f} "
                f"{'%.1f%%' % (100 * mfu) if mfu else 'n/a':>6}")
print(f"{'run':<16} {'step':<5} {'task':<10}{'':<14} {'batch':>5} {'dtype':<8} {'step ms':>9} "
      f"{'samples/s':>9} {'TFLOP':>8} {'peak GiB':>8} {'MFU':>6}")
print("\n".join(rows) or "(no train-step results)")
nt = os.path.join(sys.argv[1], "ntxent.json")
if os.path.exists(nt):
    print(f"\nNT-Xent ({json.load(open(nt))['machine']['device_kind']}): method N peak_MiB median_ms")
    for r in json.load(open(nt))["rows"]:
        ms = r["median_ms"] or float("nan")
        print(f"  {r['method']:<18} {r['n_pairs']:>6} {r['peak_mib']:>9.1f} {ms:>9.2f}")
EOF
if [ ${#SKIPPED[@]} -gt 0 ]; then
  echo "skipped for lack of time: ${SKIPPED[*]} -> run: bash bench/device_check.sh ${SKIPPED[*]}"
fi
}

main "$@" 2>&1 | tee -a "$LOG"
