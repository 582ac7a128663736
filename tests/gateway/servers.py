"""ASGI apps served by uvicorn on a free port in a thread of their own (own event loop), for tests and
the benchmark: the test's loop talks to them over real sockets, as a client would. `FakeWorker`: a
scripted stand-in for the inference worker's protocol, for the failures a real worker does not show on
demand."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import uvicorn
from fastapi import FastAPI

from inference.internal_auth import token_matches
from inference.tokenizer import count_tokens
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

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # surfaced by start()
            self._error = error

    async def _serve(self) -> None:
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

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT_S)


@dataclass
class FakeStream:
    """What `FakeWorker` answers one generate call with.

    status: anything but 200 is a refusal with {"error": error}. ending: "done" (the done line), "die"
    (the connection is dropped without a last line, as when the worker process dies), "error" (an error
    line naming `error`, with the token counts)."""

    tokens: int = 3
    token_interval_s: float = 0.0
    ending: Literal["done", "die", "error"] = "done"
    error: str = "request_failed"
    status: int = 200


@dataclass
class FakeCall:
    body: dict
    authorization: str | None


class FakeWorker:
    """An ASGI app speaking the inference worker's generate protocol by script (`plan(body) -> FakeStream`),
    for failures the real worker cannot be made to show on demand: a worker that dies mid-stream, a slow
    one, error lines, 5xx. Like the real worker it serves only callers with the internal token (else 401).
    Records every authorized call (`calls`), refused calls, and the attempts whose client left mid-stream."""

    def __init__(self, internal_token: str, plan: Callable[[dict], FakeStream] | None = None) -> None:
        self.internal_token = internal_token
        self.plan = plan or (lambda _body: FakeStream())
        self.calls: list[FakeCall] = []
        self.unauthorized = 0
        self.client_left: list[str] = []
        self.tokens_sent: dict[str, int] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        authorization = dict(scope["headers"]).get(b"authorization")
        presented = authorization.decode("latin-1") if authorization is not None else None
        if not token_matches(self.internal_token, presented):
            self.unauthorized += 1
            await self._json(send, 401, {"error": "unauthorized", "message": "internal token required"})
            return
        body = json.loads(b"".join(chunks))
        self.calls.append(FakeCall(body, presented))
        stream = self.plan(body)
        if stream.status != 200:
            await self._json(send, stream.status, {"error": stream.error, "message": "scripted refusal"})
            return
        await self._stream(body, stream, receive, send)

    @staticmethod
    async def _json(send, status: int, payload: dict) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})

    async def _stream(self, body: dict, stream: FakeStream, receive, send) -> None:
        attempt_id = body["request_id"]
        left = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            left.set()

        watcher = asyncio.ensure_future(watch())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        sent = 0
        try:
            for index in range(stream.tokens):
                if stream.token_interval_s:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(left.wait(), stream.token_interval_s)
                if left.is_set():
                    self.client_left.append(attempt_id)
                    return
                line = {"type": "token", "text": f" t{index}", "token_id": 100 + index}
                await send({"type": "http.response.body", "body": _line(line), "more_body": True})
                sent += 1
                self.tokens_sent[attempt_id] = sent
            if stream.ending == "die":
                raise FakeWorkerDied(attempt_id)  # uvicorn drops the connection mid-body
            counts = {"prompt_tokens": count_tokens(body["prompt"]), "completion_tokens": sent}
            if stream.ending == "error":
                last = {
                    "type": "error",
                    "error": stream.error,
                    "message": "scripted",
                    "retryable": False,
                    **counts,
                }
            else:
                last = {"type": "done", "finish_reason": "length", **counts}
            await send({"type": "http.response.body", "body": _line(last), "more_body": False})
        finally:
            watcher.cancel()


class FakeWorkerDied(Exception):
    """Raised inside the fake worker's response: the connection drops as a dying process's would."""


def _line(payload: dict) -> bytes:
    return json.dumps(payload).encode() + b"\n"
