"""A lean HTTP/1.1 client for the gateway's calls to its workers: a bounded keep-alive pool per worker.

    pool = WorkerHttpPool("http://127.0.0.1:8100", limits, authorization=b"Bearer <internal token>")
    exchange = await pool.post("/internal/v1/generate", body, budget_s=120.0)  # returns once headers arrived
    exchange.status                      # 200
    data = await exchange.read()         # the body bytes buffered so far (b"" once the body has ended)
    await exchange.finish()              # read to the end, then back to the pool (kept alive)
    exchange.abort()                     # or drop the connection (the worker cancels the generation)

Why not httpx: profiling the gateway under load put about half its CPU in httpx, httpcore, h11 and anyio
(a cancel scope per read, connection-pool scans per request). This client is built on asyncio's
transport/protocol layer (what asyncio streams are built on) and httptools' C parser (llhttp, what uvicorn
serves with), which does the status line, headers and chunked framing; a body chunk costs one callback.

Timeouts, each a named limit (`WorkerHttpLimits`):
- connecting, TLS included, and waiting for a free connection when the pool is full: `connect_timeout_s`;
- the exchange's whole budget (`budget_s`, the request's remaining time): one timer per exchange, not
  one per read. When it fires, a waiting read raises `WorkerTimeout(budget_exhausted=True)`;
- a silent worker: a read that waits longer than `read_timeout_s` raises `WorkerTimeout`. The same
  timer checks it lazily (it re-arms itself for the earlier of the two), so reads cost no timer each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

HTTP_DEFAULT_PORTS = {"http": 80, "https": 443}


class WorkerHttpError(Exception):
    """The worker could not be reached, broke the connection, or sent something that is not HTTP."""


class WorkerTimeout(WorkerHttpError):
    """A timeout: the exchange's budget ran out (`budget_exhausted`), or the worker stayed silent."""

    def __init__(self, message: str, *, budget_exhausted: bool) -> None:
        super().__init__(message)
        self.budget_exhausted = budget_exhausted


@dataclass(frozen=True, slots=True)
class WorkerHttpLimits:
    connections_max: int  # open connections to one worker, idle ones included
    connect_timeout_s: float  # connecting (TLS included), or waiting for a free connection when all are busy
    read_timeout_s: float  # the longest a read may wait for the worker's next bytes
    keepalive_expiry_s: float  # an idle connection older than this is closed instead of reused
    response_head_bytes_max: int  # the status line and headers of one response

    def __post_init__(self) -> None:
        assert self.connections_max >= 1, "a pool needs at least one connection"
        assert min(self.connect_timeout_s, self.read_timeout_s, self.keepalive_expiry_s) > 0, (
            "timeouts are positive"
        )
        assert self.response_head_bytes_max >= 256, "a response head needs room"


