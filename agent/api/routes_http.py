"""HTTP routes: every registry command, plus health, stats, metrics, OpenAPI and the kiosk."""

from __future__ import annotations

import asyncio
import html
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from agent import jsonsafe
from agent.api.auth import QUERY, presented
from agent.api.context import CTX, ApiContext, call_context
from agent.api.errors import ApiError
from agent.api.metrics import STAGES
from agent.api.openapi import PATH_PARAMS, build_spec
from agent.app.commands import Command

log = logging.getLogger(__name__)

AUDIO_TYPES = ("audio/", "application/octet-stream", "video/webm")
# JSON bodies bigger than this are parsed in a thread: a 20 MB base64 upload takes ~0.5 s.
INLINE_JSON_BYTES = 256 * 1024
MAX_FORM_FIELDS = 32  # multipart fields besides the file: names, ids, options
MAX_FIELD_CHARS = 64 * 1024
#: Kiosk assets served from agent/web/, with their content types.
STATIC = {"app.js": "text/javascript", "style.css": "text/css",
          "capture-worklet.js": "text/javascript", "player.js": "text/javascript"}


def _ctx(request: web.Request) -> ApiContext:
    return request.app[CTX]


async def health(request: web.Request) -> web.Response:
    """Liveness without auth: status, version, models, audio, and what is missing."""
    return web.json_response(_ctx(request).app.health().model_dump(mode="json"))


async def stats(request: web.Request) -> web.Response:
    """Utterances, per-stage latencies, drops and connections since start."""
    ctx = _ctx(request)
    a, m = ctx.app, ctx.metrics
    by_reason = {dict(k).get("reason", ""): int(v) for k, v in m.utterances.values.items()}
    r = a.runner
    return web.json_response({
        "uptime_s": a.health().uptime_s,
        "gate": a.gate_status().model_dump(mode="json"),
        "utterances": {"total": sum(by_reason.values()), "by_reason": by_reason,
                       "finals": int(m.events.get(type="asr.final"))},
        "latency_ms": {stage: m.stage_ms(stage) for stage in STAGES},
        "drops": {
            "bus_events": a.bus.dropped,
            "audio_chunks": a.source.dropped_chunks if a.source else 0,
            "ws_clients": {dict(k).get("reason", ""): int(v)
                           for k, v in m.ws_dropped.values.items()},
            "ws_asr_rejected": int(m.ws_rejected.total()),
            "partials_shed": sum(r.shed.values()),
        },
        "decode": {"workers": r.workers, "running": r.running, "waiting": r.waiting(),
                   "shed": dict(r.shed), "rejected": dict(r.rejected),
                   "busy_s": round(r.busy_s, 3)},
        "connections": {**ctx.connections(), "ws_asr_max": ctx.cfg.max_asr_sessions,
                        "http_requests": int(m.http.total())},
        "events": {"published": a.bus.published,
                   "by_type": {dict(k)["type"]: int(v) for k, v in m.events.values.items()}},
    })


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = _ctx(request).metrics.registry.render()
    return web.Response(text=body, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:  # no body: the command's defaults (whitespace alone is not JSON: 400)
        return {}
    if len(raw) > INLINE_JSON_BYTES:
        body = await asyncio.to_thread(jsonsafe.loads, raw, max_bytes=len(raw),
                                       what="request body")
    else:
        body = jsonsafe.loads(raw, max_bytes=len(raw), what="request body")
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "expected a JSON object with the command's fields, "
                       f"got {type(body).__name__}")
    return body


async def _multipart(request: web.Request) -> tuple[bytes | None, str | None, dict[str, str]]:
    """The file part (bytes, name) and the other form fields, as a command's payload."""
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from e
    limit = _ctx(request).cfg.max_body_mb * 2**20
    data: bytes | None = None
    name: str | None = None
    fields: dict[str, str] = {}
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if data is None and (part.filename or part.name == "file"):
                buf = bytearray()
                while chunk := await part.read_chunk():
                    buf += chunk
                    if len(buf) > limit:
                        raise web.HTTPRequestEntityTooLarge(
                            max_size=int(limit), actual_size=len(buf))
                data, name = bytes(buf), part.filename
            elif part.name:
                if len(fields) >= MAX_FORM_FIELDS:
                    raise ApiError(400, "bad_multipart", f"more than {MAX_FORM_FIELDS} fields")
                value = await part.text()
                if len(value) > MAX_FIELD_CHARS:
                    raise ApiError(400, "bad_multipart", f"field {part.name[:40]!r} is over "
                                   f"{MAX_FIELD_CHARS} characters")
                fields[part.name] = value
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError,
            UnicodeDecodeError) as e:
        # aiohttp's parser raises all of these on malformed parts and part headers.
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from e
    if data is None:
        raise ApiError(400, "no_file", "multipart body has no file part (send it as `file`)")
    return data, name, fields


