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
# MANY_N (10000: N for the runs with MANY_PUBLISHERS=32 publisher connections; empty = skip),
# SCALE_N (10000: N for two Handoff instances on PostgreSQL + Redis against two Nchan on Redis;
# empty = skip; SCALE_PUBLISHERS=4 connections to each), FLEET_N (10000: N for the fleet runs,
# FLEET_INSTANCES="2 4 6" instances holding the streams beside a stream-less one and one watching
# a tenth of the jobs, single channel against routed fan-out; empty = skip), CAPACITY_N (100000: streams over CAPACITY_INSTANCES=6 Handoff instances, run
# once; empty = skip), REDIS_URL (redis://127.0.0.1:6379), PG_URL (postgres://postgres@127.0.0.1:5432),
# PEERS_DIR (where start-nchan.sh lives; default ../shared/peers, then /work/shared/peers),
# SERVER_CPU (0), CLIENT_CPU (1), HANDOFF_WORKERS (1: one core), BASE_PORT (18080; each run
# takes the next port), OUT (target/bench), BATCH_N (10000: N for batched completions, BATCH_SIZE=100
# jobs a request: Handoff's POST /api/jobs/batch and Nchan's /multipub over 4 publishers, against
# Nchan's single publishes over MANY_PUBLISHERS in the same run; empty = skip), TABLE (1: write
# BENCHMARKS.md at the end; 0 leaves it alone, for a partial run).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SIZES=${SIZES-"1000 10000 19000"}
PEER_N=${PEER_N:-1000}
PEERS=${PEERS:-1}
FLOOR_N=${FLOOR_N-10000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
WORKERS=${HANDOFF_WORKERS:-1}
BASE_PORT=${BASE_PORT:-18080}
MANY_N=${MANY_N-10000}
MANY_PUBLISHERS=${MANY_PUBLISHERS:-32}
SCALE_N=${SCALE_N-10000}
SCALE_PUBLISHERS=${SCALE_PUBLISHERS:-4}
FLEET_N=${FLEET_N-10000}
FLEET_INSTANCES=${FLEET_INSTANCES:-"2 4 6"}
CAPACITY_N=${CAPACITY_N-100000}
CAPACITY_INSTANCES=${CAPACITY_INSTANCES:-6}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
PUBLISHERS=4
BATCH_N=${BATCH_N-10000}
BATCH_SIZE=${BATCH_SIZE:-100}
BATCH=0
TABLE=${TABLE:-1}
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
# Every Handoff a run starts, alone or in a fleet: no info line per job, no stream recycled
# mid-run, every stream from one client address allowed.
handoff_env=(HANDOFF_API_TOKEN="$TOKEN" HANDOFF_SSE_TIMEOUT_SECS=600 HANDOFF_WORKERS="$WORKERS"
  RUST_LOG=warn HANDOFF_MAX_STREAMS_PER_CLIENT=off)
start_handoff() {
  local port=$PORT dir
  dir=$(mktemp -d /tmp/handoff-bench.XXXXXX)
  server_dir=$dir
  # One instance on its SQLite file, as shipped: no Redis, though REDIS_URL is exported for the
  # fleet's counters.
  env -u REDIS_URL "${handoff_env[@]}" HANDOFF_ADDR=127.0.0.1:$port \
    DATABASE_URL="sqlite://$dir/handoff.db" \
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
start_nchan() { # [port] [redis URL]: one Nchan; with a Redis URL it stores its messages there
  local line
  line=$(taskset -c "$SERVER_CPU" "$PEERS_DIR/start-nchan.sh" "${1:-$PORT}" ${2:+"$2"})
  server_pid=$(sed -E 's/.*pid=([0-9]+).*/\1/' <<<"$line")
  measure_pid=$(sed -E 's/.*worker=([0-9]+).*/\1/' <<<"$line")
  server_dir=$(sed -E 's/.*dir=([^ ]+).*/\1/' <<<"$line")
  wait_port "${1:-$PORT}"
}
start_nchan_redis() { start_nchan "$PORT" "$REDIS_URL"; }
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
  case $1 in nchan*) stop_pid "$server_pid" QUIT ;; *) stop_pid "$server_pid" ;; esac
  case $server_dir in /tmp/handoff-bench.* | /tmp/nchan.*) rm -rf "$server_dir" ;; esac
  server_dir=
}

