"""The gateway's HTTP/1.1 client to its workers (gateway.worker_http) and the NDJSON stream over it
(gateway.workers.WorkerStream), against scripted servers on real sockets. Each test runs on asyncio's own
loop and on uvloop (what the gateway serves with): their transports differ."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import pytest
import uvloop

from gateway.errors import ApiError
from gateway.settings import GatewaySettings
from gateway.worker_http import WorkerHttpError, WorkerHttpLimits, WorkerHttpPool, WorkerTimeout
from gateway.workers import (
    BudgetExhausted,
    DoneEvent,
    GenerateCall,
    TokenEvent,
    WorkerClient,
    WorkerFailed,
    WorkerPool,
    WorkerRequestFailed,
    WorkerStream,
)
from inference.internal_auth import authorization_header

INTERNAL_TOKEN = "test-internal-token-0123456789abcdef"
LIMITS = WorkerHttpLimits(
    connections_max=4,
    connect_timeout_s=1.0,
    read_timeout_s=5.0,
    keepalive_expiry_s=5.0,
    response_head_bytes_max=4096,
)
AUTHORIZATION = authorization_header(INTERNAL_TOKEN)
TOKEN_LINE = b'{"type":"token","text":" hi","token_id":7}\n'
DONE_LINE = b'{"type":"done","finish_reason":"length","prompt_tokens":3,"completion_tokens":2}\n'

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request) -> Callable[[Awaitable], object]:
    return asyncio.run if request.param == "asyncio" else uvloop.run


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


NDJSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


async def read_request(reader: asyncio.StreamReader, heads: list[bytes] | None = None) -> bytes | None:
    """One request's body (content-length framed), or None when the client closed the connection. The
    request's head goes to `heads` when given."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if heads is not None:
        heads.append(head)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


class ScriptedServer:
    """Serves `handler` per connection on a free port; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.CancelledError, ConnectionError):
                pass  # the test ended (its loop cancels what is left) or the client went away
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_exc) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def ndjson_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with two tokens and a done line, the first split mid-line."""
    while await read_request(reader) is not None:
        writer.write(NDJSON_HEAD + chunk(TOKEN_LINE[:10]) + chunk(TOKEN_LINE[10:] + TOKEN_LINE))
        await writer.drain()
        writer.write(chunk(DONE_LINE) + LAST_CHUNK)
        await writer.drain()


def test_keep_alive_reuses_one_connection_and_reads_the_chunked_body(run):
    async def scenario() -> None:
        async with ScriptedServer(ndjson_forever) as server:
            pool = WorkerHttpPool(server.url, LIMITS, authorization=AUTHORIZATION)
            for _ in range(3):
                exchange = await pool.post("/generate", b"{}", budget_s=5)
                assert exchange.status == 200
                assert await exchange.finish() == TOKEN_LINE * 2 + DONE_LINE
            assert server.connections == 1 and pool.open_connections == 1 and pool.idle_connections == 1
            await pool.close()

    run(scenario())


def worker_client(url: str, **overrides) -> WorkerClient:
    values = dict(
        worker_urls=[url], worker_connect_timeout_ms=1_000, breaker_failures_max=1, breaker_open_ms=60_000
    )
    values.update(overrides)
    return WorkerClient(url, GatewaySettings(**values), INTERNAL_TOKEN)


def test_worker_stream_batches_lines_split_across_chunks(run):
    async def scenario() -> list[list]:
        async with ScriptedServer(ndjson_forever) as server:
            worker = worker_client(server.url)
            stream = WorkerStream(worker, await worker.http.post("/generate", b"{}", budget_s=5), 1024, "r1")
            batches = [await stream.next_batch()]
            while not stream.finished:
                batches.append(await stream.next_batch())
            await stream.close()
            assert worker.http.idle_connections == 1, "a finished stream gives its connection back"
            await worker.close()
            return batches

    batches = run(scenario())
    events = [event for batch in batches for event in batch]
    assert events == [TokenEvent(" hi", 7), TokenEvent(" hi", 7), DoneEvent("length", 3, 2)]
    assert len(batches[0]) >= 2, "the line split across chunks and the next one arrive as one batch"


