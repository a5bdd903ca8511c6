#!/usr/bin/env bash
# Creates a Cloud TPU VM, installs this checkout on every worker and runs the launcher there.
#
#   TPU_NAME=user-llm ZONE=us-central2-b ACCELERATOR=v4-8 RUNTIME=tpu-ubuntu2204-base \
#     experiments/tpu/launch.sh --config=experiments/configs/encoder_movielens.py \
#       --config.data.manual_dir=/home/$USER/ml-latest-small --config.mesh.shape='(-1,1,1)'
#
# Every argument is passed to `python -m experiments.main` unchanged, on all workers at
# once (--worker=all): each host runs the same program and JAX forms one global mesh over
# all chips. On a multi-host slice (more than one worker) set DISTRIBUTED=1 (adds
# --distributed, i.e. jax.distributed.initialize()) and point WORKDIR at a directory all
# hosts share (e.g. a gcsfuse mount), because checkpoints are written collectively.
# Set CREATE=0 to reuse an existing TPU VM, DELETE=1 to delete it when the run ends.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
WORKDIR="${WORKDIR:-\$HOME/runs/${TPU_NAME}}"
CREATE="${CREATE:-1}"
DELETE="${DELETE:-0}"
DISTRIBUTED="${DISTRIBUTED:-0}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="${PROJECT}"); fi
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [[ "${CREATE}" == "1" ]]; then
  gcloud compute tpus tpu-vm create "${TPU_NAME}" "${PROJECT_FLAG[@]}" --zone="${ZONE}" \
    --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}"
fi

# Copy the checkout (without data or run directories) to every worker.
ARCHIVE="$(mktemp -t user_llm_jax.XXXXXX.tar.gz)"
trap 'rm -f "${ARCHIVE}"' EXIT
tar -C "${REPO_DIR}" --exclude=.git --exclude='workdir*' --exclude='runs' -czf "${ARCHIVE}" .
gcloud compute tpus tpu-vm scp "${ARCHIVE}" "${TPU_NAME}":~/user_llm_jax.tar.gz \
  "${PROJECT_FLAG[@]}" --zone="${ZONE}" --worker=all

EXTRA=""
if [[ "${DISTRIBUTED}" == "1" ]]; then EXTRA="--distributed"; fi
ARGS="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${PROJECT_FLAG[@]}" --zone="${ZONE}" --worker=all \
  --command="set -e; mkdir -p ~/user_llm_jax && tar -xzf ~/user_llm_jax.tar.gz -C ~/user_llm_jax \
    && cd ~/user_llm_jax && python3 -m pip install -q -e . 'jax[tpu]==0.10.2' \
    && python3 -m experiments.main --workdir=${WORKDIR} ${EXTRA} ${ARGS}"

if [[ "${DELETE}" == "1" ]]; then
  gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${PROJECT_FLAG[@]}" --zone="${ZONE}" --quiet
fi
