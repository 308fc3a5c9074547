#!/bin/bash
# TPU pod launcher: runs the same command on every worker of a TPU VM pod slice.
#
#   scripts/launch/tpu_pod.sh my-v5p-64 us-east5-a scripts/train_sft.py --config=configs/sft.py:14b \
#       --config.mesh.fsdp=-1 --config.data.data_root=gs://bucket/robotwin
#
# Each worker needs this repository and `pip install -r requirements.txt "jax[tpu]==0.10.2"` (the first
# command below does both when REPO_URL is set). jax.distributed.initialize() discovers the pod topology
# from the TPU metadata, so every worker starts the same command and JAX forms one job.
set -euo pipefail
TPU_NAME=${1:?tpu name}; ZONE=${2:?zone}; shift 2
REPO_DIR=${REPO_DIR:-eva_jax}
if [[ -n "${REPO_URL:-}" ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
    "test -d $REPO_DIR || git clone $REPO_URL $REPO_DIR; cd $REPO_DIR && python3 -m venv .venv && \
     .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ."
fi
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && .venv/bin/python $ARGS"
