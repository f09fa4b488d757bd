#!/usr/bin/env bash
# What a scale-out run asked of Redis and PostgreSQL, and of an instance that holds no stream:
# writes "REDIS_COMMANDS PG_TRANSACTIONS CPU_NS CLOCK_NS" to FILE. scripts/bench.sh calls it once
# every stream is open (through the bench tool's --on-opened) and again after the run.
#
#   bash scripts/bench_counters.sh FILE [DATABASE] [PID]
#
# PostgreSQL's statistics reach pg_stat_database within a second of a transaction, hence the
# pause first. Environment: REDIS_URL, PG_URL (as in bench.sh).
set -euo pipefail
file=$1 db=${2:-} pid=${3:-}
pg=0 cpu=0
sleep 1.2
redis=$(redis-cli -u "$REDIS_URL" info commandstats |
  awk -F'[=,]' '/^cmdstat_/{s+=$2} END{print s+0}')
[ -z "$db" ] || pg=$(psql "$PG_URL/$db" -Atc \
  "select xact_commit + xact_rollback from pg_stat_database where datname = '$db'")
# Every thread's CPU time, in ns (the first field of schedstat).
[ -z "$pid" ] || cpu=$(cat /proc/"$pid"/task/*/schedstat | awk '{s+=$1} END{print s+0}')
echo "$redis $pg $cpu $(date +%s%N)" >"$file"
