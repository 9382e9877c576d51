#!/usr/bin/env bash
# One CPU host. FAKE_DEVICES=N splits the CPU into N JAX devices (to try a mesh before a pod run).
# usage: launch/cpu.sh evolve --config configs/evolve/smollm2-135m_cpu.yaml --out runs/evolve   (any subcommand)
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 SUBCOMMAND [ARGS ...]   (any rstar-jax subcommand: search, evolve, train sft, ...)" >&2; exit 2; }
if [[ -n "${FAKE_DEVICES:-}" ]]; then export JAX_NUM_CPU_DEVICES="$FAKE_DEVICES"; fi
export JAX_PLATFORMS=cpu
exec rstar-jax "$@"
