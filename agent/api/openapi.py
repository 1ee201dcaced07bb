"""The OpenAPI 3.0 document: every route, its inputs, responses and errors (WebSockets too)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent import __version__
from agent.api.auth import HEADER, QUERY
from agent.config import ApiConfig
from agent.events import EVENT_TYPES

Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Json:
    return _json(_ref("Error"), description)


def _obj(props: Json, required: list[str] | None = None, extra: bool = True) -> Json:
    out: Json = {"type": "object", "properties": props, "additionalProperties": extra}
    out["required"] = list(props) if required is None else required
    return out


NULLABLE_STR: Json = {"type": "string", "nullable": True}
NUM: Json = {"type": "number"}
INT: Json = {"type": "integer"}
LATENCY: Json = _obj({"count": INT, "mean": {"type": "number", "nullable": True},
                      "p50": {"type": "number", "nullable": True},
                      "p95": {"type": "number", "nullable": True},
                      "max": {"type": "number", "nullable": True}})
GATE: Json = _obj({"mode": {"type": "string", "enum": ["ptt", "ptt_toggle", "vad"]},
                   "state": {"type": "string", "enum": ["open", "closed"]},
                   "session_id": NULLABLE_STR})
COUNTS: Json = {"type": "object", "additionalProperties": INT}

SCHEMAS: Json = {
    "Error": _obj({"error": _obj({"code": {"type": "string"}, "message": {"type": "string"}})}),
    "Health": _obj({
        "status": {"type": "string", "enum": ["ok", "starting", "stopping"]},
        "version": {"type": "string"}, "device_id": {"type": "string"},
        "ready": {"type": "boolean"}, "uptime_s": NUM,
        "models": _obj({"asr": NULLABLE_STR, "vad": {"type": "string"}}),
    }),
    "Stats": _obj({
        "uptime_s": NUM, "gate": GATE,
        "utterances": _obj({"total": INT, "by_reason": COUNTS, "finals": INT}),
        "latency_ms": {"type": "object", "additionalProperties": LATENCY},
        "drops": _obj({"bus_events": INT, "audio_chunks": INT, "ws_clients": COUNTS,
                       "ws_asr_rejected": INT}),
        "connections": _obj({"ws_events": INT, "ws_asr": INT, "ws_asr_max": INT,
                             "http_requests": INT}),
        "events": _obj({"published": INT, "by_type": COUNTS}),
    }),
    "PttResult": _obj({"ok": {"type": "boolean"}, "command": {"type": "string"}, "gate": GATE}),
    "TranscribeJson": _obj({"audio": {
        "type": "string", "format": "byte",
        "description": "base64 of a WAV/FLAC/MP3/OGG file (a data: URL prefix is allowed)"}},
        extra=True),
    "TranscribeUpload": _obj({"file": {"type": "string", "format": "binary"}}),
    "TranscribeResult": _obj({
        "text": {"type": "string"}, "language": NULLABLE_STR, "model": {"type": "string"},
        "audio_s": NUM, "windows": INT,
        "timings": _obj({"upload_ms": NUM, "audio_decode_ms": NUM, "decode_ms": NUM,
                         "total_ms": NUM, "rtf": {"type": "number", "nullable": True}}),
    }),
}

WS_EVENTS_DOC = (
    "WebSocket (upgrade with GET). First message: `{\"type\": \"snapshot\", ...}` with the "
    "gate, current utterance, last final, models and the event types; then every bus event "
    "as JSON (see the README's Events table). Client messages: "
    "`{\"command\": \"start|stop|reset|toggle\", \"id\": any}` -> "
    "`{\"type\": \"command.result\", \"ok\": true, \"gate\": {...}}`; "
    "`{\"types\": [\"asr.final\", ...] | null}` changes the filter -> "
    "`{\"type\": \"subscribed\"}`. Problems come as `{\"type\": \"error\", \"stage\": \"api\", "
    "\"code\", \"message\"}`. A client that falls more than api.ws_queue_size events behind, "
    "or whose send blocks longer than api.ws_send_timeout_s, gets `{\"type\": \"error\", "
    "\"code\": \"slow_client\"}` and is closed (1008)."
)
WS_ASR_DOC = (
    "WebSocket (upgrade with GET): one ASR session per connection; the client streams its own "
    "audio. Client: `{\"type\": \"control\", \"command\": \"start|stop|reset\"}` (start may add "
    "`sample_rate` and `partials`), `{\"type\": \"audio\", \"data\": \"<base64 s16le 16 kHz "
    "mono>\"}` or binary frames of the same PCM. Server: `{\"type\": \"status\", \"status\": "
    "\"ready|started|stopped|reset\"}`, `{\"type\": \"result\", \"mode\": \"partial|final\", "
    "\"text\", \"processing_time_ms\", ...}`, `{\"type\": \"error\", \"code\", \"message\"}`. "
    "Past api.max_asr_sessions connections a client gets `too_many_sessions` and is closed "
    "(1013)."
)


def _ops(cfg: ApiConfig) -> dict[tuple[str, str], Json]:
    """Every operation, keyed by (method, path)."""
    bad = _error("bad request (the message says what)")
    ws_responses = {"101": {"description": "switched to the WebSocket protocol"},
                    "400": _error("not a WebSocket handshake, or a bad `types` filter")}
    ops: dict[tuple[str, str], Json] = {
        ("get", "/api/health"): {
            "summary": "Liveness: status, version, models, uptime (never needs the key)",
            "operationId": "health", "security": [],
            "responses": {"200": _json(_ref("Health"), "daemon status")}},
        ("get", "/api/stats"): {
            "summary": "Utterances, per-stage latencies (ms), drops, connections",
            "operationId": "stats", "responses": {"200": _json(_ref("Stats"), "statistics")}},
        ("get", "/metrics"): {
            "summary": "Prometheus metrics: counters and per-stage latency histograms",
            "operationId": "metrics",
            "responses": {"200": {"description": "text exposition format 0.0.4",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}},
        ("post", "/api/asr/transcribe"): {
            "summary": "Recognise a recording (WAV/FLAC/MP3/OGG; others via ffmpeg)",
            "operationId": "transcribe",
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": _ref("TranscribeUpload")},
                "application/json": {"schema": _ref("TranscribeJson")},
                "audio/wav": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            }},
            "responses": {
                "200": _json(_ref("TranscribeResult"), "the transcript and timings"),
                "400": _error("bad JSON, bad base64, bad or empty audio, no file part"),
                "413": _error("body larger than api.max_body_mb, or audio longer than "
                              "api.max_audio_s"),
                "415": _error("unsupported Content-Type"),
                "503": _error("no ASR model loaded"),
            }},
        ("get", "/api/openapi.json"): {
            "summary": "This document", "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.0",
                                  "content": {"application/json": {"schema": {
                                      "type": "object"}}}}}},
        ("get", "/ws/events"): {
            "summary": "Live events and gate commands (WebSocket)", "operationId": "ws_events",
            "description": WS_EVENTS_DOC,
            "parameters": [{"name": "types", "in": "query", "required": False,
                            "description": "comma-separated event types to receive "
                                           f"({', '.join(EVENT_TYPES)}); default all",
                            "schema": {"type": "string"}}],
            "responses": ws_responses},
        ("get", "/ws/asr"): {
            "summary": "Stream audio, get partial and final recognition (WebSocket)",
            "operationId": "ws_asr", "description": WS_ASR_DOC, "responses": ws_responses},
        ("get", "/"): {
            "summary": "Kiosk page (open with ?token= when a key is set)", "operationId": "kiosk",
            "responses": {"200": {"description": "HTML", "content": {"text/html": {
                "schema": {"type": "string"}}}}}},
        ("get", "/static/{name}"): {
            "summary": "Kiosk asset", "operationId": "kiosk_asset",
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "JavaScript or CSS", "content": {
                "text/javascript": {"schema": {"type": "string"}},
                "text/css": {"schema": {"type": "string"}}}},
                "404": _error("no such asset")}},
    }
    for cmd in ("start", "stop", "reset", "toggle"):
        ops[("post", f"/api/ptt/{cmd}")] = {
            "summary": f"Push-to-talk gate: {cmd}", "operationId": f"ptt_{cmd}",
            "responses": {"200": _json(_ref("PttResult"), "new gate state"),
                          "409": _error("refused: the gate is in vad mode (wrong_mode)")}}
    for op in ops.values():
        if op.get("security") != []:
            if cfg.key is not None:
                op["responses"]["401"] = _error("missing or wrong API key")
        if "requestBody" in op and "400" not in op["responses"]:
            op["responses"]["400"] = bad
    return ops


def build_spec(cfg: ApiConfig, router: web.UrlDispatcher | None = None) -> Json:
    """The document for this configuration (only routes the router has, when given)."""
    registered: set[tuple[str, str]] | None = None
    if router is not None:
        registered = {(r.method.lower(), r.resource.canonical) for r in router.routes()
                      if r.resource is not None}
    paths: Json = {}
    for (method, path), op in _ops(cfg).items():
        if registered is not None and (method, path) not in registered:
            continue
        paths.setdefault(path, {})[method] = op
    spec: Json = {
        "openapi": "3.0.3",
        "info": {"title": "voice-agent", "version": __version__,
                 "description": "Local HTTP + WebSocket API of the voice-agent daemon. Errors "
                                "are `{\"error\": {\"code\", \"message\"}}`."},
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if cfg.key is not None:
        spec["components"]["securitySchemes"] = {
            "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": HEADER},
            "ApiKeyQuery": {"type": "apiKey", "in": "query", "name": QUERY},
        }
        spec["security"] = [{"ApiKeyHeader": []}, {"ApiKeyQuery": []}]
    return spec
