#!/usr/bin/env bash
# Sidecar benchmark: the same tiny upstream (nginx, fixed 1 KiB body) reached
#   direct     directly
#   nginx      through nginx as a plain reverse proxy (the floor)
#   openidc    through Apache httpd + mod_auth_openidc (AuthType oauth20, JWKS verification)
#   cached     through the keygate sidecar, one ES256 token (verification cache hit)
#   uncached   through the keygate sidecar, a different ES256 token per request
#   refused    through the keygate sidecar, a token with a bad signature (401)
# For each: req/s at saturation (wrk -t2 -c64 -d10s), p50/p99 at a paced 1,000 req/s, the
# proxy's CPU per 1,000 req/s and peak RSS, and the latency the proxy adds (paired requests,
# bench/httpload.py); all of it RUNS times, interleaved. Then instructions per request of the
# sidecar (cached) and of the nginx proxy under valgrind --tool=callgrind. Needs what bench/run-all.sh installs.
#   bench/sidecar.sh [--smoke]
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

ensure_keygate
for tool in wrk nginx apache2 jq curl; do
  command -v "$tool" >/dev/null || die "$tool is missing: run bench/run-all.sh (it installs it)"
done

start_upstream

# --- keygate: token server (keygate dev) and a standalone sidecar -----------------------
STATE="$RUN/sidecar-state"
rm -rf "$STATE"
start_dev keygate-dev "$STATE" "$P_TOKEN" "$P_DEV_SIDECAR"
ISSUER="http://127.0.0.1:$P_TOKEN"
CLIENT_ID="$(client_field "$STATE" shop/reporting client_id)"
CLIENT_SECRET="$(client_field "$STATE" shop/reporting client_secret)"
TOKEN="$(get_token "$P_TOKEN" "$CLIENT_ID" "$CLIENT_SECRET")"
[ -n "$TOKEN" ] && [ "$TOKEN" != null ] || die "no token from the token server"
# The same token with its signature's first character changed: parses, fails verification.
sig="${TOKEN##*.}"
if [ "${sig:0:1}" = A ]; then first=B; else first=A; fi
BAD_TOKEN="${TOKEN%.*}.${first}${sig:1}"

# The policy file keygate dev would hand its sidecar for shop/orders (docs/policy-file.md):
# the quickstart ScopePolicy's spec, keygate's issuer and JWKS, and the reporting client's grant.
curl -sf "$ISSUER/.well-known/jwks.json" >"$RUN/jwks.json"
jq -n --arg issuer "$ISSUER" --arg resource "$RESOURCE" --arg client "$CLIENT_ID" \
  --slurpfile jwks "$RUN/jwks.json" --slurpfile spec "$BENCH_DIR/policy-spec.json" '{
    apiVersion: "keygate.dev/policy/v1",
    policy: "shop/orders",
    resource: $resource,
    spec: $spec[0],
    keygate: {issuer: $issuer, jwks: $jwks[0]},
    clients: [{clientId: $client, name: "shop/reporting", scopes: ["orders.read"]}],
    revocations: {tokens: {}, clients: {}}
  }' >"$RUN/policy.json"
start_bg keygate-sidecar "$KEYGATE_SIDECAR" --policy "$RUN/policy.json" \
  --listen "127.0.0.1:$P_SIDECAR" --upstream "127.0.0.1:$P_UPSTREAM" \
  --admin "127.0.0.1:$P_SIDECAR_ADMIN"
wait_http "http://127.0.0.1:$P_SIDECAR_ADMIN/readyz" 30 keygate-sidecar
SIDECAR_PID="$(cat "$RUN/keygate-sidecar.pid")"

