#!/usr/bin/env bash
# The whole test suite, as the README gives it and CI runs it:
#   1. Rust: unit tests, controller/server integration tests, `keygate dev` end to end
#      (cluster end-to-end tests skip themselves unless KEYGATE_E2E=1 and KUBECONFIG are set);
#   2. Python: interoperability with libraries nobody here wrote (authlib, PyJWT), in .venv;
# Needs the Rust toolchain and python3 (with venv); installs the Python packages itself.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --locked --all-targets

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/helm/requirements.txt
KEYGATE_BIN="$PWD/target/debug/keygate" .venv/bin/python -m pytest tests/python -q
# 3. The Helm chart rendered and linted with Helm's own engine, validated against the
#    Kubernetes 1.25 and current schemas.
.venv/bin/python -m pytest tests/helm -q
