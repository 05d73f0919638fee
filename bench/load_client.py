"""A closed-loop load generator for bench/bench_gpu.py, in a process of its own so that the clients' Python
does not share the server's event loop or GIL:

    python3 bench/load_client.py '["http://127.0.0.1:8777", 64, 20, 3.0, 8.0]'   # url, clients, steps, warm, window
    python3 bench/load_client.py '["http://127.0.0.1:8777", 64, 20, 3.0, 8.0, 4]'  # ... 4 images per request

prints one JSON line: images/s, p50, p99 and mean latency, the responses counted in the window and all completed.

Each client is one keep-alive HTTP/1.1 connection on asyncio's streams, posting one-image requests back to
back: no HTTP library. httpx's pool was the bottleneck at 64 connections: against a server with a
zero-cost forward on 2 cores it made 112 requests/s where wrk made 501, and its p99 went to 2.3 s
(docs/benchmarks.md); this client keeps up with wrk there. It imports no torch, so it starts at once.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlsplit


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, body: bytes) -> int:
    """One POST /generate on an open connection; returns the status, after reading the whole response."""
    writer.write(
        b"POST /generate HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return status


def request_body(steps: int, images: int = 1) -> dict:
    """What every client posts (with its own class and seed): constant CFG s = 3 with dpmpp_2m, and no step cache
    named as none: the raw loops the servers are compared with draw uncached, as did the figures recorded before
    a checkpoint had a default cache (the shipped one's, uncond every 2, would run 25% fewer rows here)."""
    return {
        "steps": steps,
        "sampler": "dpmpp_2m",
        "guidance_scale": 3.0,
        "schedule": {"kind": "constant"},
        "num_images": images,
        "cache": {"kind": "none"},
    }


async def closed_loop(url: str, clients: int, steps: int, warm: float, window: float, images: int = 1) -> dict:
    parts = urlsplit(url)
    body = request_body(steps, images)
    done: list[tuple[float, float]] = []  # (finish time, latency)
    stop = time.perf_counter() + warm + window
    start = stop - window

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 22)
        i = 0
        try:
            while time.perf_counter() < stop:
                payload = json.dumps({**body, "class_label": (k + i) % 10, "seed": k * 100000 + i * images}).encode()
                t0 = time.perf_counter()
                status = await post(reader, writer, parts.netloc, payload)
                if status != 200:
                    raise RuntimeError(f"POST /generate answered {status}")
                done.append((time.perf_counter(), time.perf_counter() - t0))
                i += 1
        finally:
            writer.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    inside = sorted(lat for end, lat in done if start <= end <= stop)
    q = statistics.quantiles(inside, n=100) if len(inside) >= 2 else [float("nan")] * 99
    return {
        "images_per_s": images * len(inside) / window,
        "p50": q[49],
        "p99": q[98],
        "mean": statistics.fmean(inside) if inside else float("nan"),
        "responses": len(inside),
        "completed": len(done),  # the whole run's, warm-up included
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(closed_loop(*json.loads(sys.argv[1])))))
