# Shared helpers for bench/*.sh (sourced, not run). Everything listens on 127.0.0.1 only.
# shellcheck shell=bash

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
RUN="${KG_BENCH_RUN:-$BENCH_DIR/.run}"
KEYGATE="${KEYGATE:-$ROOT/target/release/keygate}"
# The executable the webhook injects (the sidecar alone; the same code as `keygate sidecar`).
KEYGATE_SIDECAR="${KEYGATE_SIDECAR:-$ROOT/target/release/keygate-sidecar}"
LOAD_LUA="$BENCH_DIR/wrk/load.lua"
RESOURCE="https://orders.shop.svc"

# Scenario lengths. --smoke: a few seconds and few connections, only to prove each scenario
# works (status codes checked, wrk saw requests); the numbers mean nothing.
SMOKE="${KG_BENCH_SMOKE:-0}"
for arg in "$@"; do
  [ "$arg" = "--smoke" ] && SMOKE=1
done
export KG_BENCH_SMOKE="$SMOKE"
# keygate's processes write no audit event for allowed requests and issued tokens, as the
# peers write no access log (nginx `access_log off`); refusals are still audited. An event
# per allowed request costs the sidecar about a fifth of its instructions (bench/NOTES.md).
export KEYGATE_AUDIT_ALLOWED_SAMPLE=0
if [ "$SMOKE" = 1 ]; then
  THREADS=1 CONNS=4 DURATION=2s RATE_CONNS=4 RATE_DURATION=2s SIDECAR_RATE=200
  UNCACHED_TOKENS=2000 WARMUP=0 RUNS=1 PAIRS=200 CG_REQUESTS=200
else
  THREADS=2 CONNS=64 DURATION=10s RATE_CONNS=16 RATE_DURATION=10s SIDECAR_RATE=1000
  UNCACHED_TOKENS=20000 WARMUP=1 RUNS=3 PAIRS=5000 CG_REQUESTS=5000
fi
# RUNS: every scenario runs RUNS times, interleaved (round 1 runs every scenario once, then
# round 2, ...), so drift hits every scenario alike; the report gives the median and min-max.
RUNS="${KG_BENCH_RUNS:-$RUNS}"
# PAIRS: paired direct/proxied requests per round for the added latency (bench/httpload.py).
# CG_REQUESTS: requests counted under callgrind for the instructions per request.

# Ports (all on 127.0.0.1), from KG_BENCH_PORT_BASE (default 18000; set it if another
# program holds one of these).
PB="${KG_BENCH_PORT_BASE:-18000}"
P_UPSTREAM=$((PB + 80))         # nginx: the tiny upstream (fixed 1 KiB body)
P_NGINX_PROXY=$((PB + 81))      # nginx: plain reverse proxy to the upstream
P_APACHE=$((PB + 82))           # Apache httpd + mod_auth_openidc (oauth20) → upstream
P_TOKEN=$((PB + 100))           # keygate dev: token server (token.sh: +1, +2, +3 as well)
P_DEV_SIDECAR=$((PB + 110))     # keygate dev: its own sidecar (not benchmarked; +1, +2, +3)
P_SIDECAR=$((PB + 120))         # keygate-sidecar (standalone process, as injected) → upstream
P_SIDECAR_ADMIN=$((PB + 121))
P_OIDC_PROVIDER=$((PB + 130))   # node oidc-provider
P_JWKS_TLS=$((PB + 143))        # nginx: keygate's JWKS over https (for mod_auth_openidc)
P_CG_SIDECAR=$((PB + 150))      # keygate-sidecar under callgrind
P_CG_SIDECAR_ADMIN=$((PB + 151))
P_CG_NGINX=$((PB + 152))        # nginx (one process, no master) under callgrind

mkdir -p "$RUN/raw" "$RUN/logs"
RESULTS="$RUN/results.tsv"   # scenario<TAB>metric<TAB>value, appended by every script

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
die() { log "FAILED: $*"; exit 1; }
# One line per measurement; a metric measured in each of the RUNS rounds has RUNS lines.
result() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }

