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
#       ./launch.sh --tpu --config=configs/ssl_hameln.py --workdir=gs://bucket/runs/ssl_hameln"
#
# The workdir must be shared by all hosts (NFS, GCS). Rerunning the same command resumes from the
# latest checkpoint; a SIGTERM (preemption, scancel) to any one host makes every host save the same
# step and exit (JAX's preemption service; tested with two processes). Compiled programs are
# cached in $JAX_COMPILATION_CACHE_DIR (default ~/.cache/lcssl/jax) so restarts start fast.
set -euo pipefail
cd "$(dirname "$0")"

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

export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/lcssl/jax}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# JAX may take most of the GPU memory up front; TensorFlow (tf.data only) is kept off the GPUs by main.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m lcssl.main "${args[@]}" "$@"
