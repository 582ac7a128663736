"""The engine served to asyncio: a step loop on its own thread, outputs delivered per request on the event
loop.

`submit()` answers at once (InvalidRequest / WaitingQueueFull raise before anything is queued), and
returns a `RequestStream`: iterate it for `RequestOutput`s; `cancel()` (or leaving the stream early and
calling cancel, as the worker does on client disconnect) aborts the request within one engine step. Every
request ends with exactly one finished output, and `on_finished` is called with it once, on the loop.

Delivery is per output: an output that cannot be delivered (a bug: an unknown request id, a failing
`on_finished`) is logged and counted, and every other output of the step is still delivered.

When the step loop dies (a bug in the engine, a kernel failure), the requests in it end: each stream
raises EngineFailed (carrying the request's final counts), and `on_finished` still gets those counts so
the work done is billed. Then the engine is rebuilt over the same loaded model (a fresh KV cache and
scheduler: nothing of the failed state survives) and a new loop thread starts, at most `restarts_max`
times within any `restart_window_ms`. Past that the engine stays down and `healthy` stays False; the
worker's health watchdog then ends the process so its supervisor starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from inference.engine import Engine, GenerationRequest, RequestOutput
from inference.metrics import WorkerMetrics
from inference.request import FinishReason

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # the loop re-checks for work at least this often when idle
STOP_JOIN_TIMEOUT_S = 30.0


class EngineFailed(RuntimeError):
    """The step loop died (or is down); the request cannot complete.

    `output` is the request's final output (the prompt and completion tokens it had processed) when the
    request was in the engine; None when it never got in.
    """

    def __init__(self, message: str, output: RequestOutput | None = None) -> None:
        super().__init__(message)
        self.output = output


def rebuild_engine(failed: Engine) -> Engine:
    """A fresh engine over the failed one's model and tokenizer: new KV cache, scheduler and request state."""
    return Engine(failed.model, failed.tokenizer, failed.settings)


