"""The OpenAPI 3.1 document: the registry's commands from their pydantic models, plus the views."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from agent import __version__
from agent.api import ws_tts, ws_verify
from agent.api.auth import HEADER, QUERY
from agent.app.commands import Command, CommandRegistry
from agent.app.status import Health
from agent.config import ApiConfig
from agent.events import EVENT_TYPES

#: Path parameters with a known shape (the route matches only those): speaker ids are 32 hex
#: digits, so /api/speakers/reenrolment is never also a speaker id.
PATH_PARAMS = {"speaker_id": "[0-9a-f]{32}"}

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


NULLABLE_STR: Json = {"type": ["string", "null"]}
NULLABLE_NUM: Json = {"type": ["number", "null"]}
NUM: Json = {"type": "number"}
INT: Json = {"type": "integer"}
LATENCY: Json = _obj({"count": INT, "mean": NULLABLE_NUM, "p50": NULLABLE_NUM,
                      "p95": NULLABLE_NUM, "max": NULLABLE_NUM})
GATE: Json = _obj({"mode": {"type": "string", "enum": ["ptt", "ptt_toggle", "vad"]},
                   "state": {"type": "string", "enum": ["open", "closed"]},
                   "session_id": NULLABLE_STR})
COUNTS: Json = {"type": "object", "additionalProperties": INT}

SCHEMAS: Json = {
    "Error": _obj({"error": _obj({"code": {"type": "string"}, "message": {"type": "string"}})}),
    "Stats": _obj({
        "uptime_s": NUM, "gate": GATE,
        "utterances": _obj({"total": INT, "by_reason": COUNTS, "finals": INT}),
        "latency_ms": {"type": "object", "additionalProperties": LATENCY},
        "drops": _obj({"bus_events": INT, "audio_chunks": INT, "ws_clients": COUNTS,
                       "ws_asr_rejected": INT, "partials_shed": INT}),
        "decode": {"type": "object"},
        "connections": _obj({"ws_events": INT, "ws_asr": INT, "ws_asr_max": INT,
                             "http_requests": INT}),
        "events": _obj({"published": INT, "by_type": COUNTS}),
    }),
}


def _model_schema(model: type[BaseModel], components: Json) -> Json:
    """A pydantic model as a component schema; returns its $ref."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components.setdefault(model.__name__, schema)
    return _ref(model.__name__)


def _command_op(cmd: Command[Any, Any], components: Json) -> tuple[str, str, Json]:
    """(method, path, operation) of one registry command."""
    method = cmd.http.method.lower()
    op: Json = {"summary": cmd.summary, "operationId": cmd.name.replace("/", "_"),
                "responses": {"200": _json(_model_schema(cmd.result, components), "the result")}}
    params = re.findall(r"{(\w+)}", cmd.path)
    if params:
        op["parameters"] = [{"name": n, "in": "path", "required": True,
                             "schema": {"type": "string", **(
                                 {"pattern": f"^{PATH_PARAMS[n]}$"} if n in PATH_PARAMS else {})}}
                            for n in params]
    body = _model_schema(cmd.payload, components)
    if method == "get":
        fields = cmd.payload.model_fields
        op.setdefault("parameters", []).extend(
            {"name": n, "in": "query", "required": f.is_required(), "schema": {"type": "string"}}
            for n, f in fields.items() if n not in params)
    elif cmd.upload:
        op["requestBody"] = {"required": True, "content": {
            "multipart/form-data": {"schema": _obj({"file": {"type": "string",
                                                             "format": "binary"}})},
            "application/json": {"schema": body},
            "audio/wav": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }}
    else:
        op["requestBody"] = {"required": False, "content": {"application/json": {
            "schema": body}}}
    for status, why in cmd.errors.items():
        op["responses"][str(status)] = _error(why)
    if method != "get":
        op["responses"].setdefault("415", _error("unsupported Content-Type"))
        op["responses"].setdefault("413", _error("body larger than api.max_body_mb"))
    op["responses"].setdefault("400", _error("bad payload (the message names each field)"))
    op["responses"].setdefault("429", _error("rate limited (Retry-After)"))
    return method, cmd.path, op


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


def _ops(cfg: ApiConfig, commands: CommandRegistry | None, components: Json
         ) -> dict[tuple[str, str], Json]:
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
        ("get", "/api/openapi.json"): {
            "summary": "This document", "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1",
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
        ("get", "/ws/speakers/verify"): {
            "summary": "Stream audio, get a voice similarity per window (WebSocket)",
            "operationId": "ws_speakers_verify",
            "description": (ws_verify.__doc__ or "").strip(), "responses": ws_responses},
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
    ops.update(ws_tts.openapi_ops())
    _model_schema(Health, components)
    for cmd in commands or ():
        if "http" in cmd.surfaces:
            method, path, op = _command_op(cmd, components)
            ops[(method, path)] = op
    for op in ops.values():
        if op.get("security") != []:
            if cfg.key is not None:
                op["responses"]["401"] = _error("missing or wrong API key")
        r = op["responses"]
        # The guard's answers (agent/api/guard.py, accept.py) apply to every route.
        r.setdefault("403", _error("Host not served (bad_host), or a cross-site request "
                                   "(cross_origin)"))
        r.setdefault("503", _error("the daemon is stopping (stopping), or too many "
                                   "connections (too_many_connections)"))
        if "requestBody" in op:
            r.setdefault("400", bad)
            r.setdefault("408", _error("the body did not arrive within api.body_timeout_s"))
            r.setdefault("415", _error("unsupported Content-Type or Content-Encoding"))
    return ops


def build_spec(cfg: ApiConfig, commands: CommandRegistry | None = None,
               router: web.UrlDispatcher | None = None) -> Json:
    """The document for this configuration (only routes the router has, when given)."""
    components: Json = dict(SCHEMAS)
    registered: set[tuple[str, str]] | None = None
    if router is not None:
        registered = {(r.method.lower(), r.resource.canonical) for r in router.routes()
                      if r.resource is not None}
    paths: Json = {}
    for (method, path), op in _ops(cfg, commands, components).items():
        if registered is not None and (method, path) not in registered:
            continue
        paths.setdefault(path, {})[method] = op
    spec: Json = {
        "openapi": "3.1.0",
        "info": {"title": "voice-agent", "version": __version__,
                 "description": "Local HTTP + WebSocket API of the voice-agent daemon. Errors "
                                "are `{\"error\": {\"code\", \"message\"}}`."},
        "paths": paths,
        "components": {"schemas": components},
    }
    if cfg.key is not None:
        spec["components"]["securitySchemes"] = {
            "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": HEADER},
            "ApiKeyQuery": {"type": "apiKey", "in": "query", "name": QUERY},
        }
        spec["security"] = [{"ApiKeyHeader": []}, {"ApiKeyQuery": []}]
    return spec
