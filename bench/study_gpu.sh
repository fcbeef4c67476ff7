#!/usr/bin/env bash
# The label-efficiency study (lcssl.study) on one GPU machine, one call of at most 9 minutes after
# another, from a dataset built on a CPU machine and carried over. Two steps:
#
#   1. On a CPU machine with TensorFlow and rasterio (data_prep needs them):
#        bench/study_gpu.sh prepare bench/carry gpu --wheels
#      (prepare CARRY [PRESET] [--wheels]) builds the preset's benchmark exactly as the study would
#      (lcssl.study's own data step), and packs into CARRY/data.tar.xz only what training reads:
#      dataset_card.json, build_plan.json, the shards and their record indexes (the raw synthetic
#      files, QA report and logs stay behind). Protocol 4's benchmark (the gpu preset's): 1600
#      records, 71 MiB of shards, 31.1 MiB packed; 39.2 MiB with the wheels (docs/BENCHMARKS.md).
#      --wheels also downloads (Python 3.12, manylinux x86_64, no dependencies) the wheels a GPU
#      machine may lack: clu, ml_collections, wrapt (clu's), pillow (the study's plot).
#      It prints CARRY's size; a GPU machine that takes the working tree and 64 MiB of extras
#      must get CARRY under that (bench/carry is ignored by git: name it as an extra to carry).
#
#   2. On the GPU machine (no TensorFlow needed: the native reader and lcssl/writers.py), per call:
#        bench/study_gpu.sh run bench/carry "$OUT" gpu
#        bench/study_gpu.sh run bench/carry "$OUT" gpu --config.seeds='(1,)' --config.only_arms=scratch_unet
#      (run CARRY OUT [PRESET] [STUDY FLAGS...]) unpacks CARRY/data.tar.xz into WORKDIR/data,
#      installs CARRY/wheels into a private folder if an import is missing, copies the records of
#      RECORDS_IN into WORKDIR/study_records, then runs
#        python -m lcssl.study --config=configs/study_synth.py:PRESET --config.data.data_dir=WORKDIR/data
#          --workdir=WORKDIR --parallel=PARALLEL --records=WORKDIR/study_records
#          --results=OUT/RESULTS.md --budget_s=LAUNCH_S [STUDY FLAGS...]
#      Runs with a record are not run again. No run starts after LAUNCH_S seconds; the runs running
#      then finish, and the report is written from every record. BUDGET_S is the hard stop: at it
#      the study is stopped (SIGTERM: each run saves a checkpoint and exits; on a fresh machine that
#      checkpoint is lost and the run starts over in the next call) and the report is written from
#      the records finished so far. OUT gets the records this call made (OUT/study_records, the
#      same layout as docs/study_records: copy them there and commit, and the next call, which
#      carries the working tree, starts from them), RESULTS.md with its plot and tables, study.log,
#      gpu.txt (nvidia-smi) and status.txt. STUDY FLAGS are the study's own (`--config.x=y` for
#      fields of configs/study_synth.py, e.g. --config.seeds, --config.only_arms, --config.input),
#      so the script changes with neither.
#
# Environment: PYTHON (default python3), with jax (with its GPU plugin), flax, optax,
# orbax-checkpoint, numpy, protobuf, tensorboard, absl-py, etils and tqdm; the repository root as
# the working directory. BUDGET_S (default 480: the study's share of a 9-minute call, leaving the
# unpacking, the wheels, the report and the copy-back their minute). LAUNCH_S (default 300).
# PARALLEL (runs side by side, default 4: 4 cores and 0.225 of the GPU's memory each). RECORDS_IN
# (the records the call starts from: default docs/study_records, the committed ones, for the gpu
# preset; none for other presets, whose runs would take the committed records' names; empty:
# none). WORKDIR (checkpoints and logs, default /tmp/lcssl_study_gpu; not copied to OUT).
#
# What a call is expected to finish (an estimate: no GPU figure of the study exists yet). The gpu
# preset is protocol 4 whole: 5 seeds x (9 pre-trainings + 65 fine-tunings) = 370 runs, 29 of them
# finished on the CPU (docs/study_records/protocol4). Steps per run, from configs/study_synth.py:
# fine-tuning 600 (1%, 10%) or 1,400 (100%) at batch 8, a validation every 20 steps; pre-training
# 320 (40 epochs x 8) at batch 128, the seminar's recipe (simclr_seed) 2,800 at batch 16, a probe
# every 40 steps. Measured on the 2-core CPU (the records' timing, 2 workers): 0.7-0.85 s per
# fine-tuning step, 6.1 s per batch-128 pre-training step (600 steps: 450-650 s; a pre-training:
# 2,050 s). On the GPU the tiny model's step runs the default U-T&T's kernels on 32 px patches, so
# it is bound by kernel launches, not FLOPs: under the default step's 19.8 ms at batch 8 on an
# H100 (docs/BENCHMARKS.md, 2026-11-26), taken as ~15 ms. The native reader's host batch, measured
# on one CPU core: 4.8 ms at batch 8 (hidden behind the step by its prefetch), 98 ms at batch 128
# (on a worker's 4 cores, taken as ~50 ms: pre-training is input-bound). Per run, with ~15 s of
# start-up, final test and record, and ~0.2 s per validation, ~1.5 s per probe of 1,024 patches:
#     fine-tuning at 1% or 10%:    600 x 15 ms +  31 x 0.2 s + 15 s  ~  30 s
#     fine-tuning at 100%:        1400 x 15 ms +  71 x 0.2 s + 15 s  ~  50 s
#     pre-training, batch 128:     320 x 50 ms +   9 x 1.5 s + 15 s  ~  45 s
#     pre-training, simclr_seed:  2800 x 15 ms +  71 x 1.5 s + 15 s  ~ 160 s
# plus each program's first compilation in a call (a fresh machine has an empty compilation
# cache): ~1.5-2.5 min of each worker's time. One seed: 21 x (30 + 30 + 50) + 2 x 30 + 8 x 45 +
# 160 ~ 2,900 s of runs, ~12 min on 4 workers. One call: ~30 s to start the study, then runs
# launched until LAUNCH_S = 300 s: 4 workers x (300 - 30 - ~120 s of compilation) / ~40 s per run,
# plus the runs finishing after it: ~15-25 runs, about a quarter of a seed; the whole preset in
# ~15-20 calls. A run launched just before LAUNCH_S ends by ~360 s (a fine-tuning) or ~460 s
# (simclr_seed's pre-training), inside BUDGET_S. A pre-training whose record exists but whose
# checkpoint is not on the machine runs again when a fine-tuning still needs it.
set -euo pipefail

