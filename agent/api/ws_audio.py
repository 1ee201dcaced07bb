"""What the audio WebSockets (`/ws/asr`, `/ws/speakers/verify`) share: the upgrade, the framing
(JSON `control` and `audio` messages, or binary s16le frames), sending with a timeout, and the
refusal of a connection that cannot be served."""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import contextlib
import json
import logging
from typing import Any, ClassVar

from aiohttp import WSCloseCode, WSMsgType, web

from agent import jsonsafe
from agent.api.context import CTX, ApiContext
from agent.api.errors import ApiError
from agent.errors import AgentError
from agent.pipeline.gate import new_id

log = logging.getLogger(__name__)


async def upgrade(request: web.Request) -> tuple[ApiContext, web.WebSocketResponse]:
    """The API context and the prepared WebSocket (ApiError 400 for a plain HTTP request)."""
    ctx = request.app[CTX]
    cfg = ctx.cfg
    ws = web.WebSocketResponse(heartbeat=cfg.ws_heartbeat_s, compress=False,
                               max_msg_size=min(int(cfg.max_body_mb * 2**20), 16 * 2**20))
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "not_websocket", "this is a WebSocket endpoint: connect with an "
                                             "Upgrade: websocket request")
    await ws.prepare(request)
    return ctx, ws


async def refuse(ws: web.WebSocketResponse, code: str, message: str) -> web.WebSocketResponse:
    """Say why in one error message, then close (1013: try again later)."""
    with contextlib.suppress(Exception):
        await ws.send_str(json.dumps({"type": "error", "code": code, "message": message}))
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=code.encode())
    return ws


class AudioSocket(abc.ABC):
    """One client of an audio WebSocket: framing and sending; the protocol is the subclass's."""

    endpoint: ClassVar[str]  # for logs and the ws_dropped metric
    # The error code of a JSON message that is not an object (each protocol keeps its own).
    not_an_object: ClassVar[str] = "bad_json"

    def __init__(self, ctx: ApiContext, ws: web.WebSocketResponse, peer: str = "?") -> None:
        self.ctx, self.ws, self.peer = ctx, ws, peer
        self.id = new_id()

    # -- sending ----------------------------------------------------------------------------

    async def send(self, payload: dict[str, Any]) -> None:
        """One JSON message (a closed socket is not an error here)."""
        if self.ws.closed:
            return
        timeout = self.ctx.cfg.ws_send_timeout_s
        try:
            await asyncio.wait_for(self.ws.send_str(json.dumps(payload)), timeout)
        except ConnectionError:
            return
        except TimeoutError:
            # A client that does not read its results must not hold a session forever.
            log.warning("dropping %s client %s: a send blocked for %g s", self.endpoint,
                        self.peer, timeout)
            self.ctx.metrics.ws_dropped.inc(endpoint=self.endpoint, reason="slow_client")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=WSCloseCode.POLICY_VIOLATION,
                                                     message=b"slow_client"), 1.0)

    async def error(self, code: str, message: str) -> None:
        """A protocol error; the connection stays open."""
        await self.send({"type": "error", "code": code, "message": message})

    async def status(self, status: str, **extra: Any) -> None:
        """A status message."""
        await self.send({"type": "status", "status": status, "session_id": self.id, **extra})

    # -- receiving --------------------------------------------------------------------------

    async def serve(self) -> None:
        """Handle the client's messages until it goes: text is JSON, binary is s16le PCM."""
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self.on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self.on_audio(msg.data)

    async def on_text(self, text: str) -> None:
        """A JSON message: control, or base64 audio."""
        try:
            msg = jsonsafe.loads(text, max_bytes=len(text.encode()) + 1, what="message")
        except AgentError as e:
            await self.error(e.code, e.message)
            return
        if not isinstance(msg, dict):
            await self.error(self.not_an_object, "expected a JSON object with a `type`, got "
                             f"{type(msg).__name__}")
            return
        kind = msg.get("type")
        if kind == "audio":
            data = msg.get("data")
            if not isinstance(data, str):
                await self.error("bad_message", "audio message needs `data`: base64 s16le PCM")
                return
            try:
                pcm = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                await self.error("bad_base64", f"audio data is not valid base64: {e}")
                return
            await self.on_audio(pcm)
        elif kind == "control":
            await self.on_control(msg)
        else:
            await self.error("bad_message", f"unknown message type {str(kind)[:40]!r}: "
                                            "expected control or audio")

    @abc.abstractmethod
    async def on_control(self, msg: dict[str, Any]) -> None:
        """A `control` message (its `command`)."""

    @abc.abstractmethod
    async def on_audio(self, pcm: bytes) -> None:
        """s16le PCM at the session's rate."""
