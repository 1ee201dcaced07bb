"""`POST /api/chat/stream`: the registry's `chat` command, streamed as Server-Sent Events.

Why a route beside the command rather than the command itself: the registry answers with one
pydantic result on every surface (HTTP, MQTT, `/ws/events`, the CLI), and `chat` does, with
the whole text once the reply has been spoken. HTTP clients that want the text as it comes
use this route: the same command (same validation, rate limit and reply), with each of the
reply's events sent as it is published:

```
event: llm.started     data: {"type": "llm.started", "reply_id": "...", ...}
event: llm.text        data: {"type": "llm.text", "text": "It is sunny.", "seq": 1, ...}
event: tts.started / tts.finished / cloud.unavailable / reply.cancelled / error
event: done            data: {"reply_id": ..., "outcome": "done", "text": ...}   (the chat result)
event: error           data: {"error": {"code", "message"}}   (the command failed mid-stream)
```

A request refused before the reply starts (bad payload, rate limit) is a plain JSON error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import web

from agent import jsonsafe
from agent.api.context import CTX, call_context
from agent.api.errors import ApiError, error_body
from agent.app.reply_commands import ON_EVENT
from agent.errors import AgentError
from agent.events import BaseEvent

log = logging.getLogger(__name__)

PATH = "/api/chat/stream"
MAX_BODY = 64 * 1024
KEEPALIVE_S = 1.0  # a comment line this often: a client that left is noticed


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


async def chat_stream(request: web.Request) -> web.StreamResponse:
    """Run `chat` and stream its events."""
    app = request.app[CTX].app
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", f"unsupported Content-Type "
                       f"{request.content_type!r}: send application/json")
    body = jsonsafe.loads_object(await request.read(), max_bytes=MAX_BODY, what="request body")
    registry = app.commands
    registry.parse(registry.get("chat"), body)  # a bad payload is a 400 before any stream
    call = call_context(request)
    events: asyncio.Queue[BaseEvent] = asyncio.Queue()
    call.extra[ON_EVENT] = events.put_nowait
    task = asyncio.create_task(registry.dispatch("chat", body, call), name="chat-stream")
    try:
        first = asyncio.ensure_future(events.get())
        await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            task.result()  # refused or failed before any event: its error, as JSON
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        if first.done() and not first.cancelled():
            await _send_event(resp, first.result())
        await _stream(resp, task, events)
        return resp
    finally:
        if not task.done():
            task.cancel()  # the client left: the reply is abandoned (reply.cancelled)
            with contextlib.suppress(BaseException):
                await task


async def _send_event(resp: web.StreamResponse, ev: BaseEvent) -> None:
    await resp.write(_sse(ev.type, ev.model_dump_json()))


async def _stream(resp: web.StreamResponse, task: asyncio.Task[Any],
                  events: asyncio.Queue[BaseEvent]) -> None:
    """Events until the command is done, then its result (or error)."""
    while not (task.done() and events.empty()):
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({task, getter}, timeout=KEEPALIVE_S,
                           return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            await _send_event(resp, getter.result())
        else:
            getter.cancel()
            if not task.done():
                await resp.write(b": keepalive\n\n")  # raises once the client is gone
    try:
        result = task.result()
    except AgentError as e:
        await resp.write(_sse("error", json.dumps(error_body(e.code, e.message))))
    else:
        await resp.write(_sse("done", result.model_dump_json()))
    await resp.write_eof()


OPENAPI: dict[str, Any] = {
    "summary": "Ask the LLM and stream the spoken reply's events (Server-Sent Events)",
    "operationId": "chat_stream",
    "description": "The `chat` command (same body), answered as `text/event-stream`: one SSE "
                   "event per reply event (`llm.started`, `llm.text`, `tts.started`, "
                   "`tts.finished`, `cloud.unavailable`, `reply.cancelled`, `error`), then "
                   "`done` with the chat result, or `error` with `{\"error\": {code, "
                   "message}}`.",
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatRequest"}}}},
    "responses": {
        # Each event's data is a JSON object (described above); OpenAPI 3.1 has no schema for
        # a stream of them, so none is claimed.
        "200": {"description": "the reply's events", "content": {
            "text/event-stream": {"schema": {}}}},
        **{str(s): {"description": why, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}
           for s, why in ((400, "bad JSON or payload"), (413, "body too large"),
                          (415, "not application/json"), (429, "rate limited"),
                          (502, "the cloud and the local voice failed"),
                          (503, "no TTS backend"))},
    },
}


def setup(app: web.Application) -> None:
    """Register the route."""
    app.router.add_post(PATH, chat_stream, name="chat_stream")
