#!/usr/bin/env bash
# Run the same command on every worker of a TPU VM pod slice (JAX finds its peers itself): any subcommand;
# searches split their problems over the workers, training is one program over all of them.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh evolve --config configs/evolve/qwen2.5-math-7b_v5p-64.yaml \
#       --out /mnt/shared/runs/evolve
# The repo must be installed on every worker (`pip install -e .[tpu]` in REPO_DIR); --out must be shared storage.
set -euo pipefail
missing=()
for v in TPU_NAME ZONE; do [[ -n "${!v:-}" ]] || missing+=("$v"); done
if (( ${#missing[@]} )); then echo "$0: set ${missing[*]} (the TPU VM name and its zone)" >&2; exit 2; fi
[[ $# -ge 1 ]] || { echo "usage: $0 SUBCOMMAND [ARGS ...]   (any rstar-jax subcommand: search, evolve, train sft, ...)" >&2; exit 2; }
command -v gcloud >/dev/null || { echo "$0: gcloud not found" >&2; exit 1; }
REPO_DIR="${REPO_DIR:-~/rstar-jax}"
args=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="cd $REPO_DIR && RSTAR_DISTRIBUTED=auto JAX_PLATFORMS=tpu rstar-jax $args"