async def headers_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(NDJSON_HEAD + chunk(TOKEN_LINE))
    await writer.drain()
    await reader.read()  # until the client goes away


def test_the_exchange_budget_ends_a_stalled_stream_as_budget_exhausted(run):
    async def scenario() -> None:
        async with ScriptedServer(headers_then_silence) as server:
            worker = worker_client(server.url)
            stream = WorkerStream(
                worker, await worker.http.post("/generate", b"{}", budget_s=0.3), 1024, "r1"
            )
            assert await stream.next_batch() == [TokenEvent(" hi", 7)]
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(BudgetExhausted):
                await stream.next_batch()
            assert 0.1 < loop.time() - started < 2
            await stream.close()
            await worker.close()

    run(scenario())


def test_a_silent_worker_fails_the_read_after_the_read_timeout(run):
    async def scenario() -> None:
        async with ScriptedServer(headers_then_silence) as server:
            worker = worker_client(server.url, worker_read_timeout_ms=200)
            stream = WorkerStream(worker, await worker.http.post("/generate", b"{}", budget_s=30), 1024, "r1")
            await stream.next_batch()
            with pytest.raises(WorkerFailed, match="sent nothing"):
                await stream.next_batch()
            await worker.close()

    run(scenario())


def test_abort_closes_the_connection_so_the_worker_sees_the_client_leave(run):
    async def scenario() -> None:
        left = asyncio.Event()

        async def stream_until_left(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(NDJSON_HEAD + chunk(TOKEN_LINE))
            await writer.drain()
            assert await reader.read() == b"", "nothing more from the client"
            left.set()

        async with ScriptedServer(stream_until_left) as server:
            worker = worker_client(server.url)
            stream = WorkerStream(worker, await worker.http.post("/generate", b"{}", budget_s=5), 1024, "r1")
            await stream.next_batch()
            await stream.close()  # not finished: cancels
            await asyncio.wait_for(left.wait(), 2)
            assert worker.http.open_connections == 0
            await worker.close()

    run(scenario())


def test_cancelling_a_reader_mid_stream_then_closing_drops_the_connection(run):
    async def scenario() -> None:
        async with ScriptedServer(headers_then_silence) as server:
            worker = worker_client(server.url)
            stream = WorkerStream(worker, await worker.http.post("/generate", b"{}", budget_s=5), 1024, "r1")
            await stream.next_batch()
            reading = asyncio.ensure_future(stream.next_batch())
            await asyncio.sleep(0.05)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            await stream.close()
            assert worker.http.open_connections == 0
            await worker.close()

    run(scenario())


def test_connection_refused_is_a_worker_http_error(run):
    async def scenario() -> None:
        async with ScriptedServer(ndjson_forever) as server:
            url = server.url
        pool = WorkerHttpPool(
            url, LIMITS, authorization=AUTHORIZATION
        )  # the server is gone: nothing listens there now
        with pytest.raises(WorkerHttpError, match="cannot connect"):
            await pool.post("/generate", b"{}", budget_s=5)
        assert pool.open_connections == 0

    run(scenario())


def test_a_full_pool_waits_for_a_connection_then_reuses_it(run):
    async def scenario() -> None:
        async with ScriptedServer(ndjson_forever) as server:
            pool = WorkerHttpPool(
                server.url, WorkerHttpLimits(1, 0.5, 5.0, 5.0, 4096), authorization=AUTHORIZATION
            )
            first = await pool.post("/generate", b"{}", budget_s=5)
            second = asyncio.ensure_future(pool.post("/generate", b"{}", budget_s=5))
            await asyncio.sleep(0.05)
            assert not second.done(), "one connection at most: the second request waits"
            await first.finish()
            assert (await second).status == 200
            await (await second).finish()
            assert server.connections == 1
            busy = await pool.post("/generate", b"{}", budget_s=5)
            with pytest.raises(WorkerTimeout, match="stayed busy"):
                await pool.post("/generate", b"{}", budget_s=5)
            busy.abort()
            await pool.close()

    run(scenario())


def test_connection_close_answers_and_server_closed_idle_connections_are_not_reused(run):
    async def scenario() -> None:
        async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
            await writer.drain()

        async with ScriptedServer(close_after_one) as server:
            pool = WorkerHttpPool(server.url, LIMITS, authorization=AUTHORIZATION)
            for _ in range(2):
                exchange = await pool.post("/generate", b"{}", budget_s=5)
                assert await exchange.finish() == b"{}"
            await asyncio.sleep(0.05)
            assert server.connections == 2 and pool.open_connections == 0
            await pool.close()

    run(scenario())


def test_garbage_instead_of_http_is_a_worker_http_error(run):
    async def scenario() -> None:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"SMTP ready\r\n\r\n")
            await writer.drain()
            await reader.read()

        async with ScriptedServer(garbage) as server:
            pool = WorkerHttpPool(server.url, LIMITS, authorization=AUTHORIZATION)
            with pytest.raises(WorkerHttpError, match="not valid HTTP"):
                await pool.post("/generate", b"{}", budget_s=5)
            assert pool.open_connections == 0

    run(scenario())


