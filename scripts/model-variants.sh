#!/usr/bin/env bash
# Measure model variants against the fp32 models (initializer-inputs removed): INT8 quantisation of
# SFace and COCO-SSD, and a dynamic batch dimension for SFace, fr_liveness, MiniFASNet and YuNet.
# Runs scripts/model_variants.py in a pinned venv; extra arguments go to it (--rounds, --runs, --json).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. scripts/lib.sh
photos="$(fetch_photos)"
models="$ROOT/models"
for f in face_detection_yunet_2023mar.onnx face_recognition_sface_2021dec.onnx fr_liveness.onnx \
    cocossd.onnx minifasnet/minifasnet.onnx; do
    if [ ! -f "$models/$f" ]; then
        echo "missing $models/$f: run scripts/test.sh or \`vigil models fetch\` first" >&2
        exit 1
    fi
done
venv="${VIGIL_CACHE:-$ROOT/.cache}/variants-venv"
pins=(onnxruntime==1.31.1 onnx==1.23.2 numpy==2.4.6 pillow==13.0.0)
# Reused only while it holds exactly the pinned versions.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" - "${pins[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
PY
then
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet "${pins[@]}" >&2
fi
exec "$venv/bin/python" scripts/model_variants.py "$photos" "$models" "$@"
