#!/usr/bin/env bash
# Evaluate the MiniFASNet candidate liveness model on the `vigil eval` data (docs/liveness.md).
# Needs the candidate's checkpoints (../shared/models/candidates/minifasnet, or
# MINIFASNET_DIR) and `vigil eval --fetch-only` run once. Builds a pinned Python environment
# in .cache/minifasnet-venv (PyTorch from PyPI: about 3 GB).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
candidate="${MINIFASNET_DIR:-$ROOT/../shared/models/candidates/minifasnet}"
data="${VIGIL_EVAL_DATA:-$ROOT/.cache/eval}"
venv="$ROOT/.cache/minifasnet-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, onnx, cv2, onnxruntime" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet torch==2.5.1 onnx==1.17.0 onnxruntime==1.31.1 \
        opencv-python-headless==5.1.0.95 numpy
fi
exec "$venv/bin/python" scripts/minifasnet_eval.py "$candidate" "$data" "$ROOT/models" \
    "$ROOT/target/minifasnet"
