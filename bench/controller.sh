#!/usr/bin/env bash
# Controller benchmark: N ApiClients → Secrets and Ready against the in-process API server of
# the tests (benches/controller.rs), with writes per object, writes while idle and the
# operator's peak RSS (the operator runs as its own `keygate operator` process).
#   bench/controller.sh [N ...]     default: 1000 10000
#   bench/controller.sh --smoke     200 ApiClients, 50 policy stream followers; the sidecar
#                                   alone at 2,000 clients (default 10,000 and 100,000)
# KEYGATE_FOLLOWERS sets how many followers hold the policy stream (default 1000).
# Against a real cluster, run the same flow with the e2e tests instead:
#   KEYGATE_E2E=1 KUBECONFIG=... cargo test --test e2e_cluster
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("$@")
if [ "${1:-}" = "--smoke" ]; then counts=(200); export KEYGATE_FOLLOWERS="${KEYGATE_FOLLOWERS:-50}"; fi
if [ "${#counts[@]}" -eq 0 ]; then counts=(1000 10000); fi
mkdir -p bench/.run
KEYGATE_BIN="${KEYGATE:-$PWD/target/release/keygate}"
[ -x "$KEYGATE_BIN" ] || cargo build --release --quiet
KEYGATE_BIN="$KEYGATE_BIN" cargo bench --quiet --bench controller -- "${counts[@]}" | tee bench/.run/controller.md
grep -q '^| [0-9]' bench/.run/controller.md
# The sidecar alone at 10,000 and 100,000 clients (a snapshot served by the bench itself:
# more clients than the in-process API server can make the operator generate in good time).
sidecar_counts=(10000 100000)
if [ "${1:-}" = "--smoke" ]; then sidecar_counts=(2000); fi
echo | tee -a bench/.run/controller.md
KEYGATE_BIN="$KEYGATE_BIN" cargo bench --quiet --bench controller -- --sidecar-memory "${sidecar_counts[@]}" | tee -a bench/.run/controller.md
