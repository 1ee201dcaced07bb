"""`/ws/events`: a snapshot, then every bus event; gate commands and filters from the client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from agent import jsonsafe
from agent.api.context import CTX, ApiContext, call_context
from agent.api.errors import ApiError
from agent.app.commands import CallContext
from agent.bus import Subscription
from agent.errors import AgentError
from agent.events import EVENT_TYPES

log = logging.getLogger(__name__)

MAX_CLIENT_MSG = 64 * 1024  # commands and filters are tiny
# The gate's own names, as the first version of this protocol had them.
ALIASES = {"start": "ptt/start", "stop": "ptt/stop", "reset": "ptt/reset",
           "toggle": "ptt/toggle"}


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
                 peer: str, call: CallContext) -> None:
        self.ctx = ctx
        self.ws = ws
        self.sub = sub
        self.peer = peer
        self.call = call
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
        """One client message: a registry command or a filter change."""
        try:
            msg = jsonsafe.loads(text, max_bytes=MAX_CLIENT_MSG, what="message")
        except AgentError as e:
            await self.error(e.code, e.message)
            return
        if not isinstance(msg, dict):
            await self.error("bad_message", 'expected a JSON object: {"command": ...} or '
                                            '{"types": [...]}')
            return
        ref = msg.get("id")
        ref = ref if isinstance(ref, (str, int, float)) or ref is None else None
        if "command" in msg:
            await self.command(msg, ref)
        elif "types" in msg:
            try:
                self.sub.types = parse_types(msg["types"])
            except ApiError as e:
                await self.error(e.code, e.message, ref)
                return
            await self.send({"type": "subscribed", "id": ref,
                             "types": sorted(self.sub.types) if self.sub.types else None})
        else:
            await self.error("bad_message", 'expected {"command": NAME, ...payload} or '
                                            '{"types": [...] | null}', ref)

    async def command(self, msg: dict[str, Any], ref: Any) -> None:
        """Run a registry command: `{"command": "ptt/start", "id": 1, ...payload}`."""
        name = msg["command"]
        if not isinstance(name, str):
            await self.error("unknown_command", "command must be a string", ref)
            return
        name = ALIASES.get(name, name)
        payload = {k: v for k, v in msg.items() if k not in ("command", "id")}
        try:
            result = await self.ctx.app.commands.dispatch(name, payload, self.call)
        except AgentError as e:
            await self.error(e.code, e.message, ref, e.stage)
            return
        await self.send({"type": "command.result", "id": ref, "command": name, "ok": True,
                         **result.model_dump(mode="json", exclude={"ok", "command"})})

    async def error(self, code: str, message: str, ref: Any = None, stage: str = "api"
                    ) -> None:
        """A non-fatal error: the connection stays open."""
        await self.send({"type": "error", "stage": stage, "code": code, "message": message,
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
    sub = ctx.app.bus.subscribe(ctx.cfg.ws_queue_size, types=types, name=f"ws:{peer}")
    client = EventsClient(ctx, ws, sub, peer, call_context(request, "ws"))
    ctx.sockets["events"].add(ws)
    writer: asyncio.Task[None] | None = None
    log.info("/ws/events client %s connected", peer)
    try:
        with sub:
            await client.send({"type": "snapshot", **ctx.app.snapshot().model_dump(mode="json"),
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
