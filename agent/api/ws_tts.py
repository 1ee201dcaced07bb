"""`/ws/tts`: the daemon's replies as audio for kiosk pages (start, chunks, end; abort).

Each connection hears every reply that starts while it is connected, from its first sample:

```
server: {"type": "tts.ready", "sample_rate": 16000, "format": "s16le", "encoding": "binary"}
server: {"type": "tts.start", "reply_id": "...", "sample_rate": 16000, "format": "s16le"}
server: <binary frames of s16le mono PCM>
        # ?encoding=base64 instead: {"type": "tts.audio", "reply_id", "seq", "data": "<b64>"}
server: {"type": "tts.end", "reply_id": "...", "audio_s": 2.43}
server: {"type": "tts.abort", "reply_id": "..."}    # barge-in: stop playing now
```

Audio is queued per client (`agent.app.reply_outputs.KioskHub`): a client more than a minute
of audio behind, or whose send blocks longer than `api.ws_send_timeout_s`, gets
`{"type": "error", "code": "slow_client", "fatal": true}` and is closed (1008); the reply
never waits for it. `setup()` also registers the reply's other HTTP surfaces that are not
registry commands: `POST /api/chat/stream` (SSE) and the kiosk's player script.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from agent.api import sse_chat
from agent.api.context import CTX
from agent.api.errors import ApiError
from agent.app.reply import replies_of
from agent.app.reply_outputs import KioskClient, KioskMessage
from agent.constants import PIPELINE_RATE
from agent.errors import AgentError

log = logging.getLogger(__name__)

ENDPOINT = "tts"
MAX_CLIENT_MSG = 4096  # the client has nothing to say but pings


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def render(msg: KioskMessage, encoding: str, seq: int) -> str | bytes:
    """One queued item as the WebSocket message the kiosk receives."""
    if msg.kind == "start":
        return _json({"type": "tts.start", "reply_id": msg.reply_id,
                      "sample_rate": msg.sample_rate, "format": "s16le", "channels": 1})
    if msg.kind == "audio":
        if encoding == "binary":
            return msg.pcm
        return _json({"type": "tts.audio", "reply_id": msg.reply_id, "seq": seq,
                      "data": base64.b64encode(msg.pcm).decode("ascii")})
    if msg.kind == "end":
        return _json({"type": "tts.end", "reply_id": msg.reply_id,
                      "audio_s": round(msg.audio_s, 3)})
    return _json({"type": "tts.abort", "reply_id": msg.reply_id})


async def _forward(ws: web.WebSocketResponse, client: KioskClient, encoding: str,
                   send_timeout_s: float) -> str | None:
    """Queue -> socket until the socket closes; the reason when the client must be dropped."""
    seq = 0
    while not ws.closed:
        msg = await client.get()
        if msg.kind == "overflow":
            return "fell more than a minute of audio behind"
        seq = seq + 1 if msg.kind == "audio" else 0
        data = render(msg, encoding, seq)
        try:
            send = ws.send_bytes(data) if isinstance(data, bytes) else ws.send_str(data)
            await asyncio.wait_for(send, send_timeout_s)
        except TimeoutError:
            return (f"a send blocked for more than {send_timeout_s:g} s "
                    "(api.ws_send_timeout_s)")
        except (ConnectionError, RuntimeError):
            return None  # gone: nothing to tell it
    return None


async def tts_ws(request: web.Request) -> web.StreamResponse:
    """`GET /ws/tts` (WebSocket upgrade)."""
    ctx = request.app[CTX]
    encoding = request.query.get("encoding", "binary")
    if encoding not in ("binary", "base64"):
        raise ApiError(400, "bad_request", "encoding must be binary or base64")
    try:
        hub = replies_of(ctx.app).kiosk
    except AgentError as e:
        raise ApiError(503, e.code, e.message) from None
    ws = web.WebSocketResponse(heartbeat=ctx.cfg.ws_heartbeat_s, max_msg_size=MAX_CLIENT_MSG,
                               compress=False)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "not_websocket", "this is a WebSocket endpoint: connect with an "
                                             "Upgrade: websocket request")
    await ws.prepare(request)
    peer = request.remote or "?"
    client = hub.connect(peer)
    sockets = ctx.sockets.setdefault(ENDPOINT, set())
    sockets.add(ws)
    log.info("/ws/tts client %s connected", peer)
    writer: asyncio.Task[str | None] | None = None
    try:
        await ws.send_str(_json({"type": "tts.ready", "sample_rate": PIPELINE_RATE,
                                 "format": "s16le", "channels": 1, "encoding": encoding}))
        writer = asyncio.create_task(_forward(ws, client, encoding, ctx.cfg.ws_send_timeout_s))
        reader = asyncio.create_task(_read(ws))
        done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
        reader.cancel()
        if writer in done and (why := writer.result()) is not None:
            log.warning("dropping /ws/tts client %s: %s", peer, why)
            ctx.metrics.ws_dropped.inc(endpoint=ENDPOINT, reason="slow_client")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.send_str(_json(
                    {"type": "error", "stage": "api", "code": "slow_client", "fatal": True,
                     "message": f"dropped: {why}"})), 0.5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                                message=b"slow_client"), 1.0)
    finally:
        hub.disconnect(client)
        sockets.discard(ws)
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        log.info("/ws/tts client %s left", peer)
    return ws


async def _read(ws: web.WebSocketResponse) -> None:
    """Until the client closes; `{"type": "ping"}` is answered, anything else ignored."""
    async for msg in ws:
        if msg.type == WSMsgType.TEXT and '"ping"' in msg.data:
            with contextlib.suppress(Exception):
                await ws.send_str(_json({"type": "pong"}))


WS_TTS_DOC = (
    "WebSocket (upgrade with GET): the daemon's spoken replies as audio. Server: "
    "`{\"type\": \"tts.ready\", \"sample_rate\": 16000, \"format\": \"s16le\"}`, then per "
    "reply `{\"type\": \"tts.start\", \"reply_id\"}`, binary frames of 16 kHz s16le mono PCM "
    "(`?encoding=base64`: `{\"type\": \"tts.audio\", \"reply_id\", \"seq\", \"data\"}`), "
    "`{\"type\": \"tts.end\", \"reply_id\", \"audio_s\"}`, or `{\"type\": \"tts.abort\"}` on "
    "barge-in. A client that falls a minute behind gets `slow_client` and is closed (1008)."
)


def openapi_ops() -> dict[tuple[str, str], dict[str, Any]]:
    """The OpenAPI operations of the routes `setup()` adds (build_spec keeps those served)."""
    err = {"description": "error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
    ops: dict[tuple[str, str], dict[str, Any]] = {
        ("get", "/ws/tts"): {
            "summary": "Reply audio for kiosks: start, PCM chunks, end, abort (WebSocket)",
            "operationId": "ws_tts", "description": WS_TTS_DOC,
            "parameters": [{"name": "encoding", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["binary", "base64"]}}],
            "responses": {"101": {"description": "switched to the WebSocket protocol"},
                          "400": err, "503": err}},
        ("post", "/api/chat/stream"): copy.deepcopy(sse_chat.OPENAPI),
    }
    return ops


def setup(app: web.Application) -> None:
    """Register `/ws/tts` and `POST /api/chat/stream` (the player is a kiosk asset)."""
    app.router.add_get("/ws/tts", tts_ws, name="ws_tts")
    sse_chat.setup(app)
