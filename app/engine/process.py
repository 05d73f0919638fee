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
import threading
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import Any

from app.engine.admission import EngineClosedError, refuse_unless_open
from app.engine.client import StatsHook, Streams
from app.engine.outputs import CurvePoint, EngineOutputs, Failed, Finished, RequestOutput
from app.engine.process_main import Build, engine_main
from app.engine.scheduler import ANONYMOUS
from app.engine.wire import decode, encode
from app.sampling import SampleSpec

log = logging.getLogger("uvicorn.error")

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
