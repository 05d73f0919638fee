"""`python -m tests.held_serve`: `python -m app.serve`, with its startup held at two points until the test
lets it go on, so that a test can look at a loading and a warming-up server for as long as it needs.

Stand-in: a slow startup. The real ones (a large checkpoint's load, int8 calibration and compiling in the
warmup) take from seconds to minutes depending on the machine's load, never on demand. Everything else is
the real server: the checkpoint is loaded and warmed up for real once released.

HOLD_DIR names a folder. Loading each checkpoint (in the compute thread, as the real load runs) waits for
the file `load` in it; if that file says `fail`, the load raises instead. Each model's warmup waits for
the file `warmup`.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import app.loading
from app import serve
from app.engine import Engine

HOLD_DIR = Path(os.environ["HOLD_DIR"])
real_load, real_warmup = app.loading.load_for_serving, Engine.warmup


def held_load(*args, **kwargs):
    release = HOLD_DIR / "load"
    while not release.exists():
        time.sleep(0.05)
    if release.read_text().strip() == "fail":
        raise RuntimeError("the test made this load fail")
    return real_load(*args, **kwargs)


async def held_warmup(self, spec):
    while not (HOLD_DIR / "warmup").exists():
        await asyncio.sleep(0.05)
    await real_warmup(self, spec)


app.loading.load_for_serving = held_load
Engine.warmup = held_warmup  # type: ignore[method-assign]  # held for the test, in this server's process only

if __name__ == "__main__":
    serve.main()
