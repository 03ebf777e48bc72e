#!/usr/bin/env bash
# Token endpoint benchmark: client credentials grants per second over keep-alive (wrk, POST
# with client_secret_basic) against keygate's token server signing with ES256, EdDSA and
# RS256 (2048), and against the npm oidc-provider package (ES256 JWT access tokens); then
# p50/p99 at a paced 50% of each one's saturation rate; RUNS rounds, interleaved.
#   bench/token.sh [--smoke]
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

ensure_keygate
for tool in wrk jq curl openssl node; do
  command -v "$tool" >/dev/null || die "$tool is missing: run bench/run-all.sh (it installs it)"
done
[ -d "$BENCH_DIR/.node/node_modules/oidc-provider" ] ||
  die "oidc-provider is not installed: run bench/run-all.sh (it installs it into bench/.node)"
# keygate dev forwards its sidecar to the upstream; not used here but it must be there.
start_upstream

BODY="grant_type=client_credentials&resource=$(urlencode "$RESOURCE")"

# bench_endpoint ROUND NAME URL ID SECRET: saturation run, then a paced run at half that rate.
bench_endpoint() {
  local round="$1" name="$2" url="$3" id="$4" secret="$5" raw="token-$2-r$1"
  expect_status 200 "$url" -u "$id:$secret" -d "$BODY"
  expect_status 401 "$url" -u "$id:wrong-$secret" -d "$BODY"
  local env=(KG_METHOD=POST "KG_BODY=$BODY"
    "KG_AUTH=Basic $(printf '%s:%s' "$id" "$secret" | base64 -w0)")
  if [ "$WARMUP" = 1 ]; then
    env "${env[@]}" KG_THREADS="$THREADS" wrk "-t$THREADS" "-c$CONNS" -d2s -s "$LOAD_LUA" "$url" >/dev/null 2>&1 || true
  fi
  run_wrk "$raw-max" "$url" "${env[@]}" >/dev/null
  check_wrk "$raw-max" 2xx
  local rps; rps="$(wrk_rps "$raw-max")"
  result "token-$name" rps "$rps"
  result "token-$name" errors "$(wrk_errors "$raw-max")"
  local half=$(((rps + 1) / 2))
  run_wrk_rate "$raw-rate" "$half" "$url" "${env[@]}" >/dev/null
  check_wrk "$raw-rate" 2xx
  result "token-$name" rate_rps "$(wrk_rps "$raw-rate")"
  result "token-$name" p50_us "$(wrk_pct "$raw-rate" 50)"
  result "token-$name" p99_us "$(wrk_pct "$raw-rate" 99)"
}

# A signing key set whose current and next keys are of one algorithm (PKCS#8 PEM), in the
# format keygate dev keeps in STATE/signing-keys.json.
write_signing_keys() { # STATE openssl-genpkey-args...
  local state="$1"; shift
  mkdir -p "$state"
  local now; now="$(date +%s)"
  openssl genpkey "$@" -out "$state/current.pem" 2>/dev/null
  openssl genpkey "$@" -out "$state/next.pem" 2>/dev/null
  jq -n --rawfile cur "$state/current.pem" --rawfile next "$state/next.pem" --argjson now "$now" \
    '{keys: [{state: "current", privateKey: $cur, since: $now}, {state: "next", privateKey: $next, since: $now}]}' \
    >"$state/signing-keys.json"
  rm -f "$state/current.pem" "$state/next.pem"
}

# Every server runs at once, each on its own port, so the rounds can interleave them.
ALGS=(ES256 EdDSA RS256)
ENDPOINTS=()   # NAME URL ID SECRET PIDFILE-NAME, five words each
i=0
for alg in "${ALGS[@]}"; do
  state="$RUN/token-state-$alg"
  rm -rf "$state"
  case "$alg" in
    ES256) write_signing_keys "$state" -algorithm EC -pkeyopt ec_paramgen_curve:P-256 ;;
    EdDSA) write_signing_keys "$state" -algorithm ED25519 ;;
    RS256) write_signing_keys "$state" -algorithm RSA -pkeyopt rsa_keygen_bits:2048 ;;
  esac
  port=$((P_TOKEN + 1 + i)) sport=$((P_DEV_SIDECAR + 1 + i))
  i=$((i + 1))
  start_dev "token-dev-$alg" "$state" "$port" "$sport"
  id="$(client_field "$state" shop/reporting client_id)"
  secret="$(client_field "$state" shop/reporting client_secret)"
  token="$(get_token "$port" "$id" "$secret")"
  got="$(jwt_alg "$token")"
  [ "$got" = "$alg" ] || die "keygate signed with '$got', expected $alg"
  ENDPOINTS+=("keygate-$alg" "http://127.0.0.1:$port/oauth2/token" "$id" "$secret" "token-dev-$alg")
done

# oidc-provider: one node process (single-threaded), ES256 JWT access tokens.
OP_ID=bench-client OP_SECRET=bench-secret-0123456789abcdef
start_bg oidc-provider node "$BENCH_DIR/oidc-provider/server.mjs" "$P_OIDC_PROVIDER" "$OP_ID" "$OP_SECRET" "$RESOURCE"
wait_http "http://127.0.0.1:$P_OIDC_PROVIDER/.well-known/openid-configuration" 30 oidc-provider
token="$(curl -sf -u "$OP_ID:$OP_SECRET" -d "$BODY" "http://127.0.0.1:$P_OIDC_PROVIDER/token" | jq -r .access_token)"
got="$(jwt_alg "$token")"
[ "$got" = ES256 ] || die "oidc-provider signed with '$got', expected ES256"
ENDPOINTS+=(oidc-provider "http://127.0.0.1:$P_OIDC_PROVIDER/token" "$OP_ID" "$OP_SECRET" oidc-provider)

# Interleaved rounds: each server once per round (A B C D A B C D ...).
for round in $(seq 1 "$RUNS"); do
  log "round $round of $RUNS"
  for ((e = 0; e < ${#ENDPOINTS[@]}; e += 5)); do
    bench_endpoint "$round" "${ENDPOINTS[@]:e:4}"
  done
done
for ((e = 0; e < ${#ENDPOINTS[@]}; e += 5)); do
  result "token-${ENDPOINTS[e]}" rss_kib "$(proc_kib VmHWM "$(cat "$RUN/${ENDPOINTS[e + 4]}.pid")")"
  stop_bg "${ENDPOINTS[e + 4]}"
done
log "token benchmark done"
