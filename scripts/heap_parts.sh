#!/usr/bin/env bash
# Where an open stream's bytes go, part by part: the server built on the system allocator
# (`--features system-alloc`) runs under heaptrack; handoff-bench opens N streams, and once every
# one is open the server is killed, so that what heaptrack counts as leaked is what was live at
# that moment. A second run without the N streams is the baseline; the difference over N, by
# allocation site, grouped into parts by scripts/heap_parts.py, is each part's bytes per stream.
# These are the bytes asked for; the resident memory per stream (scripts/bench.sh) adds the
# allocator's rounding and pages.
#
#   bash scripts/heap_parts.sh [N (10000)] [MODE (distinct | single)] [OUT (target/heap)]
#
# SERVER=path runs that binary instead (another commit's, built with its own system-alloc
# feature). Needs heaptrack (apt-get install heaptrack), installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000} mode=${2:-distinct}
out=$(mkdir -p "${3:-target/heap}" && cd "${3:-target/heap}" && pwd)

command -v heaptrack >/dev/null || {
  apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends heaptrack
}
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
server=${SERVER:-}
if [ -z "$server" ]; then
  # Copied out: this build replaces target/release/handoff, which scripts/bench.sh rebuilds.
  cargo build --release --locked --features system-alloc --bin handoff
  cp "$target/release/handoff" "$out/handoff-system-alloc"
  server=$out/handoff-system-alloc
fi
cargo build --release --locked -p handoff-bench --bin handoff-bench
bench=$target/release/handoff-bench
ulimit -n "$(ulimit -Hn)"
token=heap-parts-token-$RANDOM$RANDOM$RANDOM
pid=
# A failed run leaves no server behind under heaptrack.
trap '[ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true' EXIT

run() { # label streams: one heaptrack run; the server is killed with `streams` open
  local label=$1 streams=$2 port=$((18500 + RANDOM % 400)) dir recorder opened
  dir=$(mktemp -d /tmp/heap-parts.XXXXXX)
  # As shipped: one instance on its SQLite file, no Redis.
  env -u REDIS_URL HANDOFF_API_TOKEN="$token" HANDOFF_SSE_TIMEOUT_SECS=600 HANDOFF_WORKERS=1 \
    RUST_LOG=warn HANDOFF_MAX_STREAMS_PER_CLIENT=off HANDOFF_ADDR=127.0.0.1:$port \
    DATABASE_URL="sqlite://$dir/handoff.db" \
    heaptrack -o "$out/$label" "$server" >"$out/$label.log" 2>&1 &
  recorder=$!
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  pid=$(pgrep -P "$recorder" -f "^$server" || pgrep -f -n "^$server") ||
    { echo "heap_parts.sh: the server did not start" >&2; exit 1; }
  # The first streams make the server's one-off allocations (pools, caches): both runs have them.
  "$bench" --handoff "http://127.0.0.1:$port" --token "$token" -n 1000 --mode "$mode" >/dev/null
  local kill="sleep 1; kill -KILL $pid"
  if [ "$streams" -gt 0 ]; then
    "$bench" --handoff "http://127.0.0.1:$port" --token "$token" -n "$streams" --mode "$mode" \
      --on-opened "$kill" --json "$out/$label.json" >/dev/null 2>&1 || true
    opened=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["opened"])' \
      "$out/$label.json" 2>/dev/null || echo 0)
    [ "$opened" = "$streams" ] || {
      echo "heap_parts.sh: $opened of $streams streams opened" >&2; exit 1; }
  fi
  # Whatever happened to the bench, the server goes now (with its streams open, if they are).
  bash -c "$kill" 2>/dev/null || true
  # heaptrack writes its file once the server is gone.
  wait "$recorder" || true
  rm -rf "$dir"
  local file; file=$(ls "$out/$label".*z* | head -1)
  heaptrack_print -f "$file" --print-allocators=0 --print-peaks=0 --print-temporary=0 \
    --flamegraph-cost-type leaked -F "$out/$label.stacks" >/dev/null
}
rm -f "$out"/base-"$mode".* "$out"/open-"$mode".*
run "base-$mode" 0
run "open-$mode" "$n"
python3 scripts/heap_parts.py "$out/base-$mode.stacks" "$out/open-$mode.stacks" "$n"