PYTHON=${PYTHON:-python3}
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 2 ] || usage
mode=$1
shift
cd "$(dirname "$0")/.."

if [ "$mode" = prepare ]; then
  carry=$1
  preset=${2:-gpu}
  wheels=${3:-}
  build=${BUILD_DIR:-/tmp/lcssl_study_gpu_build/$preset}
  mkdir -p "$build" "$carry"
  rm -rf "$carry/data"
  mkdir "$carry/data"
  # The study's own data step: the same benchmark a study on this machine would build. Run with
  # -c, not from stdin: the build's worker processes (spawned) re-import a main that is a file or none.
  "$PYTHON" -c '
import pathlib, sys
from configs import study_synth
from lcssl import study
print(study.prepare_data(study_synth.get_config(sys.argv[1]), pathlib.Path(sys.argv[2])))
' "$preset" "$build"
  src="$build/data/built"
  cp "$src/dataset_card.json" "$src/build_plan.json" "$src"/*.tfrecord "$carry/data/"
  "$PYTHON" -c "import sys; from lcssl.data import native; print(native.write_indexes(sys.argv[1]), 'records indexed')" \
    "$carry/data"
  "$PYTHON" - "$carry" <<'EOF'
import os, sys, tarfile
carry = sys.argv[1]
tmp = os.path.join(carry, ".data.tar.xz.tmp")
with tarfile.open(tmp, "w:xz") as tar:
    tar.add(os.path.join(carry, "data"), arcname="data")
os.replace(tmp, os.path.join(carry, "data.tar.xz"))
EOF
  rm -rf "$carry/data"
  if [ "$wheels" = --wheels ]; then
    clu=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('clu'))")
    mlc=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('ml_collections'))")
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 -d "$carry/wheels" "clu==$clu" "ml_collections==$mlc" wrapt pillow
  fi
  echo "carry: $(du -sm "$carry" | cut -f1) MiB in $carry"
  exit 0
fi

[ "$mode" = run ] || usage
[ $# -ge 2 ] || usage
carry=$(cd "$1" && pwd)
out=$2
preset=${3:-gpu}
shift 2
[ $# -ge 1 ] && shift
workdir=${WORKDIR:-/tmp/lcssl_study_gpu}
budget=${BUDGET_S:-480}
launch=${LAUNCH_S:-300}
parallel=${PARALLEL:-4}
if [ -z "${RECORDS_IN+set}" ]; then  # unset: the committed records, for the preset they belong to
  records_in=$([ "$preset" = gpu ] && echo docs/study_records || true)
else
  records_in=$RECORDS_IN
fi
mkdir -p "$out" "$workdir"
out=$(cd "$out" && pwd)
t0=$(date +%s)
[ -f "$carry/data.tar.xz" ] || { echo "error: $carry/data.tar.xz: not found; make it with" \
  "'bench/study_gpu.sh prepare $carry' on a CPU machine" >&2; exit 2; }
[ -z "$records_in" ] || [ -d "$records_in" ] || { echo "error: RECORDS_IN=$records_in: not a folder" \
  "(the records a call starts from, e.g. docs/study_records; RECORDS_IN= for none)" >&2; exit 2; }
rm -rf "$workdir/data"
"$PYTHON" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
  "$carry/data.tar.xz" "$workdir"

imports="import jax, flax, optax, orbax.checkpoint, clu, ml_collections, wrapt, PIL, tensorboard, tqdm"
if ! "$PYTHON" -c "$imports" 2>/dev/null; then
  [ -d "$carry/wheels" ] || { echo "error: missing Python packages ($imports) and no $carry/wheels" >&2; exit 2; }
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$workdir/site" "$carry"/wheels/*.whl
  export PYTHONPATH="$workdir/site${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "$imports"
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi") > "$out/gpu.txt" 2>&1

# The records this call starts from; those it adds go to OUT (the ones carried in stay as they were).
records=$workdir/study_records
rm -rf "$records"
mkdir -p "$records"
[ -z "$records_in" ] || cp -R "$records_in"/. "$records"/
listing() { (cd "$records" && find . -type f | sort); }
listing > "$workdir/records_before.txt"

study=("$PYTHON" -m lcssl.study "--config=configs/study_synth.py:$preset" "--config.data.data_dir=$workdir/data"
       "--workdir=$workdir" "--parallel=$parallel" "--records=$records" "--results=$out/RESULTS.md"
       "--budget_s=$launch" "$@")
echo "\$ ${study[*]}" | tee "$out/study.log"
echo "records carried in: $(wc -l < "$workdir/records_before.txt") files from ${records_in:-nowhere}" \
  | tee -a "$out/study.log"
set +e
timeout --signal=TERM --kill-after=45 "$budget" "${study[@]}" >> "$out/study.log" 2>&1
rc=$?
set -e
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then  # stopped on the budget: the report of what finished
  echo "stopped after ${budget}s; report from the finished runs' records" | tee -a "$out/study.log"
  "${study[@]}" --report_only >> "$out/study.log" 2>&1 || true
fi
listing | comm -13 "$workdir/records_before.txt" - > "$workdir/records_new.txt"
while IFS= read -r f; do
  mkdir -p "$out/study_records/$(dirname "$f")"
  cp "$records/$f" "$out/study_records/$f"
done < "$workdir/records_new.txt"
tail -n 5 "$out/study.log"
printf 'exit %s after %ss (budget %ss, launches until %ss), preset %s, %s new records, flags: %s\n' "$rc" \
  "$(( $(date +%s) - t0 ))" "$budget" "$launch" "$preset" "$(wc -l < "$workdir/records_new.txt")" "$*" \
  | tee "$out/status.txt"
[ $rc -eq 0 ] || [ $rc -eq 124 ] || [ $rc -eq 137 ]
