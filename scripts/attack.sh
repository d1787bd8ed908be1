#!/usr/bin/env bash
# The hostile suite against a local edge and identity worker, release build, default limits:
# `vigil attack` with 2,000 hostile sockets and the hostile JPEG set at 30 fps for 60 s. On a
# machine with two or more cores the edge (with the attack itself) and the worker get a core
# each, as on separate hosts, so that the worker's latency measures the edge rather than the
# cores they share. Extra arguments go to `vigil attack`. Exits as `vigil attack` does.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. scripts/lib.sh

ensure_rabbitmq
ort="$(ensure_onnxruntime)"
photos="$(fetch_photos)"
cargo build --release --locked --bins
bin="$ROOT/target/release"
ensure_models "$bin/vigil"

run="$ROOT/.cache/attack"
rm -rf "$run" && mkdir -p "$run"
export VIGIL_NAMESPACE="vigil-attack-$$"
export VIGIL_CLIENTS_DIR="$run/clients"
export VIGIL_EVIDENCE_DIR="$run/evidence"
port="${ATTACK_PORT:-18180}"
edge_cpu=() worker_cpu=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    edge_cpu=(taskset -c 0) worker_cpu=(taskset -c 1)
fi
RUST_LOG=warn VIGIL_EDGE_LISTEN="127.0.0.1:$port" VIGIL_METRICS_LISTEN=127.0.0.1:0 \
    "${edge_cpu[@]}" "$bin/vigil-edge" >"$run/edge.log" 2>&1 &
edge=$!
RUST_LOG=warn,ort=error VIGIL_ANALYZER=identity VIGIL_WORKER_ANALYSIS_THREADS=1 \
    VIGIL_ORT_DYLIB="$ort" VIGIL_METRICS_LISTEN=127.0.0.1:0 \
    "${worker_cpu[@]}" "$bin/vigil-worker" >"$run/worker.log" 2>&1 &
worker=$!
trap 'kill $edge $worker 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.2
done
sleep 5 # the worker loads its models
"${edge_cpu[@]}" "$bin/vigil" attack --url "ws://127.0.0.1:$port/v1/stream" \
    --token "attack-token-$$-0123456789" --create-clients \
    --image "$photos/Female_42_7.jpg" --edge-pid "$edge" --worker-pid "$worker" "$@"
