"""The engine in a process of its own (CFG_ENGINE_PROCESS), as vLLM's engine core behind its API server.

The engine process owns the models, their engines and the compute thread; the API process does HTTP,
validation, PNG and JSON. They talk over two pipes, one each way, in msgpack (app/engine/wire.py): requests,
aborts and calls (warmup, start, stop, guidance_curve) one way; each tick's outputs (uint8 images, progress,
stats) and every engine's state (accepting, queue, rows free, error) the other, sent from the compute thread as
the in-process engine hands them to its client.

`EngineProcess` starts it and routes what comes back; `ProcessClient` is one model's `EngineClient` over it,
so the routes do not change. An engine process that dies fails every request it held as `closed` (the API
answers 503), and its clients report why (/healthz and /readyz: 503 with the exit code or signal). The engine
process ignores SIGINT and SIGTERM (the API process drains it: Service.drain stops each engine through its
client) and exits when the API process's pipe closes, so it never outlives the API.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from app.engine.admission import EngineClosedError, refuse_unless_open
from app.engine.client import StatsHook, Streams
from app.engine.compute import SharedCompute
from app.engine.engine import Engine
from app.engine.outputs import CurvePoint, EngineOutputs, Failed, Finished, RequestOutput
from app.engine.scheduler import ANONYMOUS
from app.engine.wire import decode, encode
from app.sampling import SampleSpec
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


# --- the API process's side ----------------------------------------------------------------------------------


class EngineProcess:
    """The engine process as the API process sees it: start() spawns it and returns the models it loaded; each
    model's ProcessClient sends through it; a thread reads what comes back and hands it to the event loop."""

    def __init__(self, build: Build) -> None:
        self._build = build
        self.clients: dict[str, ProcessClient] = {}
        self.error: str | None = None  # why the process is gone, where it died
        self.memory: dict[str, float] | None = None  # the device memory it holds (app.sampling.memory_in_use)
        self._context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._process: Any = None
        self._outbox: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Future[dict[str, dict[str, Any]]] | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._closing = False
        self._gone = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self, on_stats: Callable[[str], StatsHook | None] = lambda name: None) -> dict[str, Any]:
        """Spawn the engine process and wait for its models: name -> GET /v1/models entry. Raises RuntimeError
        with the engine process's error where loading failed or the process died."""
        self._loop = asyncio.get_running_loop()
        to_engine, self._outbox = self._context.Pipe(duplex=False)
        from_engine, to_api = self._context.Pipe(duplex=False)
        self._process = self._context.Process(
            target=engine_main, args=(to_engine, to_api, self._build), name="cfg-engine", daemon=True
        )
        self._process.start()
        to_engine.close()  # this process keeps only its ends: the other's exit closes the pipes
        to_api.close()
        self._started = self._loop.create_future()
        threading.Thread(target=self._read, args=(from_engine,), name="engine-outputs", daemon=True).start()
        infos = await self._started
        for name in infos:
            self.clients[name] = ProcessClient(self, name, on_stats(name))
        return infos

    def send(self, message: Any) -> None:
        if self._outbox is None or self.error is not None:
            raise EngineClosedError(f"the engine failed: {self.error or 'the engine process has not started'}")
        try:
            self._outbox.send_bytes(encode(message))
        except OSError as exc:
            raise EngineClosedError(f"the engine failed: the engine process is unreachable ({exc})") from exc

    async def call(self, name: str, method: str, *args: Any) -> Any:
        assert self._loop is not None
        call_id = next(self._call_ids)
        self._calls[call_id] = future = self._loop.create_future()
        try:
            self.send(("call", name, call_id, method, args))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _read(self, inbox: Connection) -> None:
        """In a thread: each message from the engine process, decoded here (off the event loop), handed to it."""
        assert self._loop is not None
        while True:
            try:
                message = decode(inbox.recv_bytes())
            except (EOFError, OSError):
                break
            try:
                self._loop.call_soon_threadsafe(self._dispatch, message)
            except RuntimeError:  # the event loop has closed
                return
        try:
            self._loop.call_soon_threadsafe(self._ended)
        except RuntimeError:
            pass

    def _dispatch(self, message: tuple) -> None:
        kind, *args = message
        if kind == "outputs":
            name, outputs, state = args
            client = self.clients.get(name)
            if client is not None:
                client.receive(outputs, state)
        elif kind == "state":  # the engines' states, and with the periodic one the device memory
            for name, state in args[0].items():
                if (client := self.clients.get(name)) is not None:
                    client.state = state
            if len(args) > 1:
                self.memory = args[1]
        elif kind == "reply":
            call_id, ok, value = args
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                future.set_result(value) if ok else future.set_exception(RuntimeError(value))
        elif kind == "models":
            if self._started is not None and not self._started.done():
                self._started.set_result(args[0])
        elif kind == "failed":
            if self._started is not None and not self._started.done():
                self._started.set_exception(RuntimeError(args[0]))

    def _ended(self) -> None:
        """The engine process's pipe closed: it exited, or was killed."""
        self._process.join(timeout=5)
        code = self._process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        reason = f"the engine process (pid {self._process.pid}) {how}"
        if not self._closing:
            self.error = reason
            log.error("%s: every request it held fails with 503", reason)
        for client in self.clients.values():
            client.streams.fail_all("closed", f"{reason} before this request finished")
        for future in self._calls.values():
            if not future.done():
                future.set_exception(RuntimeError(reason))
        if self._started is not None and not self._started.done():
            self._started.set_exception(RuntimeError(reason))
        self._gone.set()

    async def close(self, timeout_s: float = 10.0) -> None:
        """After the engines stopped (each client's shutdown): close the pipe, so that the process exits; kill
        it if it has not within timeout_s."""
        self._closing = True
        if self._process is None or self._process.pid is None or self._started is None:  # never ran
            return
        if self._outbox is not None:
            self._outbox.close()
        try:
            await asyncio.wait_for(self._gone.wait(), timeout_s)
        except TimeoutError:
            log.warning("the engine process did not exit within %g s: killed", timeout_s)
            os.kill(self._process.pid, signal.SIGKILL)
            await asyncio.to_thread(self._process.join, 5)


