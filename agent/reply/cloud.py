"""What the DashScope clients share: the API key, error mapping, backoff and headers."""

from __future__ import annotations

import os
import random
from typing import Any

from pydantic import SecretStr

from agent import jsonsafe
from agent.errors import CloudError
from agent.jsonsafe import BadJson

DEFAULT_HTTP_BASE = "https://dashscope.aliyuncs.com/api/v1"
DEFAULT_WS_BASE = "wss://dashscope.aliyuncs.com/api-ws/v1/inference"
ENV_API_KEY = "DASHSCOPE_API_KEY"
USER_AGENT = "voice-agent/0.1"

# Codes that a second try may cure; the others (bad key, bad request) never will.
RETRYABLE = frozenset({"unreachable", "rate_limited", "server_error"})


def api_key(value: SecretStr | str | None) -> str:
    """The key from config (or DASHSCOPE_API_KEY), or CloudError `no_api_key`.

    Resolved per request, never stored in the clients' reprs, never logged.
    """
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    key = (value or os.environ.get(ENV_API_KEY) or "").strip()
    if not key:
        raise CloudError(
            "no_api_key", "no DashScope API key: set dashscope.api_key "
            "(VOICE_AGENT__DASHSCOPE__API_KEY) or DASHSCOPE_API_KEY", status=503,
        )
    return key


def auth_headers(key: str) -> dict[str, str]:
    """Headers every DashScope request carries."""
    return {"Authorization": f"Bearer {key}", "User-Agent": USER_AGENT}


def status_error(status: int, body: str | bytes | None, service: str,
                 retry_after: str | None = None) -> CloudError:
    """Map an HTTP status (and DashScope's JSON or SSE error body) to a CloudError."""
    code, message, request_id = parse_error_body(body)
    if status in (401, 403):
        ours = "unauthorized"
    elif status == 429:
        ours = "rate_limited"
    elif status >= 500 or status == 408:
        ours = "server_error"
    elif status == 404:
        ours = "not_found"
    else:
        ours = "bad_request"
    detail = f"DashScope {service} answered HTTP {status}"
    if code:
        detail += f" {code}"
    if message:
        detail += f": {message}"
    if request_id:
        detail += f" (request {request_id})"
    return CloudError(ours, detail, status=502 if ours == "server_error" else 503,
                      retry_after_s=_retry_after(retry_after))


def parse_error_body(body: str | bytes | None) -> tuple[str | None, str | None, str | None]:
    """(code, message, request_id) from a JSON body or an SSE `data:` line, when present."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    if not body:
        return None, None, None
    candidates = [body] + [ln[5:] for ln in body.splitlines() if ln.startswith("data:")]
    for text in candidates:
        try:
            obj = jsonsafe.loads(text, max_bytes=len(text.encode()) + 1)
        except BadJson:
            continue
        if isinstance(obj, dict):
            return _str(obj.get("code")), _str(obj.get("message")), _str(obj.get("request_id"))
    return None, body.strip()[:200] or None, None


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare from DashScope, use our own backoff


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter: drawn from [d/2, d], d = initial * 2**attempt."""
    d = min(max_s, initial_s * (2 ** attempt))
    return random.uniform(d / 2, d)