target_args() { # name: the bench tool's target arguments
  case $1 in
    handoff) echo "--handoff http://127.0.0.1:$PORT --token $TOKEN" ;;
    bare-actix | bare-hyper) echo "--sub-url http://127.0.0.1:$PORT/sub/{id} --pub-url http://127.0.0.1:$PORT/pub/{id}" ;;
    nchan | nchan-redis)
      # Batched: Nchan's multi-channel publish, one message to the batch's channels.
      local publish=pub
      [ "$BATCH" = 0 ] || publish=multipub
      echo "--sub-url http://127.0.0.1:$PORT/sub/{id} --pub-url http://127.0.0.1:$PORT/$publish?id={id}" ;;
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

# Redis and PostgreSQL are the machine's own services: a run that leans on them pins them to the
# server's core (the fair fight: the peer's store shares the core it serves from), and puts their
# affinity back afterwards.
pinned=()
pin() { # process name...
  local name pid mask
  for name in "$@"; do
    for pid in $(pgrep -x "$name"); do
      # A process may end between pgrep and taskset (a PostgreSQL backend closing).
      mask=$(taskset -p "$pid" 2>/dev/null | awk '{print $NF}') || continue
      [ -n "$mask" ] || continue
      pinned+=("$pid $mask")
      taskset -a -p -c "$SERVER_CPU" "$pid" >/dev/null 2>&1 || true
    done
  done
}
unpin() {
  local entry
  for entry in ${pinned[@]+"${pinned[@]}"}; do
    taskset -a -p "${entry#* }" "${entry%% *}" >/dev/null 2>&1 || true
  done
  pinned=()
}
# What a failed step must not leave behind: the fleets' servers and the runs' databases.
fleet_pids=() bench_dbs=()
cleanup() {
  local pid db
  unpin
  for pid in ${fleet_pids[@]+"${fleet_pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for db in ${bench_dbs[@]+"${bench_dbs[@]}"}; do
    psql "$PG_URL/postgres" -qc "drop database if exists $db" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT

one_run() { # name n mode rep: the label gets -pK when PUBLISHERS is not 4, -bK when BATCH is K
  local name=$1 n=$2 mode=$3 rep=$4 json label=$1
  [ "$PUBLISHERS" = 4 ] || label=$name-p$PUBLISHERS
  [ "$BATCH" = 0 ] || label=$label-b$BATCH
  json="$OUT/json/$label-$mode-$n-$rep.json"
  server_pid=
  PORT=$((PORT + 1))
  say "$label $mode N=$n run $rep (port $PORT)"
  [ "$name" != nchan-redis ] || pin redis-server
  if ! "start_${name//-/_}"; then
    echo "bench.sh: $name did not start (see $OUT/*.log); skipping this run" >&2
    [ -z "$server_pid" ] || stop_server "$name"
    unpin
    return 0
  fi
  # shellcheck disable=SC2046 # target_args is a list of words without spaces inside
  taskset -c "$CLIENT_CPU" "$bench_bin" $(target_args "$name") -n "$n" --mode "$mode" \
    --publishers "$PUBLISHERS" --batch "$BATCH" --timeout 120 --leave-on-result --server-pid "$measure_pid" \
    --label "$label" --json "$json" ||
    echo "bench.sh: $label $mode N=$n run $rep FAILED (see the table above)" >&2
  stop_server "$name"
  unpin
}

# A fleet member: Handoff on PostgreSQL + Redis. Prints its pid.
start_member() { # port database channel log [extra env...]
  local port=$1 db=$2 channel=$3 log=$4
  shift 4
  env "${handoff_env[@]}" HANDOFF_ADDR=127.0.0.1:$port DATABASE_URL="$PG_URL/$db" \
    REDIS_URL="$REDIS_URL" HANDOFF_REDIS_CHANNEL="$channel" "$@" \
    "$release/handoff" >>"$log" 2>&1 &
  echo $!
}

export REDIS_URL PG_URL

# Adds to a run's JSON what the counters before and after its completions say, per completion.
add_counters() { # json
  python3 - "$1" "$OUT/counters.before" "$OUT/counters.after" <<'PY' || true
import json, sys
path, before, after = sys.argv[1:]
def counters(name):
    return {k: int(v) for k, v in (f.split("=") for f in open(name).read().split())}
b, a = counters(before), counters(after)
report = json.load(open(path))
done = max(report.get("completions") or 0, 1)
per = lambda key: (a[key] - b[key]) / done
report["redis_commands_per_completion"] = per("redis_commands") - 1 / done  # less the INFO itself
report["pg_transactions_per_completion"] = per("pg_transactions") if a["pg_transactions"] else None
report["bystander_us_per_completion"] = per("bystander_ns") / 1e3 if a["bystander_ns"] else None
report["watcher_us_per_completion"] = per("watcher_ns") / 1e3 if a["watcher_ns"] else None
report["bystander_received_per_completion"] = per("bystander_received") if a["bystander_ns"] else None
report["watcher_received_per_completion"] = per("watcher_received") if a["watcher_ns"] else None
# CPU per completion of each part of the fleet, over the completion window.
report["fleet_us_per_completion"] = per("fleet_ns") / 1e3
report["postgres_us_per_completion"] = per("postgres_ns") / 1e3 if a["pg_transactions"] else None
report["redis_us_per_completion"] = per("redis_ns") / 1e3
report["window_us_per_completion"] = per("clock_ns") / 1e3
json.dump(report, open(path, "w"), indent=2)
PY
}

scale_run() { # name n rep: two instances sharing one Redis (Handoff: and one PostgreSQL database)
  local name=$1 n=$2 rep=$3 json db= pids=() ports=() args bystander= i
  json="$OUT/json/scale-$name-distinct-$n-$rep.json"
  ports=($((PORT + 1)) $((PORT + 2)) $((PORT + 3)))
  PORT=$((PORT + 3))
  say "scale-out: two $name instances on Redis, N=$n, run $rep (ports ${ports[*]})"
  pin redis-server postgres
  rm -f "$OUT/counters.before" "$OUT/counters.after"
  if [ "$name" = handoff ]; then
    db=handoff_bench_$RANDOM$RANDOM
    bench_dbs+=("$db")
    psql "$PG_URL/postgres" -qc "create database $db" >/dev/null
    for i in 0 1 2; do
      # The third holds no stream: it measures what every instance pays for each completion
      # on the one channel they all share.
      pids+=("$(start_member "${ports[$i]}" "$db" "bench-$db" "$OUT/scale-handoff.log" \
        taskset -c "$SERVER_CPU")")
    done
    fleet_pids+=("${pids[@]}")
    for i in 0 1 2; do wait_port "${ports[$i]}"; done
    bystander=${pids[2]}
    args="--handoff http://127.0.0.1:${ports[0]},http://127.0.0.1:${ports[1]} --token $TOKEN"
  else
    local dirs=() line
    for i in 0 1; do
      line=$(taskset -c "$SERVER_CPU" "$PEERS_DIR/start-nchan.sh" "${ports[$i]}" "$REDIS_URL")
      pids+=("$(sed -E 's/.*worker=([0-9]+).*/\1/' <<<"$line")")
      fleet_pids+=("$(sed -E 's/.*pid=([0-9]+).*/\1/' <<<"$line")")
      dirs+=("$(sed -E 's/.*dir=([^ ]+).*/\1/' <<<"$line")")
      wait_port "${ports[$i]}"
    done
    args="--sub-url http://127.0.0.1:${ports[0]}/sub/{id},http://127.0.0.1:${ports[1]}/sub/{id}"
    args+=" --pub-url http://127.0.0.1:${ports[0]}/pub?id={id},http://127.0.0.1:${ports[1]}/pub?id={id}"
  fi
  # shellcheck disable=SC2086 # args is a list of words without spaces inside
  taskset -c "$CLIENT_CPU" "$bench_bin" $args -n "$n" --mode distinct --timeout 120 \
    --publishers "$SCALE_PUBLISHERS" \
    --leave-on-result --server-pid "${pids[0]},${pids[1]}" --label "scale-$name" --json "$json" \
    --on-opened "bash scripts/bench_counters.sh $OUT/counters.before ${db:--} ${bystander:--} ${pids[0]},${pids[1]}" ||
    echo "bench.sh: scale-out $name N=$n run $rep FAILED (see the table above)" >&2
  bash scripts/bench_counters.sh "$OUT/counters.after" "${db:--}" "${bystander:--}" "${pids[0]},${pids[1]}"
  add_counters "$json"
  if [ "$name" = handoff ]; then
    for i in 0 1 2; do stop_pid "${pids[$i]}"; done
    psql "$PG_URL/postgres" -qc "drop database $db" >/dev/null || true
  else
    for i in 0 1; do
      stop_pid "$(cat "${dirs[$i]}/nginx.pid")" QUIT
      rm -rf "${dirs[$i]}"
    done
  fi
  unpin
}

# The fleet at FLEET_INSTANCES sizes: that many instances on one PostgreSQL database and one
# Redis hold the streams and complete the jobs (as in the scale-out run), and two more are
# watched beside them: one with no stream, and one with a stream for every tenth job that it
# never completes. The fan-out routed (HANDOFF_FANOUT_LEGACY_CHANNEL=off, each job's news on its
# own channel) or on the single channel every instance hears (=on, where a stream-less instance
# hears, checks and drops every message of the fleet, as every instance did before routing).
fleet_run() { # instances routed|single n rep
  local k=$1 fanout=$2 n=$3 rep=$4 json db legacy=off pids=() ports=() urls= i
  [ "$fanout" = routed ] || legacy=on
  json="$OUT/json/fleet-$fanout-f$k-distinct-$n-$rep.json"
  for i in $(seq 0 $((k + 1))); do ports+=($((PORT + 1 + i))); done
  PORT=$((PORT + k + 2))
  say "fleet: $k Handoff instances and two watched, $fanout fan-out, N=$n, run $rep"
  pin redis-server postgres
  rm -f "$OUT/counters.before" "$OUT/counters.after"
  db=handoff_bench_$RANDOM$RANDOM
  bench_dbs+=("$db")
  psql "$PG_URL/postgres" -qc "create database $db" >/dev/null
  for i in $(seq 0 $((k + 1))); do
    # 8 connections each: 8 instances take at most 64 of PostgreSQL's 100.
    pids+=("$(start_member "${ports[$i]}" "$db" "bench-$db" "$OUT/fleet.log" \
      HANDOFF_DB_POOL=8 HANDOFF_FANOUT_LEGACY_CHANNEL=$legacy taskset -c "$SERVER_CPU")")
  done
  fleet_pids+=("${pids[@]}")
  for i in $(seq 0 $((k + 1))); do wait_port "${ports[$i]}"; done
  for i in $(seq 0 $((k - 1))); do urls+="${urls:+,}http://127.0.0.1:${ports[$i]}"; done
  local serving bystander=${pids[k]}@${ports[k]} watcher=${pids[k + 1]}@${ports[k + 1]}
  serving=$(IFS=,; echo "${pids[*]:0:k}")
  bash scripts/bench_counters.sh "$OUT/counters.start" "$db" - "$serving"
  taskset -c "$CLIENT_CPU" "$bench_bin" --handoff "$urls" --token "$TOKEN" -n "$n" --mode distinct \
    --timeout 120 --publishers "$SCALE_PUBLISHERS" --leave-on-result --server-pid "$serving" \
    --watcher "http://127.0.0.1:${ports[k + 1]}/sse/connect/{id}" --label "fleet-$fanout-f$k" \
    --json "$json" \
    --on-opened "bash scripts/bench_counters.sh $OUT/counters.before $db $bystander $serving $watcher" ||
    echo "bench.sh: fleet of $k, $fanout, N=$n run $rep FAILED (see the table above)" >&2
  bash scripts/bench_counters.sh "$OUT/counters.after" "$db" "$bystander" "$serving" "$watcher"
  add_counters "$json"
  # The subscriptions of the whole run, from before the first stream to after the last
  # unsubscribe (an instance keeps a job's channel 5 s after its last stream left).
  sleep 6
  bash scripts/bench_counters.sh "$OUT/counters.settled" "$db" - "$serving"
  python3 - "$json" "$k" "$fanout" "$OUT/counters.start" "$OUT/counters.settled" <<'PY' || true
import json, sys
path, k, fanout, start, settled = sys.argv[1:]
def counters(name):
    return {k: int(v) for k, v in (f.split("=") for f in open(name).read().split())}
b, a = counters(start), counters(settled)
report = json.load(open(path))
report["instances"], report["fanout"] = int(k), fanout
jobs = max(report.get("streams") or 0, 1)
# (Counting the counters' own three INFO calls: 0.0003 a job at N = 10,000.)
report["redis_commands_per_job_whole_run"] = (a["redis_commands"] - b["redis_commands"]) / jobs
report["redis_subscriptions_per_job"] = (a["redis_subscriptions"] - b["redis_subscriptions"]) / jobs
json.dump(report, open(path, "w"), indent=2)
PY
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  psql "$PG_URL/postgres" -qc "drop database $db" >/dev/null || true
  unpin
}

# The database's own floor under the scale-out runs: PostgreSQL alone on the server's core,
# committing the completion's UPDATE … RETURNING from as many connections as the two instances'
# publishers, ROWS rows a transaction (1: every completion its own commit, as 4 publishers mostly
# make it; 10: the batches 32 publishers make). pgbench is PostgreSQL's own load tool.
pg_floor_run() { # rows rep
  local rows=$1 rep=$2 db=handoff_pgfloor_$RANDOM$RANDOM clients=$((2 * SCALE_PUBLISHERS)) ids= i tps
  say "PostgreSQL alone: $rows row(s) a transaction, $clients connections, run $rep"
  bench_dbs+=("$db")
  psql "$PG_URL/postgres" -qc "create database $db" >/dev/null
  psql "$PG_URL/$db" -qc "create table jobs (id text primary key, status text not null,
      move_url text, completed_at bigint);
    insert into jobs select 'job' || g, 'pending', null, null from generate_series(1, 500000) g" >/dev/null
  for i in $(seq 0 $((rows - 1))); do ids+="${ids:+, }'job' || (:a + $i)"; done
  printf '\\set a random(1, 499990)\nUPDATE jobs SET status = %s, move_url = %s, completed_at = 1 WHERE id IN (%s) AND status <> %s RETURNING id, status, move_url, completed_at;\n' \
    "'complete'" "'/done'" "$ids" "'gone'" >"$OUT/pgfloor.sql"
  pin postgres
  tps=$(taskset -c "$CLIENT_CPU" pgbench "$PG_URL/$db" -n -M prepared -f "$OUT/pgfloor.sql" \
    -c "$clients" -j 1 -T 5 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p') || tps=
  unpin
  psql "$PG_URL/postgres" -qc "drop database $db" >/dev/null || true
  python3 -c 'import json, sys; tps, rows = float(sys.argv[1] or 0), int(sys.argv[2]); json.dump({"completions_per_sec": tps * rows, "transactions_per_sec": tps, "rows": rows, "ok": tps > 0, "delivered": 0, "expected": 0, "duplicates": 0}, open(sys.argv[3], "w"))' \
    "$tps" "$rows" "$OUT/json/pg-floor-rows$rows-distinct-$clients-$rep.json"
}

capacity_run() { # n instances: the whole fleet on this machine, client split into processes
  local n=$1 k=$2 db pids=() urls= i port parts json
  json="$OUT/json/capacity-handoff-distinct-$n-1.json"
  # Each client process stays well under the 20,000 open files a process may hold.
  parts=$(((n + 15999) / 16000))
  db=handoff_bench_$RANDOM$RANDOM
  bench_dbs+=("$db")
  rm -f "$OUT/capacity.pg"
  psql "$PG_URL/postgres" -qc "create database $db" >/dev/null
  say "capacity: $n streams over $k Handoff instances on PostgreSQL + Redis, $parts client processes"
  for i in $(seq "$k"); do
    PORT=$((PORT + 1))
    # 8 connections each: 6 instances take at most 48 of PostgreSQL's 100.
    pids+=("$(start_member "$PORT" "$db" "bench-$db" "$OUT/capacity.log" HANDOFF_DB_POOL=8)")
    fleet_pids+=("${pids[-1]}")
    urls+="${urls:+,}http://127.0.0.1:$PORT"
    wait_port "$PORT"
  done
  "$bench_bin" --handoff "$urls" --token "$TOKEN" -n "$n" --mode distinct --processes "$parts" \
    --timeout 300 --leave-on-result --label capacity \
    --server-pid "$(IFS=,; echo "${pids[*]}")" --json "$json" \
    --on-opened "psql '$PG_URL/$db' -Atc \"select count(*) from pg_stat_activity where datname = '$db'\" >$OUT/capacity.pg" ||
    echo "bench.sh: capacity run FAILED (see the table above)" >&2
  python3 - "$json" "$OUT/capacity.pg" "$k" "$parts" <<'PY' || true
import json, sys
path, pg, k, parts = sys.argv[1:]
report = json.load(open(path))
report["pg_connections_at_peak"] = int(open(pg).read().strip() or 0)
report["instances"], report["processes"] = int(k), int(parts)
json.dump(report, open(path, "w"), indent=2)
PY
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  psql "$PG_URL/postgres" -qc "drop database $db" >/dev/null || true
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
      one_run nchan-redis "$n" "$mode" "$rep"
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
  if [ -n "$MANY_N" ]; then
    PUBLISHERS=$MANY_PUBLISHERS
    for name in handoff nchan nchan-redis; do one_run "$name" "$MANY_N" distinct "$rep"; done
    PUBLISHERS=4
  fi
  if [ -n "$BATCH_N" ]; then
    BATCH=$BATCH_SIZE
    one_run handoff "$BATCH_N" distinct "$rep"
    one_run nchan "$BATCH_N" distinct "$rep"
    BATCH=0
    # The reference, in the same run even when the MANY_N runs are skipped.
    if [ "$MANY_N" != "$BATCH_N" ] || [ "$MANY_PUBLISHERS" != 32 ]; then
      PUBLISHERS=32
      one_run nchan "$BATCH_N" distinct "$rep"
      PUBLISHERS=4
    fi
  fi
  if [ -n "$SCALE_N" ]; then
    scale_run handoff "$SCALE_N" "$rep"
    scale_run nchan "$SCALE_N" "$rep"
    pg_floor_run 1 "$rep"
    pg_floor_run 10 "$rep"
  fi
  if [ -n "$FLEET_N" ]; then
    for k in $FLEET_INSTANCES; do
      for fanout in single routed; do fleet_run "$k" "$fanout" "$FLEET_N" "$rep"; done
    done
  fi
  if [ "$PEERS" = 1 ]; then
    for name in python node-plain better-sse; do
      for mode in distinct single; do one_run "$name" "$PEER_N" "$mode" "$rep"; done
    done
  fi
done
# Read before the capacity rehearsal, which loads both cores itself.
load=$(cut -d' ' -f1-3 /proc/loadavg)
[ -z "$CAPACITY_N" ] || capacity_run "$CAPACITY_N" "$CAPACITY_INSTANCES"

[ "$TABLE" = 1 ] || { say "done (TABLE=0: BENCHMARKS.md left alone; figures in $OUT/json)"; exit 0; }
say "writing BENCHMARKS.md"
machine="$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GB RAM, Linux $(uname -r)"
python3 scripts/bench_table.py "$OUT/json" BENCHMARKS.md \
  --runs "$RUNS" --machine "$machine" --load "$load" --workers "$WORKERS" \
  --commit "$(git rev-parse --short HEAD)$(git diff --quiet -- . ':!BENCHMARKS.md' || echo '+changes')" \
  --command "bash scripts/bench.sh$( [ "$RUNS" = 3 ] || echo " (RUNS=$RUNS)" )"
say "done: BENCHMARKS.md"
