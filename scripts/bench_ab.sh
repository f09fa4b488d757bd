#!/usr/bin/env bash
# Before/after: two builds of Handoff in alternating runs of bench.sh's single-server distinct run
# (same settings: one worker on core 0, the client on core 1, a fresh SQLite file each run), then
# the medians. Besides the bench's figures it reads the server's CPU time over the whole run (every
# thread's /proc/PID/task/*/schedstat), per job: less sensitive to a busy machine than throughput;
# and the SQLite WAL file's size at the end of the run (the file never shrinks, so this is the
# largest it grew to). With NCHAN=1 each round runs in-memory Nchan too, and the latency ratios
# Handoff ÷ Nchan are taken within the round, then their median.
#
#   bash scripts/bench_ab.sh BEFORE_BINARY AFTER_BINARY HANDOFF_BENCH_BINARY
#
# Settings (environment): N (10000), RUNS (8; each runs both), PUB (4 publisher connections),
# OUT (target/bench-ab), BASE_PORT (19300), NCHAN (0; 1 = Nchan in every round), PEERS_DIR (where
# start-nchan.sh lives; default ../shared/peers, then /work/shared/peers), NICE (0; e.g. -20 runs
# the servers and the client at that niceness, so that builds running beside them on a shared
# machine take the cores only when the bench leaves them idle: needs root). Every run keeps its
# latencies in its JSON (`--samples`), for the whole distribution.
set -euo pipefail
BEFORE=$1 AFTER=$2 BENCH=$3
N=${N:-10000} RUNS=${RUNS:-8} PUB=${PUB:-4} PORT=${BASE_PORT:-19300} NCHAN=${NCHAN:-0} NICE=${NICE:-0}
OUT=$(mkdir -p "${OUT:-target/bench-ab}" && cd "${OUT:-target/bench-ab}" && pwd)
if [ "$NCHAN" = 1 ] && [ -z "${PEERS_DIR:-}" ]; then
  for dir in "$(dirname "$0")/../../shared/peers" /work/shared/peers; do
    if [ -x "$dir/start-nchan.sh" ]; then PEERS_DIR=$(cd "$dir" && pwd); break; fi
  done
  [ -x "${PEERS_DIR:-}/start-nchan.sh" ] || {
    echo "bench_ab.sh: no start-nchan.sh found; set PEERS_DIR" >&2; exit 2; }
