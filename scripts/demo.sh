#!/usr/bin/env bash
# The main job, end to end: make sure RabbitMQ is up, install ONNX Runtime and the models,
# build, start an edge, a worker and the audit writer, enrol a demo client from a reference
# photo, then stream real photos over WebSocket (the enrolled person, then someone else, then the
# enrolled person again) and print every verdict and every action the policy takes. Settings:
# DEMO_FPS (4), DEMO_PORT (18080; the admin API and console on the next port), VIGIL_AMQP_URL,
# DEMO_KEEP=1 (keep everything running afterwards, for the candidate page and the console).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. scripts/lib.sh

ensure_rabbitmq
ensure_onnxruntime >/dev/null
photos="$(fetch_photos)"
cargo build --release --locked --bins
bin="$ROOT/target/release"
# The candidate page and the operator console (npm); the demo runs without them if npm is missing.
build_web || echo "no candidate page or console: npm is missing" >&2
ensure_models "$bin/vigil"

run="$ROOT/.cache/demo"
rm -rf "$run" && mkdir -p "$run"
port="${DEMO_PORT:-18080}"
export VIGIL_NAMESPACE=vigil-demo
export VIGIL_CLIENTS_DIR="$run/clients"
export VIGIL_EDGE_LISTEN="127.0.0.1:$port"
export VIGIL_EDGE_ID=demo-edge
export VIGIL_EDGE_MAX_FRAME_BYTES=2097152
export VIGIL_EVIDENCE_DIR="$run/evidence"
export VIGIL_WEB_DIR="$ROOT/web/dist"
admin_port=$((port + 1))
export VIGIL_ADMIN_LISTEN="127.0.0.1:$admin_port"
export VIGIL_ADMIN_TOKEN=demo-admin-token-0001
export RUST_LOG="${RUST_LOG:-info,ort=error}"

# A fresh start: the evidence folder was wiped above, so the namespace's queues go too (the
# audit checkpoints would otherwise remember the last run's log).
"$bin/vigil" topology delete --yes >/dev/null
"$bin/vigil" clients add demo-client --token demo-token-0001 --name "Demo client" >/dev/null
"$bin/vigil" clients enroll demo-client --reference "$photos/Male_41_2_4_1.jpg"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

VIGIL_METRICS_LISTEN=127.0.0.1:0 "$bin/vigil-worker" 2>"$run/worker.log" &
pids+=($!)
VIGIL_METRICS_LISTEN=127.0.0.1:0 "$bin/vigil-edge" 2>"$run/edge.log" &
pids+=($!)
VIGIL_METRICS_LISTEN=127.0.0.1:0 "$bin/vigil-audit" 2>"$run/audit.log" &
pids+=($!)
for _ in $(seq 1 100); do
    port_open 127.0.0.1 "$port" && break
    sleep 0.1
done
echo "edge on ws://127.0.0.1:$port/v1/stream, worker running; logs in $run/" >&2
echo "candidate page:   http://127.0.0.1:$port/?client=demo-client   (token demo-token-0001)" >&2
echo "operator console: http://127.0.0.1:$admin_port/console/   (admin token $VIGIL_ADMIN_TOKEN)" >&2

# The enrolled man at his webcam, then a stranger takes his place (the policy locks the screen
# after 5 of 8 frames), then he is back (5 good frames allow him again).
him="$photos/Male_41_6_1.jpg"
stranger="$photos/Female_43_6.jpg"
frames=()
for f in "$him" "$him" "$stranger" "$stranger" "$stranger" "$stranger" "$stranger" "$stranger" \
         "$him" "$him" "$him" "$him" "$him"; do
    frames+=(--images "$f")
done
"$bin/vigil" stream --url "ws://127.0.0.1:$port/v1/stream" \
    --client-id demo-client --token demo-token-0001 --fps "${DEMO_FPS:-4}" \
    "${frames[@]}" --frames $(( ${#frames[@]} / 2 ))
sleep 1
echo
echo "audit trail ($VIGIL_EVIDENCE_DIR):"
"$bin/vigil" audit list
"$bin/vigil" audit verify
if [ -n "${DEMO_KEEP:-}" ]; then
    echo
    echo "still running (Ctrl-C stops it):"
    echo "  candidate page:   http://127.0.0.1:$port/?client=demo-client   (token demo-token-0001)"
    echo "  operator console: http://127.0.0.1:$admin_port/console/   (admin token $VIGIL_ADMIN_TOKEN)"
    wait
else
    echo
    echo "DEMO_KEEP=1 ./scripts/demo.sh keeps it running: candidate page http://127.0.0.1:$port/, console http://127.0.0.1:$admin_port/console/"
fi
