#!/usr/bin/env python3
"""The server's memory for jobs watched on shared streams against one stream per job.

Starts a release `handoff` (pinned to one core, fresh SQLite file) for each of two runs:
  shared: STREAMS streams on /sse/watch, each watching 32 jobs;
  single: 32 x STREAMS streams on /sse/connect, one job each.
Both watch the same number of jobs. Prints the growth of the server's VmRSS per watched job and per
stream, as JSON lines. Loopback only; every connection is closed at the end.

  python3 scripts/shared_stream_memory.py [--streams 300] [--binary target/release/handoff]
"""

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request

WATCH = 32


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def create_jobs(base, token, count):
    ids = []
    for _ in range(count):
        req = urllib.request.Request(f"{base}/api/jobs", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req) as resp:
            ids.append(json.load(resp)["id"])
    return ids


async def open_stream(port, path, opened):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    buf = b""
    while b'"status":"connect"' not in buf:
        chunk = await reader.read(4096)
        if not chunk:
            raise RuntimeError(f"stream {path} closed before its connect event: {buf[:200]!r}")
        buf += chunk
    opened.append(writer)


async def open_all(port, paths, concurrency=100):
    opened = []
    gate = asyncio.Semaphore(concurrency)

    async def one(path):
        async with gate:
            await open_stream(port, path, opened)

    await asyncio.gather(*(one(p) for p in paths))
    return opened


def run(binary, streams, mode, cpu):
    port = 20000 + secrets.randbelow(10000)
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, HANDOFF_ADDR=f"127.0.0.1:{port}",
                   DATABASE_URL=f"sqlite://{folder}/handoff.db", HANDOFF_API_TOKEN=token,
                   HANDOFF_SSE_TIMEOUT_SECS="600", HANDOFF_WORKERS="1", RUST_LOG="warn",
                   HANDOFF_MAX_STREAMS_PER_CLIENT=str(WATCH * streams + 10))
        server = subprocess.Popen(["taskset", "-c", str(cpu), binary], env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"{base}/healthz")
                    break
                except OSError:
                    time.sleep(0.1)
            ids = create_jobs(base, token, WATCH * streams)
            if mode == "shared":
                paths = ["/sse/watch?ids=" + ",".join(ids[i:i + WATCH])
                         for i in range(0, len(ids), WATCH)]
            else:
                paths = [f"/sse/connect/{i}" for i in ids]
            time.sleep(0.5)
            before = rss_kb(server.pid)
            loop = asyncio.new_event_loop()
            opened = loop.run_until_complete(open_all(port, paths))
            time.sleep(0.5)
            after = rss_kb(server.pid)
            for writer in opened:
                writer.close()
            loop.close()
            grown = (after - before) * 1024
            return {"mode": mode, "streams": len(paths), "jobs": len(ids),
                    "bytes_per_job": round(grown / len(ids)),
                    "bytes_per_stream": round(grown / len(paths))}
        finally:
            server.terminate()
            server.wait(timeout=10)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--binary", default="target/release/handoff")
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for _ in range(args.runs):
        for mode in ("shared", "single"):
            print(json.dumps(run(args.binary, args.streams, mode, args.cpu)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
