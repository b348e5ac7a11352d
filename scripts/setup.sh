#!/usr/bin/env bash
# Create .venv and install gradindex with its pinned CPU dependencies (torch 2.13.0 CPU build,
# tensorflow-cpu, faiss-cpu, grpcio, ...). Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra=()
[ -d /opt/wheels ] && extra+=(--find-links /opt/wheels)
.venv/bin/python -m pip install -q --disable-pip-version-check "${extra[@]}" -c constraints.txt -e '.[test]'
# Python stubs for the gRPC API, generated from protos/ (never edited by hand).
.venv/bin/python -m server.protos
