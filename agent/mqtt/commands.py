"""Commands in over MQTT: payload validation, dispatch to the gate, one reply per command."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError
from agent.gate import GateController
from agent.mqtt.topics import valid_request_id

log = logging.getLogger(__name__)

# MQTT command name -> gate command. Later issues add `say`, `speakers/...` here.
GATE_COMMANDS = {"ptt/start": "start", "ptt/stop": "stop", "ptt/reset": "reset",
                 "ptt/toggle": "toggle"}


class CommandError(AgentError):
    """A command was refused before it changed anything."""

    stage = "mqtt"


class CommandPayload(BaseModel):
    """What a command may carry: nothing, or `{"request_id": "..."}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str | None = None


class ReplyError(BaseModel):
    """Why a command failed: a stable `code` and a message for humans."""

    code: str
    message: str


class Reply(BaseModel):
    """The answer to one command, published to `reply/<request_id>` (or `reply`)."""

    request_id: str | None
    command: str
    ok: bool
    result: dict[str, Any] | None = None
    error: ReplyError | None = None
    ts: float = Field(default_factory=time.time)


def parse_payload(raw: bytes) -> tuple[CommandPayload | None, str | None, CommandError | None]:
    """(payload, request_id, error): the request id is recovered even from a bad payload."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, None, CommandError("bad_payload", "payload is not UTF-8 text")
    if not text:
        return CommandPayload(), None, None
    try:
        data = json.loads(text)
    except ValueError as e:
        return None, None, CommandError("bad_payload", f"payload is not JSON: {e}")
    if not isinstance(data, dict):
        return None, None, CommandError(
            "bad_payload", f"payload must be a JSON object, got {type(data).__name__}")
    rid = data.get("request_id")
    if rid is not None and not (isinstance(rid, str) and valid_request_id(rid)):
        return None, None, CommandError(
            "bad_request_id", "request_id must be 1-64 characters of A-Z a-z 0-9 _ . : - "
                              f"(got {rid!r})")
    try:
        payload = CommandPayload.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "payload"
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
        return None, rid, CommandError("bad_payload", "; ".join(problems))
    return payload, rid, None


class CommandRouter:
    """Validates a command, runs it, and builds its reply; never raises."""

    def __init__(self, gate: GateController) -> None:
        self.gate = gate
        self.handlers: dict[str, Callable[[CommandPayload], dict[str, Any]]] = {
            name: self._gate_handler(cmd) for name, cmd in GATE_COMMANDS.items()}
        self.handled = 0
        self.failed = 0

    def _gate_handler(self, cmd: str) -> Callable[[CommandPayload], dict[str, Any]]:
        def run(_: CommandPayload) -> dict[str, Any]:
            return {"gate": self.gate.handle(cmd, reason="mqtt")}
        return run

    def handle(self, name: str, raw: bytes) -> Reply:
        """Run command `name` (e.g. `ptt/start`) with payload `raw`."""
        payload, rid, err = parse_payload(raw)
        result: dict[str, Any] | None = None
        if err is None:
            assert payload is not None
            handler = self.handlers.get(name)
            if handler is None:
                err = CommandError("unknown_command", f"unknown command {name!r}; expected one "
                                                      f"of {', '.join(sorted(self.handlers))}")
            else:
                try:
                    result = handler(payload)
                except AgentError as e:
                    err = CommandError(e.code, e.message)
        self.handled += 1
        if err is not None:
            self.failed += 1
            log.warning("MQTT command %s refused: %s", name, err)
            return Reply(request_id=rid, command=name, ok=False,
                         error=ReplyError(code=err.code, message=err.message))
        return Reply(request_id=rid, command=name, ok=True, result=result)
