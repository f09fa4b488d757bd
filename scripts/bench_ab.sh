#!/usr/bin/env bash
# Before/after: two builds of Handoff in alternating runs of bench.sh's single-server distinct run
# (same settings: one worker on core 0, the client on core 1, a fresh SQLite file each run), then
# the medians. Besides the bench's figures it reads the server's CPU time over the whole run (every
# thread's /proc/PID/task/*/schedstat), per job: less sensitive to a busy machine than throughput.
#
#   bash scripts/bench_ab.sh BEFORE_BINARY AFTER_BINARY HANDOFF_BENCH_BINARY
#
# Settings (environment): N (10000), RUNS (8; each runs both), PUB (4 publisher connections),
# OUT (target/bench-ab), BASE_PORT (19300).
set -euo pipefail
BEFORE=$1 AFTER=$2 BENCH=$3
N=${N:-10000} RUNS=${RUNS:-8} PUB=${PUB:-4} PORT=${BASE_PORT:-19300}
OUT=$(mkdir -p "${OUT:-target/bench-ab}" && cd "${OUT:-target/bench-ab}" && pwd)
ulimit -n "$(ulimit -Hn)"
TOKEN=bench-token-$RANDOM$RANDOM$RANDOM
run() { # label binary rep
  PORT=$((PORT + 1))
  local dir pid
  dir=$(mktemp -d /tmp/handoff-bench-ab.XXXXXX)
  env HANDOFF_API_TOKEN="$TOKEN" HANDOFF_SSE_TIMEOUT_SECS=600 HANDOFF_WORKERS=1 RUST_LOG=warn \
    HANDOFF_MAX_STREAMS_PER_CLIENT=off HANDOFF_ADDR=127.0.0.1:$PORT \
    DATABASE_URL="sqlite://$dir/handoff.db" taskset -c 0 "$2" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  taskset -c 1 "$BENCH" --handoff "http://127.0.0.1:$PORT" --token "$TOKEN" -n "$N" \
    --mode distinct --publishers "$PUB" --timeout 120 --leave-on-result --server-pid "$pid" \
    --label "$1" --json "$OUT/$1-p$PUB-$3.json" >/dev/null || echo "run $1 $3 FAILED" >&2
  cat /proc/"$pid"/task/*/schedstat | awk -v n="$N" '{t += $1} END {printf "%.1f\n", t / n / 1000}' \
    >"$OUT/$1-p$PUB-$3.cpu"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
rm -f "$OUT"/*-p"$PUB"-*.json "$OUT"/*-p"$PUB"-*.cpu
for rep in $(seq "$RUNS"); do
  if [ $((rep % 2)) = 1 ]; then run before "$BEFORE" "$rep"; run after "$AFTER" "$rep"
  else run after "$AFTER" "$rep"; run before "$BEFORE" "$rep"; fi
done
python3 - "$OUT" "$PUB" <<'PY'
import glob, json, statistics, sys
out, pub = sys.argv[1], sys.argv[2]
for label in ("before", "after"):
    runs = sorted(glob.glob(f"{out}/{label}-p{pub}-*.json"))
    rs = [json.load(open(f)) for f in runs]
    cpu = [float(open(f[:-5] + ".cpu").read()) for f in runs]
    med = statistics.median
    print(f"{label}: {len(rs)} runs, all ok: {all(r['ok'] for r in rs)}; median "
          f"{med(r['completions_per_sec'] for r in rs):.0f} completions/s, "
          f"latency p50 {med(r['latency_ms']['p50'] for r in rs):.3f} ms, "
          f"p99 {med(r['latency_ms']['p99'] for r in rs):.3f} ms, "
          f"{med(r['connects_per_sec'] for r in rs):.0f} connects/s, "
          f"{med(r['bytes_per_stream'] or 0 for r in rs):.0f} B/stream, "
          f"{med(cpu):.1f} µs of server CPU per job (each run: {', '.join(f'{c:.1f}' for c in cpu)})")
PY
