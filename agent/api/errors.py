"""The API's one error mapping: an AgentError -> its HTTP status and `{"error": {...}}` body."""

from __future__ import annotations

from aiohttp import web

from agent.errors import AgentError


class ApiError(AgentError):
    """A request the API refuses before it reaches the registry (auth, framing, routing)."""

    stage = "api"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message, status=status)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON every error response carries."""
    return {"error": {"code": code, "message": message}}


def error_response(err: AgentError, headers: dict[str, str] | None = None) -> web.Response:
    """The HTTP answer for `err` (Retry-After when it says when to come back)."""
    out = dict(headers or {})
    if err.retry_after_s is not None:
        out["Retry-After"] = str(max(1, round(err.retry_after_s)))
    status = err.status if 400 <= err.status <= 599 else 500
    return web.json_response(error_body(err.code, err.message), status=status, headers=out)
