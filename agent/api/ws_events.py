"""`/ws/events`: a snapshot, then every bus event; gate commands and filters from the client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from agent.api.context import CTX, ApiContext
from agent.api.errors import ApiError
from agent.bus import Subscription
from agent.errors import GateError
from agent.events import EVENT_TYPES

log = logging.getLogger(__name__)

MAX_CLIENT_MSG = 64 * 1024  # commands and filters are tiny


def parse_types(value: Any) -> frozenset[str] | None:
    """A filter from `"a,b"`, `["a", "b"]`, `"*"` or null (all); ApiError for unknown types."""
    if value is None or value == "*" or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise ApiError(400, "bad_filter", "types must be a list of event type names or null")
    types = frozenset(t.strip() for t in items if t.strip())
    unknown = sorted(types - set(EVENT_TYPES))
    if unknown:
        raise ApiError(400, "unknown_event_type", f"unknown event type(s) {', '.join(unknown)}; "
                       f"known: {', '.join(EVENT_TYPES)}")
    return types


class EventsClient:
    """One connected client: a writer task forwarding events, and its message handler."""

    def __init__(self, ctx: ApiContext, ws: web.WebSocketResponse, sub: Subscription,
                 peer: str) -> None:
        self.ctx = ctx
        self.ws = ws
        self.sub = sub
        self.peer = peer
        self.timeout = ctx.cfg.ws_send_timeout_s

    async def send(self, payload: dict[str, Any] | str) -> None:
        """Send one message; a client that cannot take it in time is dropped."""
        text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
        try:
            await asyncio.wait_for(self.ws.send_str(text), self.timeout)
        except TimeoutError:
            await self.drop("slow_client", f"a send blocked for more than {self.timeout:g} s "
                                           "(api.ws_send_timeout_s)")

    async def drop(self, code: str, why: str) -> None:
        """Close a client that cannot keep up, saying why; the daemon never waits for it."""
        log.warning("dropping /ws/events client %s: %s", self.peer, why)
        self.ctx.metrics.ws_dropped.inc(endpoint="events", reason=code)
        msg = json.dumps({"type": "error", "stage": "api", "code": code, "fatal": True,
                          "message": f"dropped: {why}"})
        with contextlib.suppress(Exception):
            # Best effort: the socket may be the very thing that is stuck.
            await asyncio.wait_for(self.ws.send_str(msg), 0.5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=code.encode()), 1.0)

    async def forward(self) -> None:
        """Bus -> client until the bus closes or the client is dropped."""
        async for ev in self.sub:
            if self.sub.dropped:
                await self.drop("slow_client", f"fell more than {self.ctx.cfg.ws_queue_size} "
                                               "events behind (api.ws_queue_size)")
                return
            if self.ws.closed:
                return
            await self.send(ev.model_dump_json())
        with contextlib.suppress(Exception):
            await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon stopping")

    async def handle(self, text: str) -> None:
        """One client message: a gate command or a filter change."""
        try:
            msg = json.loads(text)
        except ValueError as e:
            await self.error("bad_json", f"message is not JSON: {e}")
            return
        if not isinstance(msg, dict):
            await self.error("bad_message", 'expected a JSON object: {"command": ...} or '
                                            '{"types": [...]}')
            return
        ref = msg.get("id")
        ref = ref if isinstance(ref, (str, int, float)) or ref is None else None
        if "command" in msg:
            cmd = msg["command"]
            if not isinstance(cmd, str):
                await self.error("unknown_command", "command must be a string", ref)
                return
            try:
                gate = self.ctx.daemon.gate.handle(cmd, reason="ws")
            except GateError as e:
                await self.error(e.code, e.message, ref)
                return
            await self.send({"type": "command.result", "id": ref, "command": cmd, "ok": True,
                             "gate": gate})
        elif "types" in msg:
            try:
                self.sub.types = parse_types(msg["types"])
            except ApiError as e:
                await self.error(e.code, e.message, ref)
                return
            await self.send({"type": "subscribed", "id": ref,
                             "types": sorted(self.sub.types) if self.sub.types else None})
        else:
            await self.error("bad_message", 'expected {"command": "start|stop|reset|toggle"} '
                                            'or {"types": [...] | null}', ref)

    async def error(self, code: str, message: str, ref: Any = None) -> None:
        """A non-fatal protocol error: the connection stays open."""
        await self.send({"type": "error", "stage": "api", "code": code, "message": message,
                         "fatal": False, "id": ref})


async def events_ws(request: web.Request) -> web.StreamResponse:
    """`GET /ws/events` (WebSocket upgrade)."""
    ctx = request.app[CTX]
    types = parse_types(request.query.get("types"))
    ws = web.WebSocketResponse(heartbeat=ctx.cfg.ws_heartbeat_s, max_msg_size=MAX_CLIENT_MSG,
                               compress=False)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "not_websocket", "this is a WebSocket endpoint: connect with an "
                                             "Upgrade: websocket request")
    await ws.prepare(request)
    peer = request.remote or "?"
    sub = ctx.daemon.bus.subscribe(ctx.cfg.ws_queue_size, types=types, name=f"ws:{peer}")
    client = EventsClient(ctx, ws, sub, peer)
    ctx.sockets["events"].add(ws)
    writer: asyncio.Task[None] | None = None
    log.info("/ws/events client %s connected", peer)
    try:
        with sub:
            await client.send({"type": "snapshot", **ctx.daemon.snapshot(),
                               "event_types": list(EVENT_TYPES),
                               "types": sorted(types) if types else None})
            writer = asyncio.create_task(client.forward(), name=f"ws-events:{peer}")
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await client.handle(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await client.error("bad_message", "binary messages are not accepted here")
    finally:
        ctx.sockets["events"].discard(ws)
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        log.info("/ws/events client %s left", peer)
    return ws


def setup(app: web.Application) -> None:
    """Register the route."""
    app.router.add_get("/ws/events", events_ws, name="ws_events")