class WorkerConnection(asyncio.Protocol):
    """One keep-alive connection carrying one exchange at a time. The httptools parser calls the
    `on_*` methods from `data_received`; a read waits on one future, woken by new body bytes, the end of
    the body, the connection's loss or the exchange's timer."""

    def __init__(self, pool: WorkerHttpPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.in_exchange = False  # between begin() and finish()/abort()
        self.idle_since = 0.0  # loop time when it went back to the pool
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.head_complete = False
        self.message_complete = False
        self.keep_alive = False
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._error: WorkerHttpError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_since = 0.0
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  (uvloop's transports are not asyncio classes)

    def data_received(self, data: bytes) -> None:
        if not self.in_exchange:  # bytes while idle: a worker speaking out of turn
            self._fail(WorkerHttpError("the worker sent bytes outside an exchange"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(WorkerHttpError(f"the worker's response is not valid HTTP/1.1: {error}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.message_complete and self._error is None:
            reason = f": {exc!r}" if exc else ""
            self._error = WorkerHttpError(
                f"the worker closed the connection before the response ended{reason}"
            )
        self._wake()
        self._pool._forget(self)

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > self._pool.limits.response_head_bytes_max:
            raise WorkerHttpError(
                f"the response head is over {self._pool.limits.response_head_bytes_max} bytes"
            )

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.head_complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.message_complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # -- the exchange ------------------------------------------------------------------------------

    def begin(self, request: bytes, budget_s: float) -> None:
        """Send one request; the exchange may take `budget_s` seconds in all."""
        assert self._transport is not None, "the connection is not connected yet"
        assert not self.closed, "the connection is closed"
        self._reset_exchange()
        self.in_exchange = True
        self._deadline = self._loop.time() + budget_s
        self._timer = self._loop.call_at(
            min(self._deadline, self._loop.time() + self._pool.limits.read_timeout_s), self._on_timer
        )
        self._transport.write(request)

    async def wait_head(self) -> None:
        while not self.head_complete:
            await self._wait()

    async def read(self) -> bytes:
        """The body bytes that arrived since the last read, waiting for some; b"" once the body has ended."""
        while not self._body:
            if self.message_complete:
                return b""
            await self._wait()
        body = self._body
        self._body = []
        return body[0] if len(body) == 1 else b"".join(body)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiting_since = self._loop.time()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        now = self._loop.time()
        self._timer = None
        if now >= self._deadline:
            self._fail(
                WorkerTimeout(
                    "the request's time budget ran out waiting for the worker", budget_exhausted=True
                )
            )
            return
        read_timeout_s = self._pool.limits.read_timeout_s
        if self._waiter is not None and now - self._waiting_since >= read_timeout_s:
            self._fail(
                WorkerTimeout(f"the worker sent nothing for {read_timeout_s} s", budget_exhausted=False)
            )
            return
        waiting_since = self._waiting_since if self._waiter is not None else now
        self._timer = self._loop.call_at(min(self._deadline, waiting_since + read_timeout_s), self._on_timer)

    def _fail(self, error: WorkerHttpError) -> None:
        """A broken exchange: remember why (the next read raises it), wake the reader, drop the connection."""
        if self._error is None:
            self._error = error
        self._wake()
        self.close()

    def _end_exchange(self) -> None:
        self.in_exchange = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def finish(self) -> bytes:
        """Read the body to its end (what was not read yet is returned) and give the connection back to
        the pool, which keeps it alive if the worker allows."""
        rest = []
        while data := await self.read():
            rest.append(data)
        self._end_exchange()
        self._pool._release(self)
        return b"".join(rest)

    def abort(self) -> None:
        """Drop the connection mid-exchange: the worker sees the client go away."""
        self._end_exchange()
        self.close()

    def close(self) -> None:
        self._end_exchange()
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.close()
            self._pool._forget(self)

    def reusable(self, now: float) -> bool:
        return (
            not self.closed
            and self.message_complete
            and self.keep_alive
            and self._error is None
            and now - self.idle_since < self._pool.limits.keepalive_expiry_s
        )


class WorkerHttpPool:
    """Keep-alive connections to one worker: at most `connections_max` open, the most recently used reused
    first (so surplus connections age out), waiting at most `connect_timeout_s` for one when all are busy."""

    def __init__(self, url: str, limits: WorkerHttpLimits, *, authorization: bytes) -> None:
        """`authorization`: the Authorization header value sent on every request."""
        parts = urlsplit(url)
        if parts.scheme not in HTTP_DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"a worker URL is http:// or https:// with a host, not {url!r}")
        self.url = url.rstrip("/")
        self.limits = limits
        self.host = parts.hostname
        self.port = parts.port or HTTP_DEFAULT_PORTS[parts.scheme]
        self._base_path = parts.path.rstrip("/")
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = self.port == HTTP_DEFAULT_PORTS[parts.scheme]
        self._host_header = (self.host if default_port else f"{self.host}:{self.port}").encode()
        assert b"\r" not in authorization, "a header value is one line (no CR)"
        assert b"\n" not in authorization, "a header value is one line (no LF)"
        self._authorization = authorization
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[WorkerConnection] = []  # most recently used last
        self._open: set[WorkerConnection] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def open_connections(self) -> int:
        return len(self._open) + self._connecting

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def request_bytes(self, path: str, body: bytes) -> bytes:
        head = (
            b"POST %s HTTP/1.1\r\nhost: %s\r\nauthorization: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n"
            % ((self._base_path + path).encode(), self._host_header, self._authorization, len(body))
        )
        return head + body

    async def post(self, path: str, body: bytes, budget_s: float) -> WorkerConnection:
        """POST a JSON body; returns the connection once the response's status and headers arrived.
        Raises WorkerHttpError (WorkerTimeout for timeouts) when there is no response."""
        if budget_s <= 0:
            raise WorkerTimeout("the request's time budget ran out before the call", budget_exhausted=True)
        connection = await self._acquire(min(budget_s, self.limits.connect_timeout_s))
        try:
            connection.begin(self.request_bytes(path, body), budget_s)
            await connection.wait_head()
        except BaseException:
            connection.abort()
            raise
        return connection

    async def _acquire(self, timeout_s: float) -> WorkerConnection:
        loop = self.loop
        deadline = loop.time() + timeout_s
        while True:
            if self._closed:
                raise WorkerHttpError("the worker pool is closed")
            now = loop.time()
            while self._idle:
                connection = self._idle.pop()
                if connection.reusable(now):
                    return connection
                connection.close()
            if self.open_connections < self.limits.connections_max:
                return await self._connect(deadline - now)
            if now >= deadline:
                raise WorkerTimeout(
                    f"all {self.limits.connections_max} connections to {self.url} stayed busy for "
                    f"{self.limits.connect_timeout_s} s",
                    budget_exhausted=False,
                )
            await self._wait_for_connection(deadline - now)

    async def _wait_for_connection(self, timeout_s: float) -> None:
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass  # the caller checks its deadline
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # it was woken for a connection it will not take: pass the turn on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, timeout_s: float) -> WorkerConnection:
        self._connecting += 1
        try:
            _transport, connection = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: WorkerConnection(self),
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self.host if self._tls else None,
                ),
                timeout_s,
            )
        except BaseException as error:
            self._connecting -= 1
            self._wake_one()  # this slot is free again: a waiter may connect in its turn
            if isinstance(error, TimeoutError):
                raise WorkerTimeout(
                    f"connecting to {self.url} took over {timeout_s:.3f} s", budget_exhausted=False
                ) from None
            if isinstance(error, OSError):
                raise WorkerHttpError(f"cannot connect to {self.url}: {error!r}") from error
            raise
        self._connecting -= 1
        if connection.closed:  # lost between connecting and here
            self._wake_one()
            raise WorkerHttpError(f"{self.url} closed the connection as soon as it was made")
        self._open.add(connection)
        return connection

    def _release(self, connection: WorkerConnection) -> None:
        connection.idle_since = self.loop.time()
        if self._closed or not connection.reusable(connection.idle_since):
            connection.close()
            return
        self._idle.append(connection)
        self._wake_one()

    def _forget(self, connection: WorkerConnection) -> None:
        """A connection closed (by either side): it no longer counts against the limit."""
        if connection in self._open:
            self._open.discard(connection)
            if connection in self._idle:
                self._idle.remove(connection)
            self._wake_one()

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._open):
            connection.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
