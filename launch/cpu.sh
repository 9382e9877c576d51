#!/usr/bin/env bash
# One CPU host. FAKE_DEVICES=N splits the CPU into N JAX devices (to try a mesh before a pod run).
# usage: launch/cpu.sh sft --model smollm2-135m --data sft.jsonl --out runs/sft configs/smollm2-135m_cpu.yaml [key=value ...]
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 sft|ppm|prm|value --model M --data FILE --out DIR [config.yaml] [key=value ...]" >&2; exit 2; }
if [[ -n "${FAKE_DEVICES:-}" ]]; then export JAX_NUM_CPU_DEVICES="$FAKE_DEVICES"; fi
export JAX_PLATFORMS=cpu
exec rstar-jax train "$@"
