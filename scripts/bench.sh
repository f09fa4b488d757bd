#!/usr/bin/env bash
# Side-by-side benchmark: Handoff against Nchan (and, for context, the Python and Node peers),
# all driven by the same tool (handoff-bench), servers pinned to one core and the client to the
# other. Writes the measured part of BENCHMARKS.md (between its bench markers) with medians.
#
#   bash scripts/bench.sh                      # the full run (a few minutes, CPU heavy)
#   RUNS=1 SIZES=1000 PEERS=0 bash scripts/bench.sh    # a quick look
#
# Settings (environment): RUNS (3), SIZES ("1000 10000 19000"), PEER_N (1000), PEERS (1 = also
# the Python and Node peers), FLOOR_N (10000: N for the floors, bare actix-web and bare hyper,
# bench/examples/bare_*.rs, and the write floor, bench/examples/store_alone.rs; empty = skip them),
# PEERS_DIR (where start-nchan.sh lives; default ../shared/peers, then /work/shared/peers),
# SERVER_CPU (0), CLIENT_CPU (1), HANDOFF_WORKERS (1: one core), BASE_PORT (18080; each run
# takes the next port), OUT (target/bench).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SIZES=${SIZES:-"1000 10000 19000"}
PEER_N=${PEER_N:-1000}
PEERS=${PEERS:-1}
FLOOR_N=${FLOOR_N-10000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
WORKERS=${HANDOFF_WORKERS:-1}
BASE_PORT=${BASE_PORT:-18080}
OUT=$(mkdir -p "${OUT:-target/bench}" && cd "${OUT:-target/bench}" && pwd)
TOKEN=bench-token-$RANDOM$RANDOM$RANDOM$RANDOM
if [ -z "${PEERS_DIR:-}" ]; then
  for dir in ../shared/peers /work/shared/peers; do
    if [ -x "$dir/start-nchan.sh" ]; then PEERS_DIR=$(cd "$dir" && pwd); break; fi
  done
fi
[ -x "${PEERS_DIR:-}/start-nchan.sh" ] || {
  echo "bench.sh: no start-nchan.sh found; set PEERS_DIR to the shared peers folder" >&2; exit 2; }

say() { printf '\n== %s\n' "$*" >&2; }

# Servers and client may hold up to the hard limit of open files (20,000 here).
ulimit -n "$(ulimit -Hn)"
command -v taskset >/dev/null || { echo "bench.sh: taskset missing (apt-get install util-linux)" >&2; exit 2; }

say "building (release)"
cargo build --release --locked -p handoff --bin handoff -p handoff-bench --bin handoff-bench \
  --example bare_actix --example bare_hyper --example store_alone
# Where cargo put them: target/ unless CARGO_TARGET_DIR (or a cargo config) says otherwise.
release=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release
bench_bin=$release/handoff-bench
mkdir -p "$OUT/json"
rm -f "$OUT"/json/*.json

wait_port() { # port: wait up to 10 s until something listens there
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench.sh: nothing listens on port $1" >&2; return 1
}

stop_pid() { # pid [signal]: stop a server this script started and wait for it to go
  kill "-${2:-TERM}" "$1" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}

# Each server starts fresh for every run, so its resident memory before the streams is a clean base.
server_pid=; measure_pid=; server_dir=
# Every run gets a port of its own, so the TIME_WAIT that tens of thousands of closed streams
# leave for a minute never meets the next run's connections.
PORT=$BASE_PORT
# The Python peer needs python3's venv module, the Node peers node and npm.
if [ "$PEERS" = 1 ]; then
  missing=()
  python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi
start_handoff() {
  local port=$PORT dir
  dir=$(mktemp -d /tmp/handoff-bench.XXXXXX)
  server_dir=$dir
  HANDOFF_ADDR=127.0.0.1:$port DATABASE_URL="sqlite://$dir/handoff.db" HANDOFF_API_TOKEN=$TOKEN \
    HANDOFF_SSE_TIMEOUT_SECS=600 HANDOFF_WORKERS=$WORKERS RUST_LOG=warn \
    HANDOFF_MAX_STREAMS_PER_CLIENT=off \
    taskset -c "$SERVER_CPU" "$release/handoff" >"$OUT/handoff.log" 2>&1 &
  server_pid=$!; measure_pid=$server_pid
  wait_port "$port"
}
start_bare_actix() {
  taskset -c "$SERVER_CPU" "$release/examples/bare_actix" "127.0.0.1:$PORT" "$WORKERS" \
    >"$OUT/bare-actix.log" 2>&1 &
  server_pid=$!; measure_pid=$server_pid
  wait_port "$PORT"
}
start_bare_hyper() {
  taskset -c "$SERVER_CPU" "$release/examples/bare_hyper" "127.0.0.1:$PORT" \
    >"$OUT/bare-hyper.log" 2>&1 &
  server_pid=$!; measure_pid=$server_pid
  wait_port "$PORT"
}
start_nchan() {
  local line
  line=$(taskset -c "$SERVER_CPU" "$PEERS_DIR/start-nchan.sh" $PORT)
  server_pid=$(sed -E 's/.*pid=([0-9]+).*/\1/' <<<"$line")
  measure_pid=$(sed -E 's/.*worker=([0-9]+).*/\1/' <<<"$line")
  server_dir=$(sed -E 's/.*dir=([^ ]+).*/\1/' <<<"$line")
  wait_port $PORT
}
start_python() {
  (cd "$PEERS_DIR" && exec taskset -c "$SERVER_CPU" "$OUT/venv/bin/uvicorn" sse_starlette_app:app \
    --host 127.0.0.1 --port $PORT --loop uvloop --http httptools --log-level warning \
    >"$OUT/python.log" 2>&1) &
  server_pid=$!; measure_pid=$server_pid
  wait_port $PORT
}
start_node_plain() {
  PORT=$PORT taskset -c "$SERVER_CPU" node "$PEERS_DIR/node_plain.js" >"$OUT/node.log" 2>&1 &
  server_pid=$!; measure_pid=$server_pid
  wait_port $PORT
}
start_better_sse() {
  NODE_PATH=$OUT/node/node_modules PORT=$PORT \
    taskset -c "$SERVER_CPU" node "$PEERS_DIR/node_better_sse.js" >"$OUT/better-sse.log" 2>&1 &
  server_pid=$!; measure_pid=$server_pid
  wait_port $PORT
}
stop_server() { # name: stop it and remove the folder this run gave it (database, nginx files)
  if [ "$1" = nchan ]; then stop_pid "$server_pid" QUIT; else stop_pid "$server_pid"; fi
  case $server_dir in /tmp/handoff-bench.* | /tmp/nchan.*) rm -rf "$server_dir" ;; esac
  server_dir=
}

