"""A server-sent-events response as a plain ASGI callable: each chunk one `http.response.body` send, and
a callback run exactly once however the response ends (the stream's end, an error, the client leaving).

Starlette's StreamingResponse does the same with an anyio task group per response (one task for the
body, one waiting for the client to leave) and its sends pass through a wrapper each; this keeps one
small task per response, which waits for `http.disconnect` and cancels the streaming task if the client
leaves first, so a generation stops as soon as nobody reads it, not at its next token.

`run_until_client_leaves` does the same for a response computed before anything is sent (a non-streamed
completion): the computation runs beside a wait for `http.disconnect`, and is cancelled if that comes
first (raising `ClientLeft`, with nothing to send).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import TypeVar

import anyio

SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"
SSE_CONTENT_TYPE = SSE_MEDIA_TYPE.encode()

Result = TypeVar("Result")


class ClientLeft(Exception):
    """The client went away before its response began: the work was cancelled, there is nothing to send."""


async def _until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # a body was read in full before the response began: nothing else can come


async def run_until_client_leaves(
    work: Coroutine[object, object, Result], receive: Callable[[], Awaitable[dict]]
) -> Result:
    """`work`'s result; if the client leaves first, `work` is cancelled (and awaited) and ClientLeft raised.
    The request's body must have been read in full (the next receive() waits for the client to leave)."""
    loop = asyncio.get_running_loop()
    working = loop.create_task(work)
    leaving = loop.create_task(_until_disconnect(receive))
    try:
        await asyncio.wait((working, leaving), return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not working.done():
            working.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait((working,))  # its own cleanup (closing the worker stream) runs to the end
    if working.cancelled():
        raise ClientLeft()
    return working.result()


class SseResponse:
    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        on_end: Callable[[], Awaitable[None]],
        headers: dict[str, str],
    ) -> None:
        self._chunks = chunks
        self._on_end = on_end
        self._headers = [(b"content-type", SSE_CONTENT_TYPE)] + [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
        ]
        self.client_left = False

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None, "an ASGI app runs in a task"
        ending = False  # set before the end: a disconnect seen after it cancels nothing

        async def cancel_when_the_client_leaves() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass  # a body was read in full before the response began: nothing else can come
            if not ending:
                self.client_left = True
                streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(cancel_when_the_client_leaves())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            async for chunk in self._chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ending = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self.client_left:
                raise
            streaming.uncancel()  # our own cancel, for a client that left: the response ends here
        finally:
            ending = True
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self._chunks.aclose()
                await self._on_end()