class ProcessClient:
    """One model's EngineClient over the engine process. What the routes read synchronously (accepting, the
    queue's depth, rows free, health) comes from the engine's state as last sent, with the requests this client
    sent that the engine has not seen yet counted as queued."""

    def __init__(self, process: EngineProcess, name: str, on_stats: StatsHook | None = None) -> None:
        self.process = process
        self.name = name
        self.streams = Streams(on_stats)
        self.state: dict[str, Any] = {
            "accepting": False, "healthy": False, "error": None, "queue_depth": 0, "active": 0, "free_rows": 0,
            "received": 0,
        }  # fmt: skip
        self._sent = 0
        self._ids = itertools.count()

    def add(
        self,
        spec: SampleSpec,
        *,
        progress: bool = False,
        limit_queue: bool = True,
        priority: str = "interactive",
        client: str = ANONYMOUS,
        timeout_s: float | None = None,
    ) -> str:
        refuse_unless_open(priority, self.error, self.accepting)
        request_id = f"{self.name}-{next(self._ids)}"
        options = {
            "progress": progress, "limit_queue": limit_queue, "priority": priority, "client": client,
            "timeout_s": timeout_s,
        }  # fmt: skip
        self.streams.open(request_id)
        try:
            self.process.send(("add", self.name, request_id, spec, options))
        except BaseException:
            self.streams.close(request_id)
            raise
        self._sent += 1
        return request_id

    def abort(self, request_id: str) -> None:
        try:
            self.process.send(("abort", self.name, request_id))
        except EngineClosedError:  # gone: its stream has its end already
            pass
        self.streams.cancel(request_id)

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        return self.streams.stream(request_id)

    async def result(self, request_id: str) -> Finished | Failed:
        return await self.streams.result(request_id)

    def receive(self, outputs: EngineOutputs, state: dict[str, Any]) -> None:
        self.state = state
        self.streams.deliver(outputs)

    async def guidance_curve(self, spec: SampleSpec) -> list[CurvePoint]:
        return list(await self.process.call(self.name, "guidance_curve", spec))

    def check_health(self) -> bool:
        return self.process.error is None and bool(self.state["healthy"])

    @property
    def error(self) -> str | None:
        return self.process.error or self.state["error"]

    @property
    def accepting(self) -> bool:
        return self.process.error is None and bool(self.state["accepting"])

    @property
    def queue_depth(self) -> int:
        return int(self.state["queue_depth"]) + max(0, self._sent - self.state["received"])

    @property
    def active_requests(self) -> int:
        return int(self.state["active"])

    @property
    def free_rows(self) -> int:
        return int(self.state["free_rows"]) if self._sent == self.state["received"] and self.accepting else 0

    async def warmup(self, spec: SampleSpec) -> None:
        await self.process.call(self.name, "warmup", spec)

    async def start(self) -> None:
        await self.process.call(self.name, "start")

    async def shutdown(self, drain: bool = True, timeout_s: float = math.inf) -> None:
        if self.process.error is None:
            try:
                await self.process.call(self.name, "stop", drain, timeout_s)
            except (EngineClosedError, RuntimeError) as exc:  # it died meanwhile: its streams have ended
                log.warning("%s: stopping its engine: %s", self.name, exc)