# --- nginx as a plain reverse proxy ------------------------------------------------------
# It also serves keygate's JWKS over https on $P_JWKS_TLS (self-signed) for mod_auth_openidc,
# which accepts only an https JWKS URI; it fetches the JWKS once and caches it.
NGX="$RUN/nginx-proxy"
mkdir -p "$NGX"
[ -f "$NGX/tls.key" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj /CN=127.0.0.1 -days 30 -keyout "$NGX/tls.key" -out "$NGX/tls.crt" 2>/dev/null
# A reverse proxy to the upstream with a keep-alive pool, listening on 127.0.0.1:PORT.
proxy_server() {
  echo "  upstream app { server 127.0.0.1:$P_UPSTREAM; keepalive 128; }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }"
}
nginx_conf "$NGX" "worker_processes auto;" "$(proxy_server "$P_NGINX_PROXY")
  server {
    listen 127.0.0.1:$P_JWKS_TLS ssl;
    ssl_certificate $NGX/tls.crt;
    ssl_certificate_key $NGX/tls.key;
    location = /.well-known/jwks.json { proxy_pass http://127.0.0.1:$P_TOKEN; }
  }"
start_bg nginx-proxy nginx -c "$NGX/nginx.conf" -p "$NGX"
wait_http "http://127.0.0.1:$P_NGINX_PROXY/" 30 nginx-proxy
NGINX_PID="$(cat "$RUN/nginx-proxy.pid")"

# --- Apache httpd + mod_auth_openidc in resource-server mode ------------------------------
APA="$RUN/apache"
mkdir -p "$APA"
chmod 755 "$APA"
MODS=/usr/lib/apache2/modules
cat >"$APA/httpd.conf" <<EOF
ServerRoot /etc/apache2
ServerName 127.0.0.1
DefaultRuntimeDir $APA
PidFile $APA/httpd.pid
Listen 127.0.0.1:$P_APACHE
User www-data
Group www-data
ErrorLog $APA/error.log
LogLevel warn
LoadModule mpm_event_module $MODS/mod_mpm_event.so
LoadModule authn_core_module $MODS/mod_authn_core.so
LoadModule authz_core_module $MODS/mod_authz_core.so
LoadModule authz_user_module $MODS/mod_authz_user.so
LoadModule proxy_module $MODS/mod_proxy.so
LoadModule proxy_http_module $MODS/mod_proxy_http.so
LoadModule auth_openidc_module $MODS/mod_auth_openidc.so
# Fixed worker pool (no process churn during a run), unlimited keep-alive like nginx above.
StartServers 2
ServerLimit 2
ThreadsPerChild 64
MaxRequestWorkers 128
MinSpareThreads 1
MaxSpareThreads 128
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 60
# Resource-server mode: verify the bearer JWT locally against keygate's JWKS.
OIDCCryptoPassphrase keygate-bench-not-a-secret
# (https only: nginx above relays keygate's JWKS; self-signed, hence no server validation)
OIDCOAuthVerifyJwksUri https://127.0.0.1:$P_JWKS_TLS/.well-known/jwks.json
OIDCOAuthSSLValidateServer Off
OIDCOAuthRemoteUserClaim sub
<Location />
  AuthType oauth20
  Require valid-user
</Location>
ProxyPass / http://127.0.0.1:$P_UPSTREAM/ keepalive=On
EOF
start_bg apache apache2 -f "$APA/httpd.conf" -DFOREGROUND
wait_http "http://127.0.0.1:$P_APACHE/" 30 apache
APACHE_PID="$(cat "$RUN/apache.pid")"

# --- every scenario answers as expected -------------------------------------------------
URL_PATH=/orders/42
expect_status 200 "http://127.0.0.1:$P_UPSTREAM$URL_PATH"
expect_status 200 "http://127.0.0.1:$P_NGINX_PROXY$URL_PATH"
expect_status 401 "http://127.0.0.1:$P_APACHE$URL_PATH"
expect_status 200 "http://127.0.0.1:$P_APACHE$URL_PATH" -H "Authorization: Bearer $TOKEN"
expect_status 401 "http://127.0.0.1:$P_APACHE$URL_PATH" -H "Authorization: Bearer $BAD_TOKEN"
expect_status 401 "http://127.0.0.1:$P_SIDECAR$URL_PATH"
expect_status 200 "http://127.0.0.1:$P_SIDECAR$URL_PATH" -H "Authorization: Bearer $TOKEN"
expect_status 401 "http://127.0.0.1:$P_SIDECAR$URL_PATH" -H "Authorization: Bearer $BAD_TOKEN"
expect_status 403 "http://127.0.0.1:$P_SIDECAR/nothing-here" -H "Authorization: Bearer $TOKEN"
log "status codes as expected (direct/nginx 200; openidc and keygate 200 with the token, 401 without or with a bad one)"

# --- pre-fetched tokens for the uncached scenario --------------------------------------
TOKENS="$RUN/tokens.txt"
fetch_tokens() {
  rm -f "$RUN"/tokens.part*
  local per_thread=$(((UNCACHED_TOKENS + 1) / 2))
  # wrk saves each access_token (load.lua KG_SAVE_*); its threads stop at their count, but
  # wrk itself waits out -d, so it is interrupted (SIGINT: prints its summary) once done.
  KG_METHOD=POST KG_BODY="grant_type=client_credentials&resource=$(urlencode "$RESOURCE")" \
    KG_AUTH="Basic $(printf '%s:%s' "$CLIENT_ID" "$CLIENT_SECRET" | base64 -w0)" \
    KG_SAVE_PREFIX="$RUN/tokens.part" KG_SAVE_COUNT="$per_thread" KG_THREADS=2 \
    wrk -t2 -c8 -d120s -s "$LOAD_LUA" "http://127.0.0.1:$P_TOKEN/oauth2/token" \
    >"$RUN/raw/fetch-tokens.txt" 2>&1 &
  local wrk_pid=$! i
  for i in $(seq 1 1200); do
    sleep 0.1
    kill -0 "$wrk_pid" 2>/dev/null || break
    [ "$(cat "$RUN"/tokens.part* 2>/dev/null | wc -l)" -ge $((per_thread * 2)) ] && break
  done
  kill -INT "$wrk_pid" 2>/dev/null || true
  wait "$wrk_pid" || true
  cat "$RUN"/tokens.part* | sort -u >"$TOKENS"
  local n; n="$(wc -l <"$TOKENS")"
  [ "$n" -ge "$UNCACHED_TOKENS" ] || die "only $n distinct tokens fetched, wanted $UNCACHED_TOKENS"
  log "fetched $n distinct tokens for the uncached scenario"
}
fetch_tokens

cache_hits() {
  curl -sf "http://127.0.0.1:$P_SIDECAR_ADMIN/metrics" |
    awk '/^keygate_sidecar_verify_cache_hits/ {s += $NF} END {printf "%d\n", s}'
}

# measure ROUND SCENARIO PORT EXPECT PIDS ENV...: saturation, paced run with CPU, peak RSS,
# and (proxies only) the paired added latency against the direct path.
# PIDS: a space-separated list of the proxy's process ids ("" for the direct scenario).
measure() {
  local round="$1" name="$2" port="$3" expect="$4" pids="$5"; shift 5
  local url="http://127.0.0.1:$port$URL_PATH" raw="sidecar-$name-r$round"
  if [ "$WARMUP" = 1 ]; then
    env "$@" KG_THREADS="$THREADS" wrk "-t$THREADS" "-c$CONNS" -d2s -s "$LOAD_LUA" "$url" >/dev/null 2>&1 || true
  fi
  local hits0; hits0="$(cache_hits)"
  run_wrk "$raw-max" "$url" "$@" >/dev/null
  check_wrk "$raw-max" "$expect"
  local hits1; hits1="$(cache_hits)"
  result "$name" rps "$(wrk_rps "$raw-max")"
  result "$name" errors "$(wrk_errors "$raw-max")"
  # shellcheck disable=SC2086
  local t0 c0 t1 c1
  t0="$(date +%s.%N)"; c0="$(proc_cpu_ticks $pids)"
  run_wrk_rate "$raw-rate" "$SIDECAR_RATE" "$url" "$@" >/dev/null
  # shellcheck disable=SC2086
  t1="$(date +%s.%N)"; c1="$(proc_cpu_ticks $pids)"
  check_wrk "$raw-rate" "$expect"
  local rate; rate="$(wrk_rps "$raw-rate")"
  result "$name" rate_rps "$rate"
  result "$name" p50_us "$(wrk_pct "$raw-rate" 50)"
  result "$name" p99_us "$(wrk_pct "$raw-rate" 99)"
  if [ -n "$pids" ]; then
    # cores used per 1,000 req/s = (cpu seconds / wall seconds) / (req/s / 1000)
    result "$name" cpu_per_krps "$(awk -v c="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" \
      -v t0="$t0" -v t1="$t1" -v r="$rate" 'BEGIN {printf "%.4f\n", (c / hz) / (t1 - t0) / (r / 1000)}')"
    # shellcheck disable=SC2086
    result "$name" rss_kib "$(proc_kib VmHWM $pids)"
  fi
  # Added latency: the same upstream request timed direct and through the proxy, in pairs
  # (proxies that forward only: a refused request never reaches the upstream).
  if [ -n "$pids" ] && [ "$expect" = 2xx ]; then
    local pair_args=()
    case "$name" in
      uncached) pair_args=(--tokens "$TOKENS") ;;
      openidc | cached) pair_args=(--header "Authorization: Bearer $TOKEN") ;;
    esac
    run_paired "$raw-paired" "http://127.0.0.1:$P_UPSTREAM$URL_PATH" "$url" 200 "${pair_args[@]}"
    result "$name" added_p50_us "$(paired_pct "$raw-paired" 50)"
    result "$name" added_p99_us "$(paired_pct "$raw-paired" 99)"
  fi
  if [ "$port" = "$P_SIDECAR" ]; then
    local total; total="$(wrk_requests "$raw-max")"
    result "$name" cache_hit_pct "$(awk -v h="$((hits1 - hits0))" -v n="$total" 'BEGIN {printf "%.1f\n", 100 * h / n}')"
  fi
}