class RequestStream:
    def __init__(self, request_id: str, engine: Engine) -> None:
        self.request_id = request_id
        self._engine = engine  # the engine it was submitted to (a restart replaces the EngineLoop's)
        self._outputs: asyncio.Queue[RequestOutput | BaseException] = (
            asyncio.Queue()
        )  # at most max_tokens + 1 items
        self._finished = False
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_output: RequestOutput | None = None  # the latest output delivered (its counts so far)

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """Abort the request if it has not finished; its final output still arrives (cancelled)."""
        if not self._finished:
            self._engine.abort_request(self.request_id)

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput):
            self.last_output = item
        self._outputs.put_nowait(item)

    def _final_output_so_far(self) -> RequestOutput:
        """A cancelled final output with the counts last delivered (0 when nothing was)."""
        last = self.last_output
        return RequestOutput(
            request_id=self.request_id,
            token_id=None,
            text="",
            finish_reason=FinishReason.CANCELLED,
            prompt_tokens=last.prompt_tokens if last is not None else 0,
            completion_tokens=last.completion_tokens if last is not None else 0,
            cached_prompt_tokens=last.cached_prompt_tokens if last is not None else 0,
        )

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


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        metrics: WorkerMetrics | None = None,
        *,
        restarts_max: int = 0,
        restart_window_ms: int = 60_000,
        rebuild: Callable[[Engine], Engine] = rebuild_engine,
    ) -> None:
        assert restarts_max >= 0, f"restarts_max must be non-negative, got {restarts_max}"
        assert restart_window_ms >= 1, f"restart_window_ms must be positive, got {restart_window_ms}"
        self.engine = engine
        self.metrics = metrics
        self.restarts_max = restarts_max
        self.restart_window_ms = restart_window_ms
        self.restarts = 0  # restarts so far, over the whole life
        self._rebuild = rebuild
        self._recent_restarts_ms: deque[int] = deque()  # monotonic ms of the restarts within the window
        self._streams: dict[str, RequestStream] = {}
        self._on_finished: dict[str, Callable[[RequestOutput], None]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failure: BaseException | None = None  # set while the loop is down (until a restart clears it)

    async def start(self) -> None:
        assert self._thread is None, "start() called twice"
        self._loop = asyncio.get_running_loop()
        self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(self.engine,), name="tollgate-engine", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        """Cancel what is in flight, let the loop deliver the cancelled outputs, and join the thread."""
        if self._thread is None:
            return
        self._stopping = True  # first: a loop that dies from here on is not restarted
        self.engine.abort_all()
        self._wake.set()
        thread = self._thread
        await asyncio.to_thread(thread.join, STOP_JOIN_TIMEOUT_S)
        assert not thread.is_alive(), "engine thread did not stop"
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

    # ---- the loop thread --------------------------------------------------------------------------

    def _run(self, engine: Engine) -> None:
        try:
            while True:
                self._wake.clear()
                if not engine.has_unfinished_requests():
                    if self._stopping:
                        return
                    self._wake.wait(IDLE_WAIT_S)
                    continue
                outputs = engine.step()
                if self.metrics is not None:
                    self.metrics.observe_step(engine.last_step_stats)
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as error:  # a bug in the engine: end its requests, then restart or stay down
            log.exception("engine loop failed")
            self.failure = error
            final_outputs = self._finish_all_now(engine)
            replacement = self._replacement(engine)  # built here, off the event loop
            self._loop.call_soon_threadsafe(self._recover, error, final_outputs, replacement)

    @staticmethod
    def _finish_all_now(engine: Engine) -> list[RequestOutput]:
        try:
            return engine.finish_all_now()
        except Exception:  # its state is broken too: the streams' last delivered counts stand in
            log.exception("the failed engine could not report its requests' final counts")
            return []

    def _replacement(self, failed: Engine) -> Engine | None:
        """A rebuilt engine when a restart is allowed now, else None (the engine stays down)."""
        if self._stopping:
            return None
        now_ms = time.monotonic_ns() // 1_000_000
        while self._recent_restarts_ms and self._recent_restarts_ms[0] <= now_ms - self.restart_window_ms:
            self._recent_restarts_ms.popleft()
        if len(self._recent_restarts_ms) >= self.restarts_max:
            log.error(
                "engine loop failed %d times within %d ms: not restarting (restarts_max %d)",
                len(self._recent_restarts_ms) + 1,
                self.restart_window_ms,
                self.restarts_max,
            )
            return None
        try:
            replacement = self._rebuild(failed)
        except Exception:
            log.exception("rebuilding the engine failed: it stays down")
            return None
        self._recent_restarts_ms.append(now_ms)
        return replacement

    # ---- on the event loop ------------------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            try:
                self._deliver_one(output, now)
            except Exception:  # a bug; it must not cost the other requests of the step their outputs
                log.exception("delivering an output of request %s failed", output.request_id)
                self._count_delivery_failure()

    def _deliver_one(self, output: RequestOutput, now: float) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            log.error("engine output for unknown request %r dropped", output.request_id)
            self._count_delivery_failure()
            return
        if output.token_id is not None and stream.first_token_at is None:
            stream.first_token_at = now
            if self.metrics is not None:
                self.metrics.time_to_first_token.observe(now - stream.submitted_at)
        stream._deliver(output)
        if output.finished:
            del self._streams[output.request_id]
            if self.metrics is not None:
                self.metrics.requests_finished.labels(output.finish_reason.value).inc()
            self._report_finished(output)

    def _report_finished(self, output: RequestOutput) -> None:
        on_finished = self._on_finished.pop(output.request_id, None)
        if on_finished is not None:
            on_finished(output)

    def _count_delivery_failure(self) -> None:
        if self.metrics is not None:
            self.metrics.delivery_failures.inc()

    def _recover(
        self, error: BaseException, final_outputs: list[RequestOutput], replacement: Engine | None
    ) -> None:
        """End every request the failed loop held (billed at its counts), then restart or stay down."""
        finals = {output.request_id: output for output in final_outputs}
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            output = finals.get(request_id) or stream._final_output_so_far()
            try:
                self._report_finished(output)
            except Exception:
                log.exception("reporting the final output of request %s failed", request_id)
                self._count_delivery_failure()
            stream._deliver(EngineFailed(f"engine loop failed: {error!r}", output))
        if self._on_finished:  # a bug: every request with on_finished has a stream until it finishes
            log.error("on_finished without a stream for %s", sorted(self._on_finished))
            self._on_finished = {}
        if replacement is None or self._stopping:
            return  # down for good: healthy stays False
        self.engine = replacement
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.engine_restarts.inc()
        self.failure = None
        self._start_thread()
        log.warning("engine restarted (%d restarts so far)", self.restarts)
