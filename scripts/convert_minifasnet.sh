#!/usr/bin/env bash
# Rebuild models/minifasnet/minifasnet.onnx from the upstream MiniFASNet checkpoints
# (../shared/models/candidates/minifasnet, or MINIFASNET_DIR; Apache-2.0). The committed file is
# what `vigil models fetch` uses; this is the recipe that made it, with pinned tools from PyPI
# (PyTorch is about 3 GB). With the same pins the output is byte-identical (sha256 in
# models/models.toml and models/minifasnet/README.md).
#   scripts/convert_minifasnet.sh [OUT.onnx]   (default models/minifasnet/minifasnet.onnx)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
candidate="${MINIFASNET_DIR:-$ROOT/../shared/models/candidates/minifasnet}"
out="${1:-$ROOT/models/minifasnet/minifasnet.onnx}"
venv="$ROOT/.cache/minifasnet-venv"
PINS=(torch==2.5.1 onnx==1.17.0 onnxruntime==1.31.1 numpy==2.4.6 protobuf==7.36.2
      opencv-python-headless==5.1.0.95)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, onnx, onnxruntime, cv2" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "${PINS[@]}"
fi
exec "$venv/bin/python" scripts/convert_minifasnet.py "$candidate" "$out"
