#!/usr/bin/env bash
# On an offline CUDA node: install uniter_fast from a wheel folder (scripts/offline_wheels.py made it where the network
# is; the C++ extension compiles here) and run the GPU suite; everything lands in OUT (pytest -m gpu runs the checks as tests).
#   bash scripts/gpu_node.sh WHEELS OUT [suite options...]
set -uo pipefail
wheels=${1:?usage: gpu_node.sh WHEELS OUT [gpu_suite options]}
out=${2:?usage: gpu_node.sh WHEELS OUT [gpu_suite options]}
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -m pip install --no-index --find-links "$wheels" -e ".[train,bench]" pytest > "$out/install.log" 2>&1 \
    || { tail -30 "$out/install.log"; exit 1; }
tail -2 "$out/install.log"
python3 bench/gpu_suite.py --out "$out/suite" "$@" 2>&1 | tee "$out/suite.log"
suite=${PIPESTATUS[0]}
exit "$suite"
