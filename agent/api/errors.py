"""The API's error: a stable code, a message for humans, and the HTTP status it maps to."""

from __future__ import annotations

from agent.errors import AgentError


class ApiError(AgentError):
    """A request the API refuses; rendered as `{"error": {"code", "message"}}`."""

    stage = "api"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status