def generate_call() -> GenerateCall:
    return GenerateCall("r1", "t1", "pro", "tollgate-tiny", "hi", 2, (), 1.0, 1.0, None)


def test_the_pool_retries_a_broken_worker_on_the_next_and_tells_its_breaker(run):
    async def scenario() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)  # then close without answering

        async with ScriptedServer(hang_up) as broken, ScriptedServer(ndjson_forever) as healthy:
            settings = GatewaySettings(
                worker_urls=[broken.url, healthy.url], breaker_failures_max=1, breaker_open_ms=60_000
            )
            pool = WorkerPool(settings, INTERNAL_TOKEN)
            pool.candidates = lambda: list(pool.workers)  # the broken worker first, every time
            stream = await pool.open(generate_call(), deadline_ms=float("inf"), now_ms=lambda: 0.0)
            assert stream.worker.url == healthy.url
            assert pool.workers[0].breaker.state == "open" and pool.workers[1].breaker.state == "closed"
            await stream.close()
            await pool.close()

    run(scenario())


def test_every_call_carries_the_internal_token(run):
    async def scenario() -> list[bytes]:
        heads: list[bytes] = []

        async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await read_request(reader, heads) is not None:
                writer.write(NDJSON_HEAD + chunk(TOKEN_LINE + DONE_LINE) + LAST_CHUNK)
                await writer.drain()

        async with ScriptedServer(record) as server:
            pool = WorkerHttpPool(server.url, LIMITS, authorization=AUTHORIZATION)
            for _ in range(2):  # a new connection, then a kept-alive one
                await (await pool.post("/generate", b"{}", budget_s=5)).finish()
            await pool.close()
        return heads

    heads = run(scenario())
    assert len(heads) == 2
    for head in heads:
        assert b"\r\nauthorization: Bearer " + INTERNAL_TOKEN.encode() + b"\r\n" in head