# Background processes this run started, stopped on exit (by pid, never by name).
STARTED_PIDS=()
start_bg() { # NAME CMD...: start CMD in the background, log to $RUN/logs/NAME.log
  local name="$1"; shift
  "$@" >"$RUN/logs/$name.log" 2>&1 &
  local pid=$!
  STARTED_PIDS+=("$pid")
  echo "$pid" >"$RUN/$name.pid"
  log "started $name (pid $pid)"
}
stop_bg() { # NAME [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 5)
  local pidfile="$RUN/$1.pid" limit="${2:-5}"
  [ -f "$pidfile" ] || return 0
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((limit * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}
stop_all() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
}
trap stop_all EXIT

wait_http() { # URL [seconds] [NAME]: until anything answers over HTTP (and, with NAME, the
  # process start_bg started as NAME is still running: not another program on that port)
  local url="$1" limit="${2:-30}" name="${3:-}" i
  for i in $(seq 1 $((limit * 10))); do
    if [ -n "$name" ] && ! kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
      die "$name exited (see $RUN/logs/$name.log)"
    fi
    curl -s -o /dev/null --max-time 1 "$url" && { [ -z "$name" ] || kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; } && return 0
    sleep 0.1
  done
  die "nothing answers at $url after ${limit}s"
}

expect_status() { # WANT URL [curl args...]: fail unless the status is WANT
  local want="$1" url="$2"; shift 2
  local got
  got="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" "$url")"
  [ "$got" = "$want" ] || die "$url answered $got, expected $want"
}

# --- processes -----------------------------------------------------------------------

proc_cpu_ticks() { # PID...: utime+stime (clock ticks) summed over the pids
  local total=0 pid
  for pid in "$@"; do
    local stat
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
    stat="${stat##*) }" # fields from 3 on (the command may contain spaces)
    # shellcheck disable=SC2086
    set -- $stat
    total=$((total + ${12} + ${13}))
  done
  echo "$total"
}
proc_tree() { # PID: the pid and its direct children (nginx/apache workers)
  echo "$1"
  pgrep -P "$1" 2>/dev/null || true
}
proc_kib() { # FIELD PID...: sum of a /proc/PID/status field (VmHWM, VmRSS) in KiB
  local field="$1"; shift
  local total=0 pid v
  for pid in "$@"; do
    v="$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null)"
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# --- wrk -----------------------------------------------------------------------------

show_env() { # ENV=VALUE...: printable, without credentials
  local a
  for a in "$@"; do
    case "$a" in
      KG_AUTH=Bearer*) printf '%s ' 'KG_AUTH="Bearer $TOKEN"' ;;
      KG_AUTH=Basic*) printf '%s ' 'KG_AUTH="Basic $(base64 CLIENT_ID:SECRET)"' ;;
      KG_BODY=*) printf "KG_BODY='%s' " "${a#KG_BODY=}" ;;
      KG_TOKENS_FILE=*) printf 'KG_TOKENS_FILE=bench/.run/tokens.txt ' ;;
      *) printf '%s ' "$a" ;;
    esac
  done
}

# run_wrk NAME URL [ENV=VALUE...]: saturation run (wrk -t$THREADS -c$CONNS -d$DURATION).
# Writes the raw output to $RUN/raw/NAME.txt and prints it.
run_wrk() {
  local name="$1" url="$2"; shift 2
  local cmd=(wrk "-t$THREADS" "-c$CONNS" "-d$DURATION" --latency -s "$LOAD_LUA" "$url")
  echo "$(show_env "$@")KG_THREADS=$THREADS ${cmd[*]/$LOAD_LUA/bench/wrk/load.lua}" >"$RUN/raw/$name.cmd"
  env "$@" KG_THREADS="$THREADS" "${cmd[@]}" >"$RUN/raw/$name.txt" 2>&1 || die "wrk $name"
  cat "$RUN/raw/$name.txt"
}
# run_wrk_rate NAME RATE URL [ENV=VALUE...]: paced run at RATE req/s (-c$RATE_CONNS).
run_wrk_rate() {
  local name="$1" rate="$2" url="$3"; shift 3
  local cmd=(wrk "-t$THREADS" "-c$RATE_CONNS" "-d$RATE_DURATION" --latency -s "$LOAD_LUA" "$url")
  echo "$(show_env "$@")KG_RATE=$rate KG_THREADS=$THREADS ${cmd[*]/$LOAD_LUA/bench/wrk/load.lua}" >"$RUN/raw/$name.cmd"
  env "$@" KG_RATE="$rate" KG_THREADS="$THREADS" "${cmd[@]}" >"$RUN/raw/$name.txt" 2>&1 ||
    die "wrk $name"
  cat "$RUN/raw/$name.txt"
}

