"""A closed-loop load generator for bench/bench_gpu.py, in a process of its own so that the clients' Python
does not share the server's event loop or GIL. It imports httpx alone (not torch), so it starts in a
fraction of a second:

    python3 bench/load_client.py '["http://127.0.0.1:8777", 64, 20, 3.0, 8.0]'   # url, clients, steps, warm, window

prints one JSON line: images/s, p50 and p99 latency, and the responses counted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time


async def closed_loop(url: str, clients: int, steps: int, warm: float, window: float) -> dict:
    import httpx

    body = {"steps": steps, "sampler": "dpmpp_2m", "guidance_scale": 3.0, "schedule": {"kind": "constant"}}
    done: list[tuple[float, float]] = []  # (finish time, latency)
    stop = time.perf_counter() + warm + window
    start = stop - window

    async def client(http, k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await http.post(f"{url}/generate", json={**body, "class_label": (k + i) % 10, "seed": k * 100000 + i})
            r.raise_for_status()
            done.append((time.perf_counter(), time.perf_counter() - t0))
            i += 1

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    inside = sorted(lat for end, lat in done if start <= end <= stop)
    q = statistics.quantiles(inside, n=100) if len(inside) >= 2 else [float("nan")] * 99
    return {"images_per_s": len(inside) / window, "p50": q[49], "p99": q[98], "responses": len(inside)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(closed_loop(*json.loads(sys.argv[1])))))