fi
ulimit -n "$(ulimit -Hn)"
TOKEN=bench-token-$RANDOM$RANDOM$RANDOM
bench() { # label rep pid target-arguments...
  local label=$1 rep=$2 pid=$3
  shift 3
  nice -n "$NICE" taskset -c 1 "$BENCH" "$@" -n "$N" --mode distinct --publishers "$PUB" --timeout 120 \
    --leave-on-result --server-pid "$pid" --samples --label "$label" \
    --json "$OUT/$label-p$PUB-$rep.json" >/dev/null || echo "run $label $rep FAILED" >&2
}
run() { # label binary rep
  PORT=$((PORT + 1))
  local dir pid
  dir=$(mktemp -d /tmp/handoff-bench-ab.XXXXXX)
  env HANDOFF_API_TOKEN="$TOKEN" HANDOFF_SSE_TIMEOUT_SECS=600 HANDOFF_WORKERS=1 RUST_LOG=warn \
    HANDOFF_MAX_STREAMS_PER_CLIENT=off HANDOFF_ADDR=127.0.0.1:$PORT \
    DATABASE_URL="sqlite://$dir/handoff.db" nice -n "$NICE" taskset -c 0 "$2" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  bench "$1" "$3" "$pid" --handoff "http://127.0.0.1:$PORT" --token "$TOKEN"
  cat /proc/"$pid"/task/*/schedstat | awk -v n="$N" '{t += $1} END {printf "%.1f\n", t / n / 1000}' \
    >"$OUT/$1-p$PUB-$3.cpu"
  stat -c %s "$dir/handoff.db-wal" >"$OUT/$1-p$PUB-$3.wal" 2>/dev/null || echo 0 >"$OUT/$1-p$PUB-$3.wal"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}
nchan() { # rep
  PORT=$((PORT + 1))
  local line master worker dir
  line=$(nice -n "$NICE" taskset -c 0 "$PEERS_DIR/start-nchan.sh" "$PORT")
  master=$(sed -E 's/.*pid=([0-9]+).*/\1/' <<<"$line")
  worker=$(sed -E 's/.*worker=([0-9]+).*/\1/' <<<"$line")
  dir=$(sed -E 's/.*dir=([^ ]+).*/\1/' <<<"$line")
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  bench nchan "$1" "$worker" --sub-url "http://127.0.0.1:$PORT/sub/{id}" \
    --pub-url "http://127.0.0.1:$PORT/pub?id={id}"
  kill -QUIT "$master"
  for _ in $(seq 50); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
  case $dir in /tmp/nchan.*) rm -rf "$dir" ;; esac
}
rm -f "$OUT"/*-p"$PUB"-*.json "$OUT"/*-p"$PUB"-*.cpu "$OUT"/*-p"$PUB"-*.wal
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); niceness $NICE"
for rep in $(seq "$RUNS"); do
  if [ $((rep % 2)) = 1 ]; then run before "$BEFORE" "$rep"; run after "$AFTER" "$rep"
  else run after "$AFTER" "$rep"; run before "$BEFORE" "$rep"; fi
  [ "$NCHAN" != 1 ] || nchan "$rep"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT" "$PUB" <<'PY'
import glob, json, os, statistics, sys
out, pub = sys.argv[1], sys.argv[2]
med = statistics.median
def load(label):
    runs = sorted(glob.glob(f"{out}/{label}-p{pub}-*.json"))
    return {f.rsplit("-", 1)[1][:-5]: json.load(open(f)) for f in runs}
nchan = load("nchan")
for label in ("before", "after", "nchan"):
    rs = load(label)
    if not rs:
        continue
    lat = lambda k: med(r["latency_ms"][k] for r in rs.values())
    line = (f"{label}: {len(rs)} runs, all ok: {all(r['ok'] for r in rs.values())}; median "
            f"{med(r['completions_per_sec'] for r in rs.values()):.0f} completions/s, latency "
            f"p50 {lat('p50'):.3f} p99 {lat('p99'):.3f} p99.9 {lat('p999'):.3f} max {lat('max'):.3f} ms, "
            f"{med(r['connects_per_sec'] for r in rs.values()):.0f} connects/s, "
            f"{med(r['bytes_per_stream'] or 0 for r in rs.values()):.0f} B/stream")
    if label != "nchan":
        cpu = [float(open(f"{out}/{label}-p{pub}-{rep}.cpu").read()) for rep in rs]
        wal = [int(open(f"{out}/{label}-p{pub}-{rep}.wal").read()) for rep in rs]
        line += (f", {med(cpu):.1f} µs of server CPU per job (each run: "
                 f"{', '.join(f'{c:.1f}' for c in cpu)}), WAL file at the end: median "
                 f"{med(wal) / 2**20:.1f} MiB, largest {max(wal) / 2**20:.1f} MiB")
        same = [rep for rep in rs if rep in nchan]
        if same:
            ratio = lambda k: med(rs[rep]["latency_ms"][k] / nchan[rep]["latency_ms"][k] for rep in same)
            line += (f"; ÷ Nchan in the same round (median of {len(same)}): "
                     f"p50 {ratio('p50'):.2f}×, p99 {ratio('p99'):.2f}×, p99.9 {ratio('p999'):.2f}×, "
                     f"completions/s "
                     f"{med(rs[r]['completions_per_sec'] / nchan[r]['completions_per_sec'] for r in same):.2f}×")
    print(line)
PY
