#!/usr/bin/env bash
# The whole test suite, as the README gives it and CI runs it:
#   1. Rust: unit tests, controller/server integration tests, `keygate dev` end to end
#      (cluster end-to-end tests skip themselves unless KEYGATE_E2E=1 and KUBECONFIG are set);
#   2. Python: interoperability with libraries nobody here wrote (authlib, PyJWT), in .venv;
# Needs the Rust toolchain and python3 (with venv); installs the Python packages itself.
set -euo pipefail
cd "$(dirname "$0")/.."

# The traffic-capture test builds network namespaces and netfilter rules: it needs root, ip,
# nft, curl and python3. CI has them (.ci/run installs them and sets KEYGATE_NETNS=1, so a
# missing tool fails the run); elsewhere it runs when they are there and says so when not.
if [ -z "${KEYGATE_NETNS:-}" ]; then
  have_all=yes
  for tool in ip nft curl python3; do
    command -v "$tool" >/dev/null 2>&1 || have_all=no
  done
  if [ "$(id -u)" = 0 ] && [ "$have_all" = yes ]; then
    export KEYGATE_NETNS=1
  else
    echo "note: skipping the traffic-capture test in network namespaces (needs root, ip, nft, curl, python3)"
  fi
fi

cargo test --locked --all-targets

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/helm/requirements.txt
KEYGATE_BIN="$PWD/target/debug/keygate" .venv/bin/python -m pytest tests/python -q
# 3. The Helm chart rendered and linted with Helm's own engine, validated against the
#    Kubernetes 1.25 and current schemas.
KEYGATE_BIN="$PWD/target/debug/keygate" .venv/bin/python -m pytest tests/helm -q
