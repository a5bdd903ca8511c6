#!/usr/bin/env bash
# Creates a Cloud TPU VM, installs this checkout on every worker and runs the launcher there.
#
#   TPU_NAME=user-llm ZONE=us-central2-b ACCELERATOR=v4-8 RUNTIME=tpu-ubuntu2204-base \
#     experiments/tpu/launch.sh --config=experiments/configs/encoder_movielens.py \
#       --config.data.manual_dir=/home/$USER/ml-latest-small --config.mesh.shape='(-1,1,1)'
#
# Every argument is passed to `python -m experiments.main` unchanged, on all workers at
# once (--worker=all): each host runs the same program, joins the process group
# (--distributed: jax.distributed.initialize() detects the slice's hosts) and JAX forms
# one global mesh over all chips; each host reads its own shard of the data. On a
# multi-host slice point WORKDIR at a directory all hosts share (e.g. a gcsfuse mount),
# because checkpoints are written collectively.
#
# Environment:
#   TPU_NAME, ZONE  required; PROJECT optional (else gcloud's default project)
#   ACCELERATOR     accelerator type (default v4-8); RUNTIME the TPU VM image
#   WORKDIR         the run's directory on the workers (default $HOME/runs/$TPU_NAME);
#                   a gs://bucket/path installs the `gcs` extra on the workers too
#   CREATE=0        reuse an existing TPU VM;   DELETE=1  delete it when the run ends
#   DISTRIBUTED=0   run without joining a process group (one host only)
#   DRY_RUN=1       print the commands (one per line, shell-quoted, prefixed by "+ ")
#                   instead of running them
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
WORKDIR="${WORKDIR:-\$HOME/runs/${TPU_NAME}}"
CREATE="${CREATE:-1}"
DELETE="${DELETE:-0}"
DISTRIBUTED="${DISTRIBUTED:-1}"
DRY_RUN="${DRY_RUN:-0}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="${PROJECT}"); fi
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# Runs a command, or prints it (shell-quoted) when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

if [[ "${CREATE}" == "1" ]]; then
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${PROJECT_FLAG[@]}" --zone="${ZONE}" \
    --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}"
fi

# Copy the checkout (without data or run directories) to every worker.
ARCHIVE="${TMPDIR:-/tmp}/user_llm_jax.$$.tar.gz"
if [[ "${DRY_RUN}" != "1" ]]; then trap 'rm -f "${ARCHIVE}"' EXIT; fi
run tar -C "${REPO_DIR}" --exclude=.git --exclude='workdir*' --exclude='runs' -czf "${ARCHIVE}" .
run gcloud compute tpus tpu-vm scp "${ARCHIVE}" "${TPU_NAME}":~/user_llm_jax.tar.gz \
  "${PROJECT_FLAG[@]}" --zone="${ZONE}" --worker=all

EXTRA=""
if [[ "${DISTRIBUTED}" == "1" ]]; then EXTRA="--distributed"; fi
ARGS=""
if [[ $# -gt 0 ]]; then ARGS="$(printf '%q ' "$@")"; fi
# A Cloud Storage workdir needs the filesystem layer of the `gcs` extra on every worker.
PACKAGE="."
if [[ "${WORKDIR}" == gs://* ]]; then PACKAGE=".[gcs]"; fi
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${PROJECT_FLAG[@]}" --zone="${ZONE}" \
  --worker=all --command="set -e; mkdir -p ~/user_llm_jax && tar -xzf ~/user_llm_jax.tar.gz -C ~/user_llm_jax \
&& cd ~/user_llm_jax && python3 -m pip install -q -e '${PACKAGE}' 'jax[tpu]==0.10.2' \
&& python3 -m experiments.main --workdir=${WORKDIR} ${EXTRA} ${ARGS}"

if [[ "${DELETE}" == "1" ]]; then
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${PROJECT_FLAG[@]}" --zone="${ZONE}" --quiet
fi
