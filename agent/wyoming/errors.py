"""The Wyoming front-end's own error class."""

from __future__ import annotations

from agent.errors import AgentError


class WyomingError(AgentError):
    """A Wyoming protocol problem (bad event, wrong order) or the server failing to start."""

    stage = "wyoming"
    default_status = 400
