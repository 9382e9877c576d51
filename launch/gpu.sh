#!/usr/bin/env bash
# One GPU host, all its GPUs in one process (needs `pip install -e .[cuda]`).
# usage: launch/gpu.sh sft --model /models/Qwen2.5-Math-7B --data sft.jsonl --out runs/sft configs/qwen2.5-math-7b_8xh100.yaml
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 sft|ppm|prm|value --model M --data FILE --out DIR [config.yaml] [key=value ...]" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "$0: nvidia-smi not found: no NVIDIA driver on this host" >&2; exit 1; }
export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
exec rstar-jax train "$@"
