"""The plain-ASGI pieces of the hot path: the SSE response (gateway.sse) and the completion routes'
request reading (gateway.completion_routes), driven with scripted ASGI receive/send."""

from __future__ import annotations

import asyncio

import pytest

from gateway.completion_routes import CompletionRoutes, RequestHeaders, read_body
from gateway.errors import ApiError
from gateway.sse import ClientLeft, SseResponse, run_until_client_leaves


class Client:
    """An ASGI client: what the app sent, and a `leave()` that makes receive() answer http.disconnect."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self._left = asyncio.Event()

    async def receive(self) -> dict:
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self._left.set()

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent[1:])


async def test_sse_streams_each_chunk_and_ends_once():
    ended = []

    async def chunks():
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    async def on_end() -> None:
        ended.append(True)

    client = Client()
    response = SseResponse(chunks(), on_end, {"x-request-id": "r1"})
    await response({"type": "http"}, client.receive, client.send)
    start = client.sent[0]
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"x-request-id", b"r1") in start["headers"]
    assert client.body == b"data: 1\n\ndata: 2\n\n"
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert ended == [True] and not response.client_left


async def test_a_client_leaving_cancels_the_stream_at_once_and_still_ends_it():
    ended = []
    closed = []
    waiting_for_the_worker = asyncio.Event()

    async def chunks():
        try:
            yield b"data: 1\n\n"
            waiting_for_the_worker.set()
            await asyncio.sleep(60)  # a worker slow to send its next token
            yield b"data: never\n\n"
        finally:
            closed.append(True)

    async def on_end() -> None:
        await asyncio.sleep(0)  # settling awaits (admission, the worker connection): not cancelled
        ended.append(True)

    client = Client()
    response = SseResponse(chunks(), on_end, {})
    serving = asyncio.ensure_future(response({"type": "http"}, client.receive, client.send))
    await waiting_for_the_worker.wait()
    client.leave()
    await asyncio.wait_for(serving, 2)  # returns normally: the cancel was the response's own
    assert response.client_left and closed == [True] and ended == [True]
    assert client.body == b"data: 1\n\n"


async def test_a_cancel_from_outside_still_ends_the_stream_and_propagates():
    ended = []

    async def chunks():
        yield b"data: 1\n\n"
        await asyncio.sleep(60)
        yield b""

    async def on_end() -> None:
        ended.append(True)

    client = Client()
    serving = asyncio.ensure_future(
        SseResponse(chunks(), on_end, {})({"type": "http"}, client.receive, client.send)
    )
    await asyncio.sleep(0.01)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert ended == [True]


def receiver(*messages: dict):
    queue = list(messages)

    async def receive() -> dict:
        return queue.pop(0)

    return receive


async def test_read_body_joins_parts_and_refuses_what_is_too_long_or_abandoned():
    headers = RequestHeaders([(b"content-length", b"6"), (b"authorization", b"Bearer k")])
    assert headers.authorization == "Bearer k" and headers.idempotency_key is None
    parts = receiver(
        {"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.request", "body": b"def"}
    )
    assert await read_body(parts, headers, 1024) == b"abcdef"
    with pytest.raises(ApiError) as declared_too_long:
        await read_body(receiver(), RequestHeaders([(b"content-length", b"2000")]), 1024)
    assert declared_too_long.value.code == "body_too_large"
    streamed = receiver(*[{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 2)
    with pytest.raises(ApiError) as streamed_too_long:
        await read_body(streamed, RequestHeaders([]), 1024)
    assert streamed_too_long.value.code == "body_too_large"
    with pytest.raises(ApiError) as gone:
        await read_body(receiver({"type": "http.disconnect"}), RequestHeaders([]), 1024)
    assert gone.value.code == "client_disconnected"


async def test_other_paths_pass_through_to_the_app():
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["path"])

    routes = CompletionRoutes(app)
    await routes({"type": "http", "path": "/v1/models", "method": "GET"}, None, None)
    await routes({"type": "lifespan", "path": "/v1/completions"}, None, None)
    assert seen == ["/v1/models", "/v1/completions"]


async def test_work_runs_to_its_result_when_the_client_stays():
    async def work() -> str:
        await asyncio.sleep(0.01)
        return "done"

    assert await run_until_client_leaves(work(), Client().receive) == "done"


async def test_a_client_leaving_cancels_the_work_and_waits_for_its_cleanup():
    cleaned = []
    started = asyncio.Event()

    async def work() -> str:
        started.set()
        try:
            await asyncio.sleep(60)  # a slow worker
            return "never"
        finally:
            await asyncio.sleep(0)  # cleanup that awaits (closing the worker stream)
            cleaned.append(True)

    client = Client()
    running = asyncio.ensure_future(run_until_client_leaves(work(), client.receive))
    await started.wait()
    client.leave()
    with pytest.raises(ClientLeft):
        await asyncio.wait_for(running, 2)
    assert cleaned == [True]


async def test_the_work_failing_is_raised_as_is():
    async def work() -> None:
        raise ApiError(502, "the worker failed")

    with pytest.raises(ApiError):
        await run_until_client_leaves(work(), Client().receive)