def command_handler(cmd: Command[Any, Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The route of one registry command."""

    async def handler(request: web.Request) -> web.Response:
        ctx = call_context(request)
        t0 = time.monotonic()
        data: dict[str, Any] = dict(request.match_info)
        if cmd.http.method == "GET":
            data.update({k: v for k, v in request.query.items() if k != QUERY})
        else:
            ctype = request.content_type
            has_body = bool(request.content_length) or request.body_exists
            if cmd.upload:
                # Form fields and the query string carry the rest of an upload's payload.
                data.update({k: v for k, v in request.query.items() if k != QUERY})
            if cmd.upload and ctype == "multipart/form-data":
                ctx.attachment, ctx.attachment_name, fields = await _multipart(request)
                data.update(fields)
            elif cmd.upload and ctype.startswith(AUDIO_TYPES):
                ctx.attachment = await request.read()
            elif ctype == "application/json" or (not has_body and ctype in (
                    "application/octet-stream", "")):
                data.update(await _json_body(request))
            elif has_body:
                accepted = ("multipart/form-data with a `file` part, application/json with "
                            "base64 `audio`, or audio/* bytes") if cmd.upload else \
                    "application/json"
                raise ApiError(415, "unsupported_media_type",
                               f"unsupported Content-Type {ctype!r}: send {accepted}")
        ctx.extra["upload_ms"] = round(1000 * (time.monotonic() - t0), 1)
        result = await _ctx(request).app.commands.dispatch(cmd.name, data, ctx)
        return web.json_response(result.model_dump(mode="json"))

    handler.__doc__ = cmd.summary
    return handler


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of every route."""
    ctx = _ctx(request)
    return web.json_response(build_spec(ctx.cfg, ctx.app.commands, request.app.router))


def _web_file(name: str) -> str:
    return (resources.files("agent") / "web" / name).read_text(encoding="utf-8")


async def kiosk(request: web.Request) -> web.Response:
    """The kiosk page; its asset URLs carry the token it was opened with."""
    key = presented(request) if _ctx(request).cfg.key is not None else None
    query = "?token=" + urllib.parse.quote(key, safe="") if key else ""
    page = _web_file("index.html").replace("{{query}}", html.escape(query, quote=True))
    return web.Response(text=page, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"})


async def static(request: web.Request) -> web.Response:
    """A kiosk asset (app.js, style.css, capture-worklet.js)."""
    name = request.match_info["name"]
    if name not in STATIC:
        raise ApiError(404, "not_found", f"no such asset {name!r}")
    return web.Response(text=_web_file(name), content_type=STATIC[name], charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


def _routed(path: str) -> str:
    """The aiohttp route of a documented path: known parameters get their shape (else an
    OPTIONS on /api/speakers/reenrolment would advertise the speaker routes' DELETE, PATCH)."""
    for name, shape in PATH_PARAMS.items():
        path = path.replace(f"{{{name}}}", f"{{{name}:{shape}}}")
    return path


def setup(app: web.Application, ctx: ApiContext, kiosk_page: bool) -> None:
    """Register the HTTP routes: fixed views, then one route per registry command."""
    r = app.router
    r.add_get("/api/health", health, name="health")
    r.add_get("/api/stats", stats, name="stats")
    r.add_get("/metrics", metrics, name="metrics")
    r.add_get("/api/openapi.json", openapi, name="openapi")
    # Fixed paths before templated ones: /api/speakers/register must not resolve as
    # /api/speakers/{speaker_id} (aiohttp tries resources in the order they were added).
    for cmd in sorted(ctx.app.commands, key=lambda c: "{" in c.path):
        if "http" in cmd.surfaces:
            r.add_route(cmd.http.method, _routed(cmd.path), command_handler(cmd),
                        name=cmd.name.replace("/", "_"))
    if kiosk_page:
        r.add_get("/", kiosk, name="kiosk")
        r.add_get("/static/{name}", static, name="static")
