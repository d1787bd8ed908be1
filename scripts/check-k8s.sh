#!/usr/bin/env bash
# Validate deploy/k8s against the Kubernetes JSON schemas (kubernetes-validate from PyPI, with
# the schemas it ships; nothing is fetched from elsewhere). KEDA's kinds are custom resources
# with no schema there: they are the only ones allowed to go unchecked.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.cache/kubernetes-validate"
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0
fi
files=()
for f in deploy/k8s/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || files+=("$f")
done
out="$("$VENV/bin/kubernetes-validate" --strict "${files[@]}" 2>&1)" || { echo "$out" >&2; exit 1; }
echo "$out"
unchecked="$(grep "Couldn't find schema" <<<"$out" | grep -v "api version keda.sh/" || true)"
if [ -n "$unchecked" ]; then
    echo "resources without a schema (only KEDA's may be):" >&2
    echo "$unchecked" >&2
    exit 1
fi
# Every file the kustomization lists exists, and every manifest is listed.
for f in "${files[@]}"; do
    grep -q "^  - $(basename "$f")$" deploy/k8s/kustomization.yaml \
        || { echo "deploy/k8s/kustomization.yaml does not list $(basename "$f")" >&2; exit 1; }
done