target_args() { # name: the bench tool's target arguments
  case $1 in
    handoff) echo "--handoff http://127.0.0.1:$PORT --token $TOKEN" ;;
    bare-actix | bare-hyper) echo "--sub-url http://127.0.0.1:$PORT/sub/{id} --pub-url http://127.0.0.1:$PORT/pub/{id}" ;;
    nchan) echo "--sub-url http://127.0.0.1:$PORT/sub/{id} --pub-url http://127.0.0.1:$PORT/pub?id={id}" ;;
    python) echo "--sub-url http://127.0.0.1:$PORT/sub/{id} --pub-url http://127.0.0.1:$PORT/pub/{id}" ;;
    node-plain) echo "--sub-url http://127.0.0.1:$PORT/sub/{id} --pub-url http://127.0.0.1:$PORT/pub/{id}" ;;
    better-sse) echo "--sub-url http://127.0.0.1:$PORT/sub/{id} --pub-url http://127.0.0.1:$PORT/pub/{id}" ;;
  esac
}

store_run() { # callers n rep: Handoff's store alone on the server's core (the write floor)
  local callers=$1 n=$2 rep=$3
  say "store alone, $callers caller(s), $n completions, run $rep"
  timeout 120 taskset -c "$SERVER_CPU" "$release/examples/store_alone" "$n" "$callers" \
    "$OUT/json/store-alone-c$callers-distinct-$n-$rep.json" ||
    echo "bench.sh: store alone, $callers caller(s), run $rep FAILED" >&2
}

one_run() { # name n mode rep
  local name=$1 n=$2 mode=$3 rep=$4 json
  json="$OUT/json/$name-$mode-$n-$rep.json"
  server_pid=
  PORT=$((PORT + 1))
  say "$name $mode N=$n run $rep (port $PORT)"
  if ! "start_${name//-/_}"; then
    echo "bench.sh: $name did not start (see $OUT/*.log); skipping this run" >&2
    [ -z "$server_pid" ] || stop_server "$name"
    return 0
  fi
  # shellcheck disable=SC2046 # target_args is a list of words without spaces inside
  taskset -c "$CLIENT_CPU" "$bench_bin" $(target_args "$name") -n "$n" --mode "$mode" \
    --timeout 120 --leave-on-result --server-pid "$measure_pid" --label "$name" --json "$json" ||
    echo "bench.sh: $name $mode N=$n run $rep FAILED (see the table above)" >&2
  stop_server "$name"
}

if [ "$PEERS" = 1 ]; then
  say "installing the Python and Node peers (as $PEERS_DIR/README.md says)"
  [ -x "$OUT/venv/bin/uvicorn" ] || {
    python3 -m venv "$OUT/venv"
    "$OUT/venv/bin/pip" install -q sse-starlette uvicorn uvloop httptools
  }
  [ -d "$OUT/node/node_modules/better-sse" ] || {
    mkdir -p "$OUT/node"
    npm install --silent --prefix "$OUT/node" better-sse
  }
fi

for rep in $(seq "$RUNS"); do
  for n in $SIZES; do
    for mode in distinct single; do
      one_run handoff "$n" "$mode" "$rep"
      one_run nchan "$n" "$mode" "$rep"
      if [ "$n" = "$FLOOR_N" ]; then
        one_run bare-actix "$n" "$mode" "$rep"
        one_run bare-hyper "$n" "$mode" "$rep"
        if [ "$mode" = distinct ]; then
          store_run 4 "$n" "$rep"
          store_run 1 "$n" "$rep"
        fi
      fi
    done
  done
  if [ "$PEERS" = 1 ]; then
    for name in python node-plain better-sse; do
      for mode in distinct single; do one_run "$name" "$PEER_N" "$mode" "$rep"; done
    done
  fi
done

say "writing BENCHMARKS.md"
machine="$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GB RAM, Linux $(uname -r)"
load=$(cut -d' ' -f1-3 /proc/loadavg)
python3 scripts/bench_table.py "$OUT/json" BENCHMARKS.md \
  --runs "$RUNS" --machine "$machine" --load "$load" --workers "$WORKERS" \
  --commit "$(git rev-parse --short HEAD)$(git diff --quiet -- . ':!BENCHMARKS.md' || echo '+changes')" \
  --command "bash scripts/bench.sh$( [ "$RUNS" = 3 ] || echo " (RUNS=$RUNS)" )"
say "done: BENCHMARKS.md"
