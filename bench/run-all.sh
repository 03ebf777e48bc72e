#!/usr/bin/env bash
# Runs every benchmark and writes docs/BENCHMARKS.md.
#   bench/run-all.sh           full run (~25 minutes: every scenario 3 times, interleaved),
#                              rewrites docs/BENCHMARKS.md
#   bench/run-all.sh --smoke   ~2-3 s per scenario with few connections, for CI: checks every
#                              scenario answers the expected status codes and that wrk saw
#                              requests; writes bench/.run/BENCHMARKS.smoke.md, not the doc.
# Installs what it needs: apt-get (wrk nginx apache2 libapache2-mod-auth-openidc jq curl
# openssl valgrind), npm (oidc-provider into bench/.node). Every server listens on 127.0.0.1 only.
set -euo pipefail
START=$(date +%s)
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

# --- peers -------------------------------------------------------------------------------
APT_PACKAGES=(wrk nginx apache2 libapache2-mod-auth-openidc jq curl openssl valgrind)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >"$RUN/logs/apt-get.log" 2>&1 || die "apt-get update (see $RUN/logs/apt-get.log)"
  # policy-rc.d may refuse to start the packaged services; we run our own instances.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >>"$RUN/logs/apt-get.log" 2>&1 || die "apt-get install (see $RUN/logs/apt-get.log)"
fi
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are needed for oidc-provider"
want="$(jq -r '.dependencies["oidc-provider"]' "$BENCH_DIR/oidc-provider/package.json")"
have="$(jq -r .version "$BENCH_DIR/.node/node_modules/oidc-provider/package.json" 2>/dev/null || true)"
if [ "$have" != "$want" ]; then
  log "npm install oidc-provider@$want into bench/.node"
  mkdir -p "$BENCH_DIR/.node"
  cp "$BENCH_DIR/oidc-provider/package.json" "$BENCH_DIR/.node/package.json"
  (cd "$BENCH_DIR/.node" && npm install --no-audit --no-fund --loglevel=error) \
    >"$RUN/logs/npm.log" 2>&1 || die "npm install (see $RUN/logs/npm.log)"
fi

ensure_keygate
export KG_BENCH_NO_BUILD=1

# --- machine ---------------------------------------------------------------------------
rm -rf "$RESULTS" "$RUN"/raw/* "$RUN/callgrind"
M="$RUN/machine.tsv"
{
  printf 'mode\t%s\n' "$([ "$SMOKE" = 1 ] && echo smoke || echo full)"
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf 'commit\t%s\n' "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] && printf 'dirty\t%s\n' " (with uncommitted changes in the work tree)"
  printf 'nproc\t%s\n' "$(nproc)"
  printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  printf 'mem\t%s\n' "$(free -h | awk '/^Mem:/ {print $2}')"
  printf 'kernel\t%s\n' "$(uname -sr)"
  printf 'os\t%s\n' "$(. /etc/os-release && echo "$PRETTY_NAME")"
  printf 'keygate\t%s\n' "$("$KEYGATE" --version 2>/dev/null || echo '?') (release build)"
  printf 'rustc\t%s\n' "$(rustc --version 2>/dev/null || echo '?')"
  printf 'wrk\t%s\n' "$(wrk -v 2>&1 | head -1 | awk '{print $2}')"
  printf 'nginx\t%s\n' "$(nginx -v 2>&1 | sed 's/^nginx version: //')"
  printf 'apache\t%s\n' "$(apache2 -v 2>/dev/null | sed -n 's/^Server version: //p')"
  printf 'openidc\t%s\n' "$(dpkg-query -W -f='${Version}' libapache2-mod-auth-openidc)"
  printf 'node\t%s\n' "$(node --version)"
  printf 'oidc_provider\t%s\n' "$(jq -r .version "$BENCH_DIR/.node/node_modules/oidc-provider/package.json")"
  printf 'openssl\t%s\n' "$(openssl version)"
  printf 'threads\t%s\nconns\t%s\nduration\t%s\n' "$THREADS" "$CONNS" "$DURATION"
  printf 'rate_conns\t%s\nrate_duration\t%s\nsidecar_rate\t%s\n' "$RATE_CONNS" "$RATE_DURATION" "$SIDECAR_RATE"
  printf 'runs\t%s\npairs\t%s\ncg_requests\t%s\n' "$RUNS" "$PAIRS" "$CG_REQUESTS"
  printf 'valgrind\t%s\n' "$(valgrind --version 2>/dev/null || echo '?')"
  printf 'load_before\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$M"

# --- benchmarks (each its own process: its servers stop when it ends) ---------------------
mode=()
[ "$SMOKE" = 1 ] && mode=(--smoke)
bash "$BENCH_DIR/sidecar.sh" "${mode[@]}"
bash "$BENCH_DIR/token.sh" "${mode[@]}"
bash "$BENCH_DIR/controller.sh" "${mode[@]}"
printf 'load_after\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$M"

if [ "$SMOKE" = 1 ]; then
  OUT="$RUN/BENCHMARKS.smoke.md"
else
  OUT="$ROOT/docs/BENCHMARKS.md"
fi
python3 "$BENCH_DIR/report.py" "$RUN" "$OUT"
log "done in $(($(date +%s) - START)) s: $OUT"
