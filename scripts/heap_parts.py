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

# (part, pattern), tried on each frame from the allocation outwards. heaptrack names an inlined
# frame by its function and file only ("with_capacity (bytes_mut.rs)"), and a generic one with
# its type parameters, which may name other modules ("new<>, handoff::startup::deadlines::…"):
# so the patterns look at the file, or at the function's own name.
PARTS = [
    ("actix-http's read and write buffers", r"\(bytes_mut\.rs\)$"),
    ("tokio's I/O registration", r"\((registration_set|registration|poll_evented)\.rs\)$"),
    ("the hub: the job's entry and the stream's subscription", r"\(hub\.rs\)$|^handoff::hub::"),
    ("fan-out routes", r"\(fanout\.rs\)$|^handoff::fanout::"),
    ("the deadline wrapper's state (one per connection)", r"\(deadlines\.rs\)$"),
    ("actix-http's per-connection extensions map (holds the deadline wrapper's state)",
     r"\(extensions\.rs\)$"),
    ("actix-http's graceful-shutdown signal", r"^(graceful_shutdown|notified)\b"),
    ("the SSE body (actix-web-lab's, boxed by actix-web)", r"\((message_body|sse)\.rs\)$"),
    ("the connection's task (actix-http's dispatcher and what it holds)",
     r"^(bind_local|spawn_local)\b"),
    ("SQLite's page cache (the jobs made for the run, not the streams)", r"\(sqlite3\.c\)$"),
]


def part_of(stack):
    for frame in reversed(stack.split(";")):
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
