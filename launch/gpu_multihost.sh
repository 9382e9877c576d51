#!/usr/bin/env bash
# Several GPU hosts: run this on every host with the same arguments and its own RSTAR_PROCESS_ID.
#   COORDINATOR_ADDRESS=host0:12355 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu_multihost.sh evolve --config C --out /shared/runs/x
# Any subcommand: searches split their problems over the hosts, training is one program over all of them.
# --out must be on storage every host sees (checkpoints are written by all processes).
set -euo pipefail
missing=()
for v in COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID; do [[ -n "${!v:-}" ]] || missing+=("$v"); done
if (( ${#missing[@]} )); then echo "$0: set ${missing[*]} (coordinator host:port, process count, this host's id)" >&2; exit 2; fi
[[ $# -ge 1 ]] || { echo "usage: $0 SUBCOMMAND [ARGS ...]   (any rstar-jax subcommand: search, evolve, train sft, ...)" >&2; exit 2; }
export RSTAR_COORDINATOR_ADDRESS="$COORDINATOR_ADDRESS" RSTAR_NUM_PROCESSES="$NUM_PROCESSES" RSTAR_PROCESS_ID="$PROCESS_ID"
export JAX_PLATFORMS=cuda
exec rstar-jax "$@"
