"""ASGI apps served by uvicorn on a free port in a thread of their own (own event loop), for tests and
the benchmark: the test's loop talks to them over real sockets, as a client would."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI

from tests.fixtures.processes import free_port

START_TIMEOUT_S = 60


class ThreadServer:
    """`build` runs in the server's loop (so loop-bound clients are made there) and returns the app."""

    def __init__(self, build: Callable[[], Awaitable[FastAPI]], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._build = build
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # surfaced by start()
            self._error = error

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        app = await self._build()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        await self._server.serve()

    def start(self) -> ThreadServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._error is not None:
                raise RuntimeError(f"server failed to start: {self._error!r}") from self._error
            if self._server is not None and self._server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError(f"server on {self.url} did not start within {START_TIMEOUT_S}s")

    def run_in_loop(self, coroutine: Awaitable) -> object:
        assert self.loop is not None, "the server is not running"
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=START_TIMEOUT_S)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT_S)
