#!/usr/bin/env bash
# What a scale-out run asked of Redis and PostgreSQL, and the CPU time each part of the fleet
# spent: writes one line of counters to FILE (the names are in the echo at the end).
# scripts/bench.sh calls it once every stream is open (through the bench tool's --on-opened) and
# again after the run; the differences cover the completions alone.
#
#   bash scripts/bench_counters.sh FILE DATABASE|- BYSTANDER_PID|- FLEET_PIDS(comma-separated)
#
# PostgreSQL's statistics reach pg_stat_database within a second of a transaction, hence the
# pause first. Environment: REDIS_URL, PG_URL (as in bench.sh).
set -euo pipefail
file=$1 db=${2:--} bystander=${3:--} fleet=${4:-}
sleep 1.2

cpu_ns() { # pid...: CPU time of every thread of these processes, in ns (schedstat's first field)
  local pid sum=0 t
  for pid in "$@"; do
    for t in /proc/"$pid"/task/*/schedstat; do
      [ -r "$t" ] && sum=$((sum + $(cut -d' ' -f1 "$t" 2>/dev/null || echo 0)))
    done
  done
  echo "$sum"
}

redis=$(redis-cli -u "$REDIS_URL" info commandstats |
  awk -F'[=,]' '/^cmdstat_/{s+=$2} END{print s+0}')
pg=0
[ "$db" = - ] || pg=$(psql "$PG_URL/$db" -Atc \
  "select xact_commit + xact_rollback from pg_stat_database where datname = '$db'")
by=0
[ "$bystander" = - ] || by=$(cpu_ns "$bystander")
# shellcheck disable=SC2046 # pid lists
echo "redis_commands=$redis pg_transactions=$pg bystander_ns=$by" \
  "postgres_ns=$(cpu_ns $(pgrep -x postgres)) redis_ns=$(cpu_ns $(pgrep -x redis-server))" \
  "fleet_ns=$(cpu_ns ${fleet//,/ }) clock_ns=$(date +%s%N)" >"$file"
