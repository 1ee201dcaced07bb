"""Commands in over MQTT: `cmd/<name>` -> the registry, one reply per command."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from agent import jsonsafe
from agent.app.commands import CallContext, CommandRegistry
from agent.errors import AgentError, CommandError
from agent.mqtt.topics import valid_request_id

log = logging.getLogger(__name__)

MAX_PAYLOAD = 16 * 2**20  # base64 uploads (transcribe, speakers) ride in the JSON payload
MAX_ECHO = 80  # characters of a client's command name or request id echoed back or logged


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


def clip(text: str, n: int = MAX_ECHO) -> str:
    """A client's string, cut for echoing and logging, control characters replaced."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:n])
    return shown if len(text) <= n else shown + "..."


def parse_payload(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """(command payload, request_id); CommandError `bad_payload` / `bad_request_id`."""
    if not raw.strip():
        return {}, None
    try:
        data = jsonsafe.loads_object(raw, max_bytes=MAX_PAYLOAD, what="payload")
    except AgentError as e:
        raise CommandError("bad_payload", e.message) from None
    rid = data.pop("request_id", None)
    if rid is not None and not (isinstance(rid, str) and valid_request_id(rid)):
        raise CommandError("bad_request_id", "request_id must be 1-64 characters of "
                           f"A-Z a-z 0-9 _ . : - (got {clip(repr(rid))})")
    return data, rid


def recover_request_id(raw: bytes) -> str | None:
    """The request id of a payload that failed elsewhere, if it carries a valid one."""
    try:
        data = jsonsafe.loads_object(raw, max_bytes=MAX_PAYLOAD)
    except AgentError:
        return None
    rid = data.get("request_id")
    return rid if isinstance(rid, str) and valid_request_id(rid) else None


class RetainedFilter:
    """Which command messages are retained ones (or their clearing), never to be run.

    A retained command is replayed at every subscribe: running it would repeat a stale
    command at every reconnect. Over MQTT 5 (retain-as-published) every retained message
    says so. Over 3.1.1 only the replayed copies do, and the empty message that clears a
    retained command reaches a connected client as a plain empty command: an empty message on
    a topic seen holding a retained command is that clearing.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()  # topics seen holding a retained command

    def ignore(self, topic: str, raw: bytes, retain: bool) -> bool:
        """Whether this message must not run (logged when so)."""
        if retain:
            log.warning("MQTT: retained command on %s ignored", clip(topic))
            if raw:
                self._held.add(topic)
            else:
                self._held.discard(topic)
            return True
        if not raw and topic in self._held:
            self._held.discard(topic)
            log.info("MQTT: retained command on %s cleared (ignored)", clip(topic))
            return True
        return False


class CommandRouter:
    """Validates a command, runs it through the registry, and builds its reply; never raises."""

    def __init__(self, registry: CommandRegistry,
                 on_error: Callable[[AgentError], None] | None = None) -> None:
        self.registry = registry
        self.on_error = on_error  # told of handler bugs (the daemon: an `error` event)
        self.handled = 0
        self.failed = 0

    async def busy(self, name: str, raw: bytes) -> Reply:
        """The reply to a command refused because too many are running."""
        self.handled += 1
        self.failed += 1
        return Reply(request_id=recover_request_id(raw), command=clip(name), ok=False,
                     error=ReplyError(code="busy", message="too many commands running; "
                                      "try again"))

    async def handle(self, name: str, raw: bytes) -> Reply:
        """Run command `name` (e.g. `ptt/start`) with payload `raw`."""
        rid: str | None = None
        shown = clip(name)
        self.handled += 1
        try:
            if not name:
                raise CommandError("unknown_command", "no command name: publish to "
                                   "cmd/<name>, e.g. cmd/ptt/start")
            payload, rid = parse_payload(raw)
            result = await self.registry.dispatch(
                name, payload, CallContext(surface="mqtt", client="mqtt", loopback=False,
                                           request_id=rid))
        except AgentError as e:
            self.failed += 1
            rid = rid or recover_request_id(raw)
            log.warning("MQTT command %s refused: %s/%s", shown, e.code, clip(e.message, 200))
            return Reply(request_id=rid, command=shown, ok=False,
                         error=ReplyError(code=e.code, message=e.message))
        except Exception as e:
            # A bug in a handler: logged with its traceback; the client still gets its reply.
            self.failed += 1
            log.exception("MQTT command %s failed", shown)
            if self.on_error is not None:
                self.on_error(CommandError("command_failed", f"command {shown} failed: "
                                           f"{type(e).__name__}: {clip(str(e), 200)}"))
            return Reply(request_id=rid or recover_request_id(raw), command=shown, ok=False,
                         error=ReplyError(code="internal", message="internal error (logged by "
                                          "the daemon)"))
        return Reply(request_id=rid, command=shown, ok=True,
                     result=result.model_dump(mode="json"))
