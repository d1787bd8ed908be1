#!/usr/bin/env bash
# Benchmark the model stack on CPU against onnxruntime's own Python runs of the same models.
# Extra arguments go to `vigil bench models`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. scripts/lib.sh
ensure_onnxruntime >/dev/null
photos="$(fetch_photos)"
python="$(ensure_bench_python)"
cargo build --release --locked --bins
ensure_models "$ROOT/target/release/vigil"
exec "$ROOT/target/release/vigil" bench models --images "$photos" --python "$python" "$@"
