#!/usr/bin/env bash
# Runs the GPU benchmark under a time limit, on a machine where faiss-gpu finds a GPU.
# Usage: bench/gpu_check.sh [SECONDS]   (default 480); writes bench/results/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${1:-480}"
timeout "$limit" .venv/bin/python -m bench.gpu_check --out bench/results/gpu.json
