#!/usr/bin/env bash
# Launch lcssl training on one host or many, GPU or TPU. Everything after the options goes to
# `python -m lcssl.main` (so --config=... --workdir=... and any --config.* override).
#
#   Single host, all local GPUs (one process drives every device):
#     ./launch.sh --config=configs/ssl_hameln.py --workdir=runs/ssl_hameln
#
#   Several GPU hosts, one process per host: run on every host with its own id,
#     COORDINATOR_ADDRESS=node0:1234 NUM_PROCESSES=4 PROCESS_ID=$i \
#       ./launch.sh --config=configs/ssl_hameln.py --workdir=/shared/runs/ssl_hameln
#   or with options:  ./launch.sh --coordinator=node0:1234 --num-processes=4 --process-id=$i -- ...
#
#   SLURM (one task per host, or per GPU with --gpus-per-task=1); ids come from SLURM_* variables:
#     srun --ntasks=4 --ntasks-per-node=1 ./launch.sh --config=configs/ssl_hameln.py --workdir=...
#
#   TPU VM pod: run the same command on every worker (jax.distributed.initialize() auto-detects):
#     gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd lcssl && \
#       ./launch.sh --tpu --config=configs/ssl_hameln.py --workdir=/shared/runs/ssl_hameln"
#
# The workdir must be a local path shared by all hosts (NFS, Filestore). gs:// URLs are not
# supported yet: lcssl writes its files with local open/os.makedirs (docs/DESIGN.md, "Remote paths"). Rerunning the same command resumes from the
# latest checkpoint; a SIGTERM (preemption, scancel) to any one host makes every host save the same
# step and exit (JAX's preemption service; tested with two processes). Compiled programs are
# cached in $JAX_COMPILATION_CACHE_DIR (default ~/.cache/lcssl/jax) so restarts start fast.
#
# Relative paths in --workdir, --config.data_dir, --config.supervised.init_from and
# --config.supervised.init_encoder_from are taken from the directory you call launch.sh from; a
# relative --config too, unless it exists only in the repository (configs/...). LCSSL_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")"
repo="$PWD"

coordinator="${COORDINATOR_ADDRESS:-}"
num_processes="${NUM_PROCESSES:-}"
process_id="${PROCESS_ID:-}"
tpu=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator=*) coordinator="${1#*=}"; shift ;;
    --num-processes=*) num_processes="${1#*=}"; shift ;;
    --process-id=*) process_id="${1#*=}"; shift ;;
    --tpu) tpu=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

# A coordinator or process id without a process count would silently run one process alone.
if [[ "$tpu" == 0 && -z "$num_processes" && -z "${SLURM_NTASKS:-}" \
      && ( -n "$coordinator" || -n "$process_id" ) ]]; then
  echo "launch.sh: COORDINATOR_ADDRESS / --coordinator or PROCESS_ID / --process-id is set" \
       "(coordinator='$coordinator', process id='$process_id') but NUM_PROCESSES is not: set" \
       "NUM_PROCESSES (or --num-processes=N) to the total number of processes, or unset both" \
       "for a single-process run." >&2
  exit 2
fi

# SLURM: derive what was not given. The coordinator is the first node of the allocation.
if [[ -n "${SLURM_NTASKS:-}" && "${SLURM_NTASKS}" -gt 1 ]]; then
  num_processes="${num_processes:-$SLURM_NTASKS}"
  process_id="${process_id:-$SLURM_PROCID}"
  if [[ -z "$coordinator" ]]; then
    head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    coordinator="${head_node}:${LCSSL_COORDINATOR_PORT:-12345}"
  fi
  # One task per GPU: each process sees only its own GPU.
  if [[ -n "${SLURM_LOCALID:-}" && "${SLURM_GPUS_PER_TASK:-}" == "1" ]]; then
    export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"
  fi
fi

args=()
if [[ "$tpu" == 1 ]]; then
  args+=(--multiprocess=on)   # TPU pods: coordinator, count and id come from the TPU metadata
elif [[ -n "$num_processes" && "$num_processes" -gt 1 ]]; then
  if [[ -z "$coordinator" || -z "$process_id" ]]; then
    echo "launch.sh: NUM_PROCESSES=$num_processes needs COORDINATOR_ADDRESS (host:port of process 0)" \
         "and PROCESS_ID (0..$((num_processes - 1))), as variables or --coordinator= / --process-id=" >&2
    exit 2
  fi
  args+=(--coordinator_address="$coordinator" --num_processes="$num_processes" --process_id="$process_id")
else
  args+=(--multiprocess=off)
fi

# Paths the user gave relative to where they called from (this script runs from the repository).
absolute() {  # a path as given -> absolute from the caller's directory (URLs kept)
  case "$1" in /*|*://*|"") printf '%s' "$1" ;; *) printf '%s' "$caller/$1" ;; esac
}
config_path() {  # configs/x.py[:presets]: the caller's file, else the repository's
  local file="${1%%:*}" rest=""
  [[ "$1" == *:* ]] && rest=":${1#*:}"
  if [[ "$file" != /* && ! -e "$caller/$file" && -e "$repo/$file" ]]; then
    printf '%s' "$repo/$file$rest"
  else
    printf '%s' "$(absolute "$file")$rest"
  fi
}
user_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir=*|--config.data_dir=*|--config.supervised.init_from=*|--config.supervised.init_encoder_from=*)
      user_args+=("${1%%=*}=$(absolute "${1#*=}")") ;;
    --config=*) user_args+=("--config=$(config_path "${1#*=}")") ;;
    --workdir|--config.data_dir|--config.supervised.init_from|--config.supervised.init_encoder_from)
      user_args+=("$1=$(absolute "${2:-}")"); shift ;;
    --config) user_args+=("--config=$(config_path "${2:-}")"); shift ;;
    *) user_args+=("$1") ;;
  esac
  shift
done

export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/lcssl/jax}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# JAX may take most of the GPU memory up front; TensorFlow (tf.data only) is kept off the GPUs by main.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
if [[ -n "${LCSSL_DRY_RUN:-}" ]]; then
  printf '%s\n' "$PYTHON" -m lcssl.main "${args[@]}" ${user_args[@]+"${user_args[@]}"}
  exit 0
fi
exec "$PYTHON" -m lcssl.main "${args[@]}" ${user_args[@]+"${user_args[@]}"}
