#!/usr/bin/env bash
# What a scale-out run asked of Redis and PostgreSQL, and the CPU time each part of the fleet
# spent: writes one line of counters to FILE (the names are in the echo at the end).
# scripts/bench.sh calls it once every stream is open (through the bench tool's --on-opened) and
# again after the run; the differences cover the completions alone.
#
#   bash scripts/bench_counters.sh FILE DATABASE|- BYSTANDER|- FLEET_PIDS(comma-separated) [WATCHER|-]
#
# BYSTANDER (a stream-less instance) and WATCHER (one holding a few streams) are a pid, or
# PID@PORT for a Handoff instance: then the messages its Redis subscriber received
# (handoff_fanout_messages_received_total, from its /metrics) are counted too.
#
# PostgreSQL's statistics reach pg_stat_database within a second of a transaction, hence the
# pause first. Environment: REDIS_URL, PG_URL (as in bench.sh).
set -euo pipefail
file=$1 db=${2:--} bystander=${3:--} fleet=${4:-} watcher=${5:--}
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

received() { # PID@PORT|PID|-: the instance's fan-out messages received, or 0 without a port
  case $1 in
    *@*) curl -fsS "http://127.0.0.1:${1#*@}/metrics" |
      awk '/^handoff_fanout_messages_received_total /{print $2; found=1} END{if (!found) print 0}' ;;
    *) echo 0 ;;
  esac
}

stats=$(redis-cli -u "$REDIS_URL" info commandstats)
redis=$(awk -F'[=,]' '/^cmdstat_/{s+=$2} END{print s+0}' <<<"$stats")
# SUBSCRIBE and UNSUBSCRIBE, sharded or not: what routing adds to each job's life.
subs=$(awk -F'[=,]' '/^cmdstat_s?(un)?subscribe:/{s+=$2} END{print s+0}' <<<"$stats")
pg=0
[ "$db" = - ] || pg=$(psql "$PG_URL/$db" -Atc \
  "select xact_commit + xact_rollback from pg_stat_database where datname = '$db'")
by=0 wa=0
[ "$bystander" = - ] || by=$(cpu_ns "${bystander%@*}")
[ "$watcher" = - ] || wa=$(cpu_ns "${watcher%@*}")
# shellcheck disable=SC2046 # pid lists
echo "redis_commands=$redis redis_subscriptions=$subs pg_transactions=$pg bystander_ns=$by watcher_ns=$wa" \
  "bystander_received=$(received "$bystander") watcher_received=$(received "$watcher")" \
  "postgres_ns=$(cpu_ns $(pgrep -x postgres)) redis_ns=$(cpu_ns $(pgrep -x redis-server))" \
  "fleet_ns=$(cpu_ns ${fleet//,/ }) clock_ns=$(date +%s%N)" >"$file"
