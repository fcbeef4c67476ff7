#!/usr/bin/env bash
# The label-efficiency study (lcssl.study) on one GPU machine in one call, from a dataset built on a
# CPU machine and carried over. Two steps:
#
#   1. On a CPU machine with TensorFlow and rasterio (data_prep needs them):
#        bench/study_gpu.sh prepare CARRY [PRESET] [--wheels]
#      builds the preset's benchmark exactly as the study would (lcssl.study's own data step), and
#      packs into CARRY/data.tar.xz only what training reads: dataset_card.json, build_plan.json,
#      the shards and their record indexes (the raw synthetic files, QA report and logs stay
#      behind; protocol 1's gpu preset: 1280 records, 56.5 MiB of shards, 25.6 MiB packed;
#      protocol 4's benchmark: 1600 records, 71 MiB of shards (packed size not yet measured),
#      besides 99 MiB of raw files that stay behind).
#      --wheels also downloads (Python 3.12, manylinux x86_64, no dependencies) the wheels a GPU
#      machine may lack: clu, ml_collections, wrapt (clu's), pillow (the study's plot).
#      It prints CARRY's size; a GPU machine that takes the working tree and 64 MiB of extras
#      must get CARRY under that (bench/carry is ignored by git: name it as an extra to carry).
#
#   2. On the GPU machine (no TensorFlow needed: the native reader and lcssl/writers.py):
#        bench/study_gpu.sh run CARRY OUT [PRESET] [STUDY FLAGS...]
#      e.g.  bench/study_gpu.sh run bench/carry "$OUT" gpu --config.seeds='(0,)'
#      unpacks CARRY/data.tar.xz into WORKDIR/data, installs CARRY/wheels into a private folder
#      if an import is missing, then runs
#        python -m lcssl.study --config=configs/study_synth.py:PRESET --config.data.data_dir=WORKDIR/data
#          --workdir=$WORKDIR --parallel=$PARALLEL --records=OUT/study_records --results=OUT/RESULTS.md
#          [STUDY FLAGS...]
#      for at most BUDGET_S seconds. Every run's record is written as the run finishes, so on the
#      budget the study is stopped (SIGTERM: each run saves a checkpoint and exits), the report is
#      written from the records finished so far, and a later call with the same OUT/study_records
#      continues the study. OUT also gets study.log, gpu.txt (nvidia-smi) and status.txt.
#
# What it expects: the repository root as the working directory; python (PYTHON, default python3)
# with jax (with its GPU plugin), flax, optax, orbax-checkpoint, numpy, protobuf, tensorboard,
# absl-py, etils and tqdm; the preset and arm details come from configs/study_synth.py and the flags
# given here (e.g. --config.only_arms=..., --config.seeds=..., --config.run_overrides=...), so the
# script changes with neither. Environment: BUDGET_S (default 480: the study's share of a 9-minute
# call, leaving the set-up, the report and the copy-back their minute), PARALLEL (runs side by side,
# default 4, as the gpu preset's docstring says), WORKDIR (checkpoints and logs, default
# /tmp/lcssl_study_gpu; not copied to OUT).
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
parallel=${PARALLEL:-4}
mkdir -p "$out" "$workdir"
out=$(cd "$out" && pwd)
t0=$(date +%s)
[ -f "$carry/data.tar.xz" ] || { echo "error: $carry/data.tar.xz: not found; make it with" \
  "'bench/study_gpu.sh prepare $carry' on a CPU machine" >&2; exit 2; }
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

study=("$PYTHON" -m lcssl.study "--config=configs/study_synth.py:$preset" "--config.data.data_dir=$workdir/data"
       "--workdir=$workdir" "--parallel=$parallel" "--records=$out/study_records" "--results=$out/RESULTS.md" "$@")
echo "\$ ${study[*]}" | tee "$out/study.log"
set +e
timeout --signal=TERM --kill-after=45 "$budget" "${study[@]}" >> "$out/study.log" 2>&1
rc=$?
set -e
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then  # stopped on the budget: the report of what finished
  echo "stopped after ${budget}s; report from the finished runs' records" | tee -a "$out/study.log"
  "${study[@]}" --report_only >> "$out/study.log" 2>&1 || true
fi
tail -n 5 "$out/study.log"
printf 'exit %s after %ss (budget %ss), preset %s, flags: %s\n' "$rc" "$(( $(date +%s) - t0 ))" "$budget" \
  "$preset" "$*" | tee "$out/status.txt"
[ $rc -eq 0 ] || [ $rc -eq 124 ] || [ $rc -eq 137 ]
