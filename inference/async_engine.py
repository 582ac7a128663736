"""The engine served to asyncio: a step loop on its own thread, outputs delivered per request on the event loop.

`submit()` answers at once (InvalidRequest / Overloaded raise before anything is queued), and returns a
`RequestStream`: iterate it for `RequestOutput`s; `cancel()` (or leaving the stream early and calling
cancel, as the worker does on client disconnect) aborts the request within one engine step. Every
request ends with exactly one finished output, and `on_finished` is called with it once, on the loop;
if the step loop dies, streams raise EngineFailed and on_finished still gets each request's counts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from inference.engine import Engine, GenerationRequest, RequestOutput
from inference.metrics import WorkerMetrics

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # the loop re-checks for work at least this often when idle
STOP_JOIN_TIMEOUT_S = 30.0


class EngineFailed(RuntimeError):
    """The step loop died; the request cannot complete."""


class RequestStream:
    def __init__(self, request_id: str, engine: Engine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()  # at most max_tokens + 1 items
        self._finished = False
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """Abort the request if it has not finished; its final output still arrives (cancelled)."""
        if not self._finished:
            self._engine.abort_request(self.request_id)

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        self._outputs.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finished:
            self._finished = True
        return item


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: WorkerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._streams: dict[str, RequestStream] = {}
        self._on_finished: dict[str, Callable[[RequestOutput], None]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failure: BaseException | None = None

    async def start(self) -> None:
        assert self._thread is None, "start() called twice"
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tollgate-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Cancel what is in flight, let the loop deliver the cancelled outputs, and join the thread."""
        if self._thread is None:
            return
        self.engine.abort_all()
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, STOP_JOIN_TIMEOUT_S)
        assert not self._thread.is_alive(), "engine thread did not stop"
        await asyncio.sleep(0)  # run the deliveries the thread scheduled before it ended
        self._thread = None

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def submit(
        self, generation: GenerationRequest, on_finished: Callable[[RequestOutput], None] | None = None
    ) -> RequestStream:
        if not self.healthy:
            raise EngineFailed("the engine loop is not running")
        if generation.request_id in self._streams:
            raise ValueError(f"request_id {generation.request_id!r} is already in flight")
        stream = RequestStream(generation.request_id, self.engine)
        self._streams[generation.request_id] = stream  # before add: the first output may come at once
        try:
            self.engine.add_request(generation)
        except BaseException:
            del self._streams[generation.request_id]
            raise
        if on_finished is not None:
            self._on_finished[generation.request_id] = on_finished
        self._wake.set()
        return stream

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                if not self.engine.has_unfinished_requests():
                    if self._stopping:
                        return
                    self._wake.wait(IDLE_WAIT_S)
                    continue
                outputs = self.engine.step()
                if self.metrics is not None:
                    self.metrics.observe_step(self.engine.last_step_stats)
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as error:  # a bug in the engine: fail every waiting stream loudly
            log.exception("engine loop failed")
            self.failure = error
            # Bill what each request did process: its final output still reaches on_finished.
            self._loop.call_soon_threadsafe(self._fail_all, error, self.engine.finish_all_now())

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            assert stream is not None, f"output for unknown request {output.request_id}"
            if output.token_id is not None and stream.first_token_at is None:
                stream.first_token_at = now
                if self.metrics is not None:
                    self.metrics.time_to_first_token.observe(now - stream.submitted_at)
            stream._deliver(output)
            if output.finished:
                del self._streams[output.request_id]
                if self.metrics is not None:
                    self.metrics.requests_finished.labels(output.finish_reason.value).inc()
                on_finished = self._on_finished.pop(output.request_id, None)
                if on_finished is not None:
                    on_finished(output)

    def _fail_all(self, error: BaseException, final_outputs: list[RequestOutput]) -> None:
        for output in final_outputs:
            on_finished = self._on_finished.pop(output.request_id, None)
            if on_finished is not None:
                on_finished(output)
        for stream in self._streams.values():
            stream._deliver(EngineFailed(f"engine loop failed: {error!r}"))
        self._streams.clear()
        self._on_finished.clear()
