#!/usr/bin/env python3
"""Bytes per open stream, by part: heaptrack's leaked bytes by stack (flame-graph lines,
`frame;frame;… bytes`, root first) of a run killed with N streams open, minus a baseline run's.

    python3 scripts/heap_parts.py BASE.stacks OPEN.stacks N

A stack belongs to the part of the frame nearest its allocation that one of PARTS names: a timer
boxed by the deadline wrapper counts as the wrapper's, not as the connection task it runs in.
"""
import re
import sys
from collections import defaultdict

# (part, pattern on one frame), tried on each frame from the allocation outwards.
PARTS = [
    ("actix-http's read and write buffers (BytesMut)", r"bytes::bytes_mut::BytesMut"),
    ("the hub: the job's entry and the stream's subscription", r"handoff::hub::"),
    ("fan-out routes (Redis channel per watched job)", r"handoff::fanout::"),
    ("the deadline wrapper: connection phase and timers", r"handoff::startup::deadlines::"),
    ("limits: the stream's place and its end", r"handoff::limits::"),
    ("the SSE body and the stream's own state", r"handoff::routes::sse|actix_web_lab::sse"),
    ("metrics", r"handoff::metrics::|prometheus_client::"),
    ("the store's reads", r"handoff::store::|sqlx"),
    ("Handoff, elsewhere", r"handoff::"),
    ("tokio's I/O registration", r"tokio::runtime::io::"),
    ("the connection's task (actix-http's dispatcher and what it holds)", r"tokio::runtime::task::"),
    ("actix-http, elsewhere (request head, extensions)", r"actix_http::"),
    ("actix-web (request, app data)", r"actix_web::|actix_router::"),
    ("actix-server (accept)", r"actix_server::"),
    ("tokio, elsewhere", r"tokio::"),
]


def part_of(stack):
    frames = stack.split(";")
    for frame in reversed(frames):
        for part, pattern in PARTS:
            if re.search(pattern, frame):
                return part
    return "other"


def by_part(path):
    totals = defaultdict(int)
    with open(path) as lines:
        for line in lines:
            stack, _, cost = line.rstrip("\n").rpartition(" ")
            if stack:
                totals[part_of(stack)] += int(cost)
    return totals


def main():
    base, opened, n = by_part(sys.argv[1]), by_part(sys.argv[2]), int(sys.argv[3])
    rows = [(part, (opened.get(part, 0) - base.get(part, 0)) / n)
            for part in set(base) | set(opened)]
    rows = [row for row in rows if abs(row[1]) >= 1]
    rows.sort(key=lambda row: -row[1])
    print(f"| part | bytes per stream (N = {n:,}) |")
    print("|---|---:|")
    for part, per in rows:
        print(f"| {part} | {per:,.0f} |")
    print(f"| **all asked for** | **{sum(per for _, per in rows):,.0f}** |")


main()
