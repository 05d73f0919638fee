"""The engine process's own side (CFG_ENGINE_PROCESS; app/engine/process.py is the API process's): its entry
point, which builds the models' engines on its compute thread, reads requests, aborts and calls from the API
process's pipe, and sends each tick's outputs and every engine's state back on the other, from the compute thread
as the in-process engine hands them to its client. It ignores SIGINT and SIGTERM (the API process drains it) and
exits when the API process's pipe closes, so it never outlives the API.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from app.engine.admission import EngineClosedError
from app.engine.compute import SharedCompute
from app.engine.engine import Engine
from app.engine.outputs import EngineOutputs, Failed
from app.engine.wire import decode, encode
from app.sampling.device import memory_in_use

log = logging.getLogger("uvicorn.error")

# Builds the engines in the engine process, on its compute thread: name -> (engine, its GET /v1/models entry).
# A picklable callable (a module-level function, or a functools.partial of one): it crosses to the new process.
Build = Callable[[SharedCompute], Awaitable[dict[str, tuple[Engine, dict[str, Any]]]]]

CALLS = ("warmup", "start", "stop", "guidance_curve")  # the engine methods a client may call across
STATE_EVERY_S = 0.2  # the engines' state is sent with every tick's outputs, and at least this often


def engine_state(engine: Engine, received: int) -> dict[str, Any]:
    """What the API reads of an engine without asking. received: the requests sent to it that it has seen (added,
    or refused: a refused one is answered on its stream)."""
    return {
        "accepting": engine.accepting,
        "healthy": engine.check_health(),
        "error": engine.error,
        "queue_depth": engine.queue_depth,
        "active": engine.active_requests,
        "free_rows": engine.free_rows,
        "received": received,
    }


# --- the engine process ------------------------------------------------------------------------------------


def engine_main(inbox: Connection, outbox: Connection, build: Build) -> None:
    """The engine process's entry point (multiprocessing, spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the API drains
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="engine process: %(levelname)s %(message)s", stream=sys.stderr)
    asyncio.run(_EngineSide(inbox, outbox).run(build))


class _EngineSide:
    def __init__(self, inbox: Connection, outbox: Connection) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.engines: dict[str, Engine] = {}
        self.received: dict[str, int] = {}
        self._send_lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()

    def send(self, message: Any) -> None:
        self.send_built(lambda: message)

    def send_built(self, build: Callable[[], Any]) -> None:
        """Build the message and send it under one lock: of two messages carrying an engine's state, the one sent
        later has the newer state."""
        with self._send_lock:
            try:
                self.outbox.send_bytes(encode(build()))
            except OSError:  # the API process has gone: the reader sees it too and ends this process
                pass

    def state(self, name: str) -> dict[str, Any]:
        return engine_state(self.engines[name], self.received[name])

    async def run(self, build: Build) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        threading.Thread(target=self._read, args=(loop, inbox), name="engine-inbox", daemon=True).start()
        compute = SharedCompute()
        try:
            built = await build(compute)
        except Exception as exc:
            log.exception("loading the models failed")
            self.send(("failed", f"{type(exc).__name__}: {exc}"))
            compute.shutdown()
            return
        for name, (engine, _) in built.items():
            self.engines[name], self.received[name] = engine, 0
            engine.connect(partial(self._outputs, name))
        self.send(("models", {name: info for name, (_, info) in built.items()}))
        beat = asyncio.create_task(self._beat())
        while (message := await inbox.get()) is not None:
            self._handle(message)
        beat.cancel()  # the API process closed its pipe: stop whatever still runs, at once
        for engine in self.engines.values():
            await engine.stop(drain=False)
        compute.shutdown()

    def _read(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[Any]) -> None:
        """In a thread: each message from the API process, decoded. Requests and aborts go to their engine from
        here (add_request and abort_request only queue a message for the compute thread, and only this thread
        calls them): no hop through the event loop on a request's way in. Calls go to the event loop; None at
        the pipe's end."""
        while True:
            try:
                message = decode(self.inbox.recv_bytes())
            except (EOFError, OSError):
                loop.call_soon_threadsafe(inbox.put_nowait, None)
                return
            if message[0] in ("add", "abort"):
                self._handle(message)
            else:
                loop.call_soon_threadsafe(inbox.put_nowait, message)

    def _outputs(self, name: str, outputs: EngineOutputs) -> None:
        """In the compute thread, after each tick: the outputs and the engine's state, as they are."""
        self.send_built(lambda: ("outputs", name, outputs, self.state(name)))

    async def _beat(self) -> None:
        device = next(iter(self.engines.values())).device
        while True:
            self.send_built(lambda: ("state", {name: self.state(name) for name in self.engines}, memory_in_use(device)))
            await asyncio.sleep(STATE_EVERY_S)

    def _handle(self, message: tuple) -> None:
        try:
            self._act(message)
        except Exception:  # a message this side can't act on is logged; the engines go on
            log.exception("a message from the API process failed: %.200r", message)

    def _act(self, message: tuple) -> None:
        kind, name, *args = message
        engine = self.engines[name]
        if kind == "add":
            request_id, spec, options = args
            self.received[name] += 1
            try:
                engine.add_request(request_id, spec, **options)
            except (EngineClosedError, ValueError) as exc:  # its client checked these; the state moved since
                failed = Failed(request_id, "closed" if isinstance(exc, EngineClosedError) else "invalid", str(exc))
                self.send_built(lambda: ("outputs", name, EngineOutputs((failed,)), self.state(name)))
        elif kind == "abort":
            engine.abort_request(args[0])
        elif kind == "call":
            call_id, method, call_args = args
            task = asyncio.create_task(self._call(name, call_id, method, call_args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, name: str, call_id: int, method: str, args: tuple) -> None:
        engine = self.engines[name]
        try:
            if method not in CALLS:
                raise ValueError(f"{method!r} is not an engine call ({', '.join(CALLS)})")
            value = await getattr(engine, method)(*args)
        except Exception as exc:
            log.exception("%s's %s failed", name, method)
            self.send(("reply", call_id, False, f"{type(exc).__name__}: {exc}"))
        else:
            self.send(("reply", call_id, True, value))
        self.send_built(lambda: ("state", {name: self.state(name)}))