def scripted_worker(answers: list[bytes], bodies: list[dict]) -> Handler:
    """Answers the n-th request (over all connections) with answers[n]; records the request bodies."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (body := await read_request(reader)) is not None:
            bodies.append(msgspec.json.decode(body))
            writer.write(answers[len(bodies) - 1])
            await writer.drain()

    return handler


ERROR_500 = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\n{}"
STREAM_OK = NDJSON_HEAD + chunk(TOKEN_LINE + DONE_LINE) + LAST_CHUNK


def test_a_retry_after_a_5xx_is_a_new_attempt_id(run):
    async def scenario() -> tuple[list[dict], str]:
        bodies: list[dict] = []
        async with ScriptedServer(scripted_worker([ERROR_500, STREAM_OK], bodies)) as server:
            settings = GatewaySettings(
                worker_urls=[server.url], breaker_failures_max=5, worker_attempts_max=3
            )
            pool = WorkerPool(settings, INTERNAL_TOKEN)
            call = GenerateCall(
                "r1", "t1", "pro", "tollgate-tiny", "hi", 2, (), 1.0, 1.0, None, admitted_at_ms=1234
            )
            stream = await pool.open(call, deadline_ms=float("inf"), now_ms=lambda: 0.0)
            attempt_id = stream.attempt_id
            await stream.close()
            await pool.close()
        return bodies, attempt_id

    bodies, attempt_id = run(scenario())
    assert [body["request_id"] for body in bodies] == ["r1", "r1.2"]
    assert attempt_id == "r1.2"
    assert all(body["admitted_at_ms"] == 1234 for body in bodies)


@pytest.mark.parametrize("error", ["request_failed", "engine_failed"])
def test_a_request_that_failed_on_its_worker_is_not_retried(run, error):
    error_line = msgspec.json.encode(
        {
            "type": "error",
            "error": error,
            "message": "boom",
            "retryable": False,
            "prompt_tokens": 3,
            "completion_tokens": 0,
        }
    )
    answer = NDJSON_HEAD + chunk(error_line + b"\n") + LAST_CHUNK

    async def scenario() -> tuple[list[dict], list[dict], WorkerRequestFailed]:
        first_bodies: list[dict] = []
        second_bodies: list[dict] = []
        async with (
            ScriptedServer(scripted_worker([answer] * 3, first_bodies)) as first,
            ScriptedServer(scripted_worker([STREAM_OK] * 3, second_bodies)) as second,
        ):
            settings = GatewaySettings(worker_urls=[first.url, second.url], breaker_failures_max=5)
            pool = WorkerPool(settings, INTERNAL_TOKEN)
            pool.candidates = lambda: list(pool.workers)  # the failing worker first
            with pytest.raises(WorkerRequestFailed) as failed:
                await pool.open(generate_call(), deadline_ms=float("inf"), now_ms=lambda: 0.0)
            await pool.close()
        return first_bodies, second_bodies, failed.value

    first_bodies, second_bodies, failure = run(scenario())
    assert len(first_bodies) == 1 and second_bodies == []
    assert failure.event.error == error and failure.event.prompt_tokens == 3


def test_a_worker_400_is_not_retried(run):
    refusal = b'{"error":"invalid_request","message":"logit_bias: token id 99999 is not in the vocabulary"}'
    answer = b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(refusal), refusal)

    async def scenario() -> tuple[list[dict], list[dict], ApiError]:
        first_bodies: list[dict] = []
        second_bodies: list[dict] = []
        async with (
            ScriptedServer(scripted_worker([answer] * 3, first_bodies)) as first,
            ScriptedServer(scripted_worker([STREAM_OK] * 3, second_bodies)) as second,
        ):
            pool = WorkerPool(GatewaySettings(worker_urls=[first.url, second.url]), INTERNAL_TOKEN)
            pool.candidates = lambda: list(pool.workers)
            with pytest.raises(ApiError) as refused:
                await pool.open(generate_call(), deadline_ms=float("inf"), now_ms=lambda: 0.0)
            await pool.close()
        return first_bodies, second_bodies, refused.value

    first_bodies, second_bodies, refused = run(scenario())
    assert len(first_bodies) == 1 and second_bodies == []
    assert refused.status_code == 400 and "logit_bias" in refused.message


def test_token_lines_with_logprobs_are_read(run):
    line = (
        b'{"type":"token","text":" hi","token_id":7,"logprob":{"token_id":7,"token":" hi","bytes":[32,104,105],'  # noqa: E501
        b'"logprob":-0.5},"top_logprobs":[{"token_id":7,"token":" hi","bytes":[32,104,105],"logprob":-0.5}]}\n'  # noqa: E501
    )

    async def scenario() -> list:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(NDJSON_HEAD + chunk(line + DONE_LINE) + LAST_CHUNK)
            await writer.drain()

        async with ScriptedServer(answer) as server:
            worker = worker_client(server.url)
            stream = WorkerStream(worker, await worker.http.post("/generate", b"{}", budget_s=5), 1024, "r1")
            events = await stream.next_batch()
            await stream.close()
            await worker.close()
        return events

    token, done = run(scenario())
    assert token.logprob.logprob == -0.5 and token.logprob.bytes == [32, 104, 105]
    assert [entry.token for entry in token.top_logprobs] == [" hi"]
    assert done == DoneEvent("length", 3, 2)