# Interleaved rounds: every scenario once per round, so slow drift (other load, thermal,
# caches) hits them all alike instead of one whole block of runs.
for round in $(seq 1 "$RUNS"); do
  log "round $round of $RUNS"
  measure "$round" direct "$P_UPSTREAM" 2xx ""
  measure "$round" nginx "$P_NGINX_PROXY" 2xx "$(proc_tree "$NGINX_PID" | xargs)"
  measure "$round" openidc "$P_APACHE" 2xx "$(proc_tree "$APACHE_PID" | xargs)" KG_AUTH="Bearer $TOKEN"
  measure "$round" cached "$P_SIDECAR" 2xx "$SIDECAR_PID" KG_AUTH="Bearer $TOKEN"
  measure "$round" uncached "$P_SIDECAR" 2xx "$SIDECAR_PID" KG_TOKENS_FILE="$TOKENS"
  measure "$round" refused "$P_SIDECAR" non2xx "$SIDECAR_PID" KG_AUTH="Bearer $BAD_TOKEN"
done
result sidecar tokens "$(wc -l <"$TOKENS")"
result sidecar rss_final_kib "$(proc_kib VmHWM "$SIDECAR_PID")"

# --- instructions per request under callgrind (cached token; nginx proxy as the peer) -----
# Instruction counts do not depend on other load or on the clock, unlike req/s and CPU time.
if command -v valgrind >/dev/null; then
  instructions_per_request cached "http://127.0.0.1:$P_CG_SIDECAR$URL_PATH" \
    "http://127.0.0.1:$P_CG_SIDECAR_ADMIN/readyz" "Authorization: Bearer $TOKEN" \
    "$KEYGATE_SIDECAR" --policy "$RUN/policy.json" --listen "127.0.0.1:$P_CG_SIDECAR" \
    --upstream "127.0.0.1:$P_UPSTREAM" --admin "127.0.0.1:$P_CG_SIDECAR_ADMIN"
  CGN="$RUN/nginx-callgrind"
  # The proxy config above in one process (no master, one worker), so callgrind sees it all.
  nginx_conf "$CGN" "master_process off;
worker_processes 1;" "$(proxy_server "$P_CG_NGINX")"
  instructions_per_request nginx "http://127.0.0.1:$P_CG_NGINX$URL_PATH" \
    "http://127.0.0.1:$P_CG_NGINX/" "Authorization: Bearer $TOKEN" \
    nginx -c "$CGN/nginx.conf" -p "$CGN"
else
  log "valgrind is missing: no instructions per request (run bench/run-all.sh: it installs it)"
fi
log "sidecar benchmark done"
