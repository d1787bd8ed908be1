#!/usr/bin/env bash
# The module boundaries of ARCHITECTURE.md's invariants, checked on the sources: each outside
# system has one owning module, and the edge and the analysis code never import each other.
# Comment lines are skipped. Exits 1 and names each line that crosses a boundary.
#   scripts/check-boundaries.sh [SRC_DIR]   (default: src)
set -euo pipefail
SRC="${1:-$(cd "$(dirname "$0")/.." && pwd)/src}"
failed=0

# rule NAME PATTERN ALLOWED_PATH_REGEX: PATTERN may appear only in files whose path (relative
# to SRC) matches ALLOWED_PATH_REGEX.
rule() {
    local name="$1" pattern="$2" allowed="$3" hits
    hits="$(cd "$SRC" && grep -rnE --include='*.rs' "$pattern" . \
        | grep -vE '^[^:]+:[0-9]+:[[:space:]]*//' \
        | sed 's|^\./||' \
        | grep -vE "^(${allowed})[^:]*:" || true)"
    if [ -n "$hits" ]; then
        echo "boundary crossed: $name" >&2
        echo "$hits" | sed 's/^/  /' >&2
        failed=1
    fi
}

rule "only broker speaks AMQP (lapin)" '\blapin::|use lapin\b' 'broker\.rs'
rule "only edge speaks WebSocket (tokio_tungstenite)" '\btokio_tungstenite\b' 'edge/'
rule "only inference runs models (ort)" '\bort::|use ort\b' 'inference/'
rule "only inference reads pixels (image)" '\bimage::|use image\b' 'inference/'
rule "only telemetry serves HTTP connections (hyper), within its limits" '\bhyper(_util)?::|use hyper(_util)?\b' 'telemetry/'
rule "only wire (and the tools) speak MessagePack" '\brmp_serde\b' 'wire/|tools/'
rule "only the worker and the tools reach the analysis code (never the edge)" \
    'crate::(worker|analyzer|inference)\b' '(worker|analyzer)\.rs|inference/|tools/|lib\.rs|bin/'
rule "only the tools reach into the edge (never the analysis code)" \
    'crate::edge\b' 'edge/|tools/|config/|lib\.rs|bin/'

if [ "$failed" = 0 ]; then
    echo "module boundaries: ok"
fi
exit "$failed"
