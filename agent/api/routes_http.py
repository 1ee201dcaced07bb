"""HTTP routes: health, stats, metrics, push-to-talk, file transcription, OpenAPI, kiosk page."""

from __future__ import annotations

import base64
import binascii
import html
import json
import logging
import time
import urllib.parse
from importlib import resources
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from agent import __version__
from agent.api import audio as upload
from agent.api.auth import presented
from agent.api.context import CTX, ApiContext
from agent.api.errors import ApiError
from agent.api.metrics import STAGES
from agent.api.openapi import build_spec
from agent.constants import PIPELINE_RATE
from agent.errors import GateError

log = logging.getLogger(__name__)

PTT_COMMANDS = ("start", "stop", "reset", "toggle")
AUDIO_TYPES = ("audio/", "application/octet-stream")
#: Kiosk assets served from agent/web/, with their content types.
STATIC = {"app.js": "text/javascript", "style.css": "text/css",
          "capture-worklet.js": "text/javascript"}


def _ctx(request: web.Request) -> ApiContext:
    return request.app[CTX]


async def health(request: web.Request) -> web.Response:
    """Liveness without auth: status, version, models, uptime."""
    d = _ctx(request).daemon
    status = "stopping" if d.stopped.is_set() else "ok" if d.ready.is_set() else "starting"
    return web.json_response({
        "status": status,
        "version": __version__,
        "device_id": d.cfg.device_id,
        "ready": d.ready.is_set(),
        "uptime_s": round(d.state.uptime_s, 1),
        "models": {"asr": d.asr_engine.model_id if d.asr_engine else None, "vad": d.vad.name},
    })


async def stats(request: web.Request) -> web.Response:
    """Utterances, per-stage latencies, drops and connections since start."""
    ctx = _ctx(request)
    d, m = ctx.daemon, ctx.metrics
    by_reason = {dict(k).get("reason", ""): int(v) for k, v in m.utterances.values.items()}
    return web.json_response({
        "uptime_s": round(d.state.uptime_s, 1),
        "gate": d.gate.snapshot(),
        "utterances": {"total": sum(by_reason.values()), "by_reason": by_reason,
                       "finals": int(m.events.get(type="asr.final"))},
        "latency_ms": {stage: m.stage_ms(stage) for stage in STAGES},
        "drops": {
            "bus_events": d.bus.dropped,
            "audio_chunks": d.source.dropped_chunks,
            "ws_clients": {dict(k).get("reason", ""): int(v)
                           for k, v in m.ws_dropped.values.items()},
            "ws_asr_rejected": int(m.ws_rejected.total()),
        },
        "connections": {**ctx.connections(), "ws_asr_max": ctx.cfg.max_asr_sessions,
                        "http_requests": int(m.http.total())},
        "events": {"published": d.bus.published,
                   "by_type": {dict(k)["type"]: int(v) for k, v in m.events.values.items()}},
    })


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = _ctx(request).metrics.registry.render()
    return web.Response(text=body, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def _ptt(command: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        gate = _ctx(request).daemon.gate
        try:
            snap = gate.handle(command, reason="http")
        except GateError as e:
            raise ApiError(409, e.code, e.message) from e
        return web.json_response({"ok": True, "command": command, "gate": snap})

    handler.__doc__ = f"Push-to-talk: {command}."
    return handler


async def _read_upload(request: web.Request) -> bytes:
    """Audio bytes from multipart (`file`), JSON (`{"audio": base64}`) or a raw audio body."""
    ctype = request.content_type
    if ctype == "multipart/form-data":
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as e:
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from e
        limit = request.app[CTX].cfg.max_body_mb * 2**20
        try:
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader) and (part.filename or part.name == "file"):
                    data = bytearray()
                    while chunk := await part.read_chunk():
                        data += chunk
                        if len(data) > limit:
                            raise web.HTTPRequestEntityTooLarge(
                                max_size=int(limit), actual_size=len(data))
                    return bytes(data)
        except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as e:
            # aiohttp's parser raises all of these on malformed parts and part headers.
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from e
        raise ApiError(400, "no_file", "multipart body has no file part (send it as `file`)")
    if ctype == "application/json":
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "bad_json", f"request body is not JSON: {e}") from e
        if not isinstance(body, dict) or not isinstance(body.get("audio"), str):
            raise ApiError(400, "bad_request",
                           'expected a JSON object {"audio": "<base64 of a WAV/FLAC/MP3/OGG '
                           'file>"}')
        return decode_base64(body["audio"])
    if ctype.startswith(AUDIO_TYPES):
        return await request.read()
    raise ApiError(415, "unsupported_media_type",
                   f"unsupported Content-Type {ctype!r}: send multipart/form-data with a "
                   "`file` part, application/json with base64 `audio`, or audio/* bytes")


def decode_base64(text: str) -> bytes:
    """Standard base64, an optional `data:...;base64,` prefix and whitespace allowed."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_base64", f"audio is not valid base64: {e}") from e


async def transcribe(request: web.Request) -> web.Response:
    """Recognise an uploaded recording; text plus timings."""
    ctx = _ctx(request)
    t0 = time.monotonic()
    engine = ctx.daemon.asr_engine
    if engine is None:
        raise ApiError(503, "asr_unavailable", "no ASR model is loaded (asr.enabled is false, "
                       "the model failed to load, or the daemon is still starting)")
    data = await _read_upload(request)
    t1 = time.monotonic()
    audio = await upload.decode_upload(data, ctx.cfg.max_audio_s)
    t2 = time.monotonic()
    texts: list[str] = []
    language = engine.language
    parts = upload.windows(audio)
    for part in parts:
        result = await ctx.pool.final(engine.transcribe, part)
        if result.text:
            texts.append(result.text)
        language = result.language or language
    t3 = time.monotonic()
    m = ctx.metrics.latency
    m.observe(t2 - t1, stage="transcribe_audio_decode")
    m.observe(t3 - t2, stage="transcribe_decode")
    m.observe(t3 - t0, stage="transcribe_total")
    audio_s = len(audio) / PIPELINE_RATE
    return web.json_response({
        "text": " ".join(texts),
        "language": language,
        "model": engine.model_id,
        "audio_s": round(audio_s, 3),
        "windows": len(parts),
        "timings": {"upload_ms": round(1000 * (t1 - t0), 1),
                    "audio_decode_ms": round(1000 * (t2 - t1), 1),
                    "decode_ms": round(1000 * (t3 - t2), 1),
                    "total_ms": round(1000 * (t3 - t0), 1),
                    "rtf": round((t3 - t2) / audio_s, 4) if audio_s else None},
    })


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.0 document of every route."""
    ctx = _ctx(request)
    return web.json_response(build_spec(ctx.cfg, request.app.router))


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


def setup(app: web.Application, kiosk_page: bool) -> None:
    """Register the HTTP routes."""
    r = app.router
    r.add_get("/api/health", health, name="health")
    r.add_get("/api/stats", stats, name="stats")
    r.add_get("/metrics", metrics, name="metrics")
    for cmd in PTT_COMMANDS:
        r.add_post(f"/api/ptt/{cmd}", _ptt(cmd), name=f"ptt_{cmd}")
    r.add_post("/api/asr/transcribe", transcribe, name="transcribe")
    r.add_get("/api/openapi.json", openapi, name="openapi")
    if kiosk_page:
        r.add_get("/", kiosk, name="kiosk")
        r.add_get("/static/{name}", static, name="static")
