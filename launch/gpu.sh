#!/usr/bin/env bash
# One GPU host, all its GPUs in one process (needs `pip install -e .[cuda]`).
# usage: launch/gpu.sh evolve --config configs/evolve/qwen2.5-math-7b_8xh100.yaml --out runs/evolve   (any subcommand)
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 SUBCOMMAND [ARGS ...]   (any rstar-jax subcommand: search, evolve, train sft, ...)" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "$0: nvidia-smi not found: no NVIDIA driver on this host" >&2; exit 1; }
export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec rstar-jax "$@"
