#!/usr/bin/env bash
# The boundaries of ARCHITECTURE.md's invariants: on the sources, each outside system has one
# owning module, and the edge and the analysis code never import each other; on the crate
# graph, vigil-core (the pure logic) depends on nothing that does I/O, only vigil-inference
# depends on ort and image, and it on nothing else that does I/O.
# Comment lines are skipped. Exits 1 and names each line that crosses a boundary.
#   scripts/check-boundaries.sh [SRC_DIR]   (default: src)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="${1:-$ROOT/src}"
failed=0

# rule NAME PATTERN ALLOWED_REGEX: PATTERN may appear only on lines whose `path:line:content`
# (the path relative to SRC) ALLOWED_REGEX matches from its start, up to a colon: most rules
# name paths, one a path and the start of a line.
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
# (`ort` and `image` are vigil-inference's dependencies, not vigil's: its code cannot name
# them. These catch a unit test that would.)
rule "only vigil-inference runs models (ort)" '\bort::|use ort\b' '^$'
rule "only vigil-inference reads pixels (image)" '\bimage::|use image\b' '^$'
rule "only telemetry serves HTTP connections (hyper), within its limits" '\bhyper(_util)?::|use hyper(_util)?\b' 'telemetry/'
# (The wire itself is vigil-core's, checked below.)
rule "only vigil-core's wire (and the tools) speak MessagePack" '\brmp_serde\b' 'tools/'
rule "only the worker and the tools reach the analysis code (never the edge)" \
    'crate::(worker|analyzer|inference)\b' '(worker|analyzer)\.rs|tools/|lib\.rs|bin/'
rule "only the worker and the tools reach vigil-inference (the configuration, its settings alone)" \
    '\bvigil_inference::' \
    '(worker|analyzer)\.rs|tools/|lib\.rs|bin/|config/mod\.rs:[0-9]+:pub use vigil_inference::config:'
rule "only the tools reach into the edge (never the analysis code)" \
    'crate::edge\b' 'edge/|tools/|config/|lib\.rs|bin/'
rule "only the audit writer reads its folder (the edge reads the trail through its API)" \
    'audit::(follow|view|verify|records|notes|trail|AuditStore|adopt|prune)\b|\bevidence_dir\b' \
    'audit/|tools/|config/'

# vigil-core's own sources: no I/O, MessagePack only in its wire, and the wall clock read in
# one place (`wire::now_ms`); the decisions take the time as an argument.
CORE="$ROOT/crates/vigil-core/src"
SRC="$CORE" rule "vigil-core does no I/O" '\bstd::(fs|net|process|thread)\b|\btokio\b' '^$'
SRC="$CORE" rule "vigil-core: only wire speaks MessagePack" '\brmp_serde\b' 'wire/'
SRC="$CORE" rule "vigil-core: only wire::now_ms reads the wall clock" '\bSystemTime::now\b' 'wire/mod\.rs'

# The crate boundaries: vigil-core is the pure logic, so its dependency tree (normal and build
# dependencies, every feature) holds no I/O: no broker, async runtime, socket, HTTP stack,
# database, model runtime, image codec or telemetry exporter. `cargo tree` reads Cargo.lock.
forbidden='lapin|amq-protocol|tokio|tokio-tungstenite|tungstenite|mio|socket2|hyper|hyper-util|axum|reqwest|postgres|tokio-postgres|r2d2|r2d2_postgres|refinery|ort|ort-sys|image|opentelemetry|opentelemetry_sdk|opentelemetry-otlp|tracing-subscriber|prometheus|rustls|notify'
tree="$(cd "$ROOT" && cargo tree --locked --offline -p vigil-core -e normal,build --all-features \
    --prefix none --format '{p}' 2>&1)" || {
    echo "cargo tree failed for vigil-core: $tree" >&2
    exit 1
}
core_deps="$(echo "$tree" | awk '{print $1}' | sort -u)"
bad="$(echo "$core_deps" | grep -xE "($forbidden)" || true)"
if [ -n "$bad" ]; then
    echo "boundary crossed: vigil-core is pure logic, and its dependency tree holds:" >&2
    echo "$bad" | sed 's/^/  /' >&2
    failed=1
fi

# vigil-inference reads files and runs models, and nothing else: the same list but for the
# model runtime and the image codec, which are its reason to be.
inference_forbidden="$(echo "$forbidden" | tr '|' '\n' | grep -vxE 'ort|ort-sys|image' | paste -sd'|')"
tree="$(cd "$ROOT" && cargo tree --locked --offline -p vigil-inference -e normal,build --all-features \
    --prefix none --format '{p}' 2>&1)" || {
    echo "cargo tree failed for vigil-inference: $tree" >&2
    exit 1
}
bad="$(echo "$tree" | awk '{print $1}' | sort -u | grep -xE "($inference_forbidden)" || true)"
if [ -n "$bad" ]; then
    echo "boundary crossed: vigil-inference runs models and nothing else, and its dependency tree holds:" >&2
    echo "$bad" | sed 's/^/  /' >&2
    failed=1
fi
# Only vigil-inference depends on ort or image (vigil's tests may, as dev-dependencies).
holders="$(cd "$ROOT" && cargo metadata --format-version 1 --locked --offline --no-deps \
    | python3 -c 'import json,sys
for p in json.load(sys.stdin)["packages"]:
    for d in p["dependencies"]:
        if d["name"] in ("ort", "image") and d.get("kind") != "dev" and p["name"] != "vigil-inference":
            print(p["name"], "->", d["name"])')"
if [ -n "$holders" ]; then
    echo "boundary crossed: only vigil-inference may depend on ort and image:" >&2
    echo "$holders" | sed 's/^/  /' >&2
    failed=1
fi

# ARCHITECTURE.md's drawing of the crate graph is the one cargo metadata gives (for the
# deployment's platform, whatever the machine that checks it).
platform=x86_64-unknown-linux-gnu
drawn="$(cd "$ROOT" && cargo metadata --format-version 1 --locked --offline --filter-platform "$platform" \
    | python3 scripts/crate-graph.py)"
documented="$(sed -n '/<!-- crate-graph: begin -->/,/<!-- crate-graph: end -->/p' "$ROOT/ARCHITECTURE.md" \
    | sed '1d;$d')"
if [ "$drawn" != "$documented" ]; then
    echo "ARCHITECTURE.md's crate graph is out of date; paste the output of:" >&2
    echo "  cargo metadata --format-version 1 --locked --offline --filter-platform $platform | python3 scripts/crate-graph.py" >&2
    failed=1
fi

if [ "$failed" = 0 ]; then
    echo "module and crate boundaries: ok"
fi
exit "$failed"