wrk_rps() { awk '/^Requests\/sec:/ {print int($2 + 0.5)}' "$RUN/raw/$1.txt"; }
wrk_requests() { awk '/requests in/ {print $1}' "$RUN/raw/$1.txt"; }
wrk_non2xx() { awk '/Non-2xx or 3xx responses:/ {print $5}' "$RUN/raw/$1.txt" | grep . || echo 0; }
wrk_errors() { # socket errors (connect/read/write/timeout) summed
  awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$RUN/raw/$1.txt" | grep . || echo 0
}
# wrk_pct NAME 50|99: that latency percentile in microseconds
wrk_pct() {
  awk -v p="$2%" '$1 == p {
      v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
      if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000; else m = 60000000
      printf "%d\n", v * m + 0.5
    }' "$RUN/raw/$1.txt"
}

# check_wrk NAME EXPECT: wrk saw requests, and all were 2xx (EXPECT=2xx) or none (EXPECT=non2xx).
check_wrk() {
  local name="$1" expect="$2" total non2xx
  total="$(wrk_requests "$name")"; non2xx="$(wrk_non2xx "$name")"
  [ "${total:-0}" -gt 0 ] || die "$name: wrk reports no requests"
  case "$expect" in
    2xx) [ "$non2xx" = 0 ] || die "$name: $non2xx of $total responses were not 2xx" ;;
    non2xx) [ "$non2xx" = "$total" ] || die "$name: only $non2xx of $total responses were refused" ;;
  esac
  log "$name: $total requests, $(wrk_rps "$name") req/s, non-2xx $non2xx"
}

# --- paired latency (bench/httpload.py paired) ---------------------------------------

# run_paired NAME DIRECT_URL PROXY_URL EXPECT [httpload args...]: $PAIRS pairs, one direct
# request then one proxied (alternating order), each timed; raw lines in $RUN/raw/NAME.pairs.
run_paired() {
  local name="$1" direct="$2" proxy="$3" expect="$4"; shift 4
  python3 "$BENCH_DIR/httpload.py" paired "$direct" "$proxy" "$PAIRS" "$expect" "$@" \
    >"$RUN/raw/$name.pairs" 2>"$RUN/logs/$name.log" || die "$name: $(tail -1 "$RUN/logs/$name.log")"
  [ "$(wc -l <"$RUN/raw/$name.pairs")" -eq "$PAIRS" ] || die "$name: not $PAIRS pairs"
}
# paired_pct NAME P: the P-th percentile (nearest rank) of the per-pair differences
# proxied - direct, in microseconds.
paired_pct() {
  awk '{printf "%.1f\n", $2 - $1}' "$RUN/raw/$1.pairs" | sort -g |
    awk -v p="$2" '{v[NR] = $1} END {r = int((p / 100) * NR + 0.999999); if (r < 1) r = 1; print v[r]}'
}

# --- instructions (valgrind --tool=callgrind) ----------------------------------------

