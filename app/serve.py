"""Run the service: python -m app.serve --host 127.0.0.1 --port 8000 (settings from CFG_* variables).

The port opens at once. /healthz answers 200 from then on while the process can serve; /readyz answers 503
(`loading`, then `warming up`) until the models are loaded and warm, and new requests get 503 with
Retry-After until then. SIGTERM, or a first Ctrl-C, drains with the port still open: new requests and
/readyz get 503 (`draining`) while the requests and jobs in flight finish, for up to CFG_DRAIN_TIMEOUT_S;
then the port closes, responses still being sent get CLOSE_TIMEOUT_S, and the process exits with status 0.
A second Ctrl-C stops at once, dropping whatever is in flight. A startup that fails exits with status 1.
SIGUSR1 writes every thread's stack to stderr (a process that does not stop can say where it waits).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import signal
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from app.api.service import Service
from app.config import Settings
from app.main import create_app
from app.models import CheckpointError

# After the drain, how long the connections still sending a response may take before they are closed.
CLOSE_TIMEOUT_S = 30


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, except that a signal drains the service before the port closes.

    uvicorn's own handler stops listening at the first SIGTERM and only then runs the app's shutdown, so
    a client would get "connection refused" where a draining replica should answer 503. Here the signal
    handler only takes note; the server's tick (every 0.1 s, in the event loop) starts the drain and
    exits once it is done. The signal is not raised again afterwards: a drained process exits 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.drain_requested = False
        self._drained: asyncio.Future | None = None

    @property
    def service(self) -> Service:
        return self.app.state.service  # set by the lifespan, which has run before the first tick

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler interrupts the event loop's thread anywhere: it sets flags and nothing else.
        if not self.drain_requested:
            self.drain_requested = True
        elif sig == signal.SIGINT:  # a second Ctrl-C: stop now
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self._drained is None:
            self._drained = self.service.drain()
        if (self._drained is not None and self._drained.done()) or self.service.phase == "failed":
            self.should_exit = True
        return await super().on_tick(counter)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app = create_app(Settings(), load_in_background=True)
    except ValidationError as exc:
        sys.exit(f"error: invalid CFG_* setting: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    # One process owns the model and its batching loop: scale out with replicas, not workers.
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=CLOSE_TIMEOUT_S
    )
    DrainingServer(config, app).run()
    if app.state.service.phase == "failed":
        sys.exit(1)  # the startup's error is logged above


if __name__ == "__main__":
    main()