# callgrind_ir NAME REQUESTS URL READY_URL HEADER CMD...: the instructions (Ir) CMD executed
# under callgrind from its start to its exit, having been sent REQUESTS requests (one
# keep-alive connection, each answered 200) once READY_URL answered. Prints the total.
callgrind_ir() {
  local name="$1" n="$2" url="$3" ready="$4" header="$5"; shift 5
  local out="$RUN/callgrind/$name.out"
  mkdir -p "$RUN/callgrind"
  rm -f "$out"
  start_bg "callgrind-$name" valgrind --tool=callgrind --callgrind-out-file="$out" "$@"
  wait_http "$ready" 120 "callgrind-$name"
  if [ "$n" -gt 0 ]; then
    python3 "$BENCH_DIR/httpload.py" count "$url" "$n" 200 --header "$header" \
      >"$RUN/logs/callgrind-$name-load.log" 2>&1 || die "callgrind $name: requests failed"
  fi
  stop_bg "callgrind-$name" 60
  local ir; ir="$(awk '$1 == "totals:" || $1 == "summary:" {print $2; exit}' "$out" 2>/dev/null)"
  [ -n "$ir" ] || die "callgrind $name: no totals in $out (see $RUN/logs/callgrind-$name.log)"
  echo "$ir"
}
# instructions_per_request SCENARIO URL READY_URL HEADER CMD...: (Ir of a run serving
# $CG_REQUESTS requests - Ir of a run serving none) / $CG_REQUESTS, recorded as instr_per_req.
instructions_per_request() {
  local scenario="$1" url="$2" ready="$3" header="$4"; shift 4
  local idle loaded
  idle="$(callgrind_ir "$scenario-idle" 0 "$url" "$ready" "$header" "$@")"
  loaded="$(callgrind_ir "$scenario-load" "$CG_REQUESTS" "$url" "$ready" "$header" "$@")"
  local per; per="$(awk -v a="$loaded" -v b="$idle" -v n="$CG_REQUESTS" 'BEGIN {printf "%d\n", (a - b) / n + 0.5}')"
  log "$scenario: $idle instructions idle, $loaded with $CG_REQUESTS requests: $per per request"
  result "$scenario" instr_per_req "$per"
  result "$scenario" instr_idle "$idle"
}

# --- keygate -------------------------------------------------------------------------

ensure_keygate() {
  if [ "${KG_BENCH_NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release (may wait for the shared target dir lock)"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release"
  fi
  [ -x "$KEYGATE" ] || die "no $KEYGATE"
  [ -x "$KEYGATE_SIDECAR" ] || die "no $KEYGATE_SIDECAR"
}

# start_dev NAME STATE TOKEN_PORT SIDECAR_PORT: keygate dev with the quickstart config,
# forwarding to the nginx upstream.
start_dev() {
  local name="$1" state="$2" port="$3" sport="$4"
  start_bg "$name" "$KEYGATE" dev --config "$ROOT/examples/quickstart" --state "$state" \
    --port "$port" --sidecar-port "$sport" --upstream "127.0.0.1:$P_UPSTREAM"
  wait_http "http://127.0.0.1:$port/healthz" 30 "$name"
}
client_field() { # STATE CLIENT FIELD
  "$KEYGATE" dev credentials "$2" --config "$ROOT/examples/quickstart" --state "$1" --field "$3" 2>/dev/null ||
    "$KEYGATE" dev credentials "$2" --state "$1" --field "$3"
}
# get_token TOKEN_PORT CLIENT_ID SECRET: one access token for the orders resource
get_token() {
  curl -sf --max-time 5 -u "$2:$3" -d "grant_type=client_credentials&resource=$(urlencode "$RESOURCE")" \
    "http://127.0.0.1:$1/oauth2/token" | jq -r .access_token
}
jwt_alg() { # JWT: the alg of its header
  local h="${1%%.*}"
  h="$(tr '_-' '/+' <<<"$h")"
  while [ $((${#h} % 4)) -ne 0 ]; do h="$h="; done
  base64 -d <<<"$h" 2>/dev/null | jq -r .alg 2>/dev/null || true
}
urlencode() { jq -rn --arg v "$1" '$v|@uri'; }

# --- nginx upstream ------------------------------------------------------------------

# nginx_conf DIR PROCESSES HTTP: writes DIR/nginx.conf for an nginx in the foreground with
# its files in DIR, no access log and unlimited keep-alive requests. PROCESSES are the
# top-level process directives (e.g. `worker_processes auto;`), HTTP the rest of the http
# block (upstreams and servers).
nginx_conf() {
  local dir="$1" processes="$2" http="$3"
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
$processes
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp;
  uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;
$http
}
EOF
}

# The upstream every proxy forwards to: nginx answering GET with a fixed 1 KiB body.
start_upstream() {
  local dir="$RUN/nginx-upstream"
  local body; body="$(head -c 1024 /dev/zero | tr '\0' 'x')"
  nginx_conf "$dir" "worker_processes 1;" "  server {
    listen 127.0.0.1:$P_UPSTREAM;
    default_type text/plain;
    location / { return 200 \"$body\"; }
  }"
  start_bg nginx-upstream nginx -c "$dir/nginx.conf" -p "$dir"
  wait_http "http://127.0.0.1:$P_UPSTREAM/" 30 nginx-upstream
}
