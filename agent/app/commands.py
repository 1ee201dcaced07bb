"""The command registry: name -> (payload model, async handler, result model).

Every surface dispatches through it: HTTP `POST /api/<name>`, MQTT `cmd/<name>`, `/ws/events`
`{"command": name, ...}`, Wyoming and the CLI. A capability is added once, as entries here;
each surface has exactly one error mapping (an `AgentError`'s code and status).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.app.ratelimit import RateLimiter
from agent.errors import AgentError, CommandError

log = logging.getLogger(__name__)

Surface = Literal["http", "mqtt", "ws", "cli", "wyoming", "internal"]
# In-process callers (the CLI on this machine, the daemon itself) are not rate-limited.
UNLIMITED = frozenset({"cli", "internal"})
P = TypeVar("P", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)


class Payload(BaseModel):
    """Base of command payloads: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Empty(Payload):
    """A command that takes nothing."""


@dataclass
class CallContext:
    """Who is calling, from where, and what came with the call besides the payload."""

    surface: Surface
    client: str = "local"  # the rate-limit key: e.g. "http:192.168.1.20", "mqtt"
    loopback: bool = True
    attachment: bytes | None = None  # an uploaded file (multipart part, raw audio body)
    attachment_name: str | None = None
    request_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpBinding:
    """How a command appears over HTTP: method and path (`{param}`s fill payload fields)."""

    method: Literal["GET", "POST", "PATCH", "DELETE"] = "POST"
    path: str | None = None  # default: /api/<name>


@dataclass(frozen=True)
class Command(Generic[P, R]):
    """One registry entry."""

    name: str
    payload: type[P]
    result: type[R]
    handler: Callable[[P, CallContext], Awaitable[R]]
    summary: str
    http: HttpBinding = HttpBinding()
    upload: bool = False  # takes an audio file (multipart `file`, an audio/* body, or base64)
    errors: Mapping[int, str] = field(default_factory=dict)  # status -> when (for OpenAPI)
    surfaces: frozenset[Surface] = frozenset({"http", "mqtt", "ws", "cli", "wyoming",
                                              "internal"})

    @property
    def path(self) -> str:
        """The HTTP path."""
        return self.http.path or f"/api/{self.name}"


def validation_message(e: ValidationError) -> str:
    """One line per problem: `field: what is wrong` (unknown fields named as such)."""
    problems = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{where}: {msg}")
    return "; ".join(problems)


class CommandRegistry:
    """Holds the commands; validates, rate-limits and runs them."""

    def __init__(self, limiter: RateLimiter | None = None) -> None:
        self._commands: dict[str, Command[Any, Any]] = {}
        self.limiter = limiter or RateLimiter()
        self.calls: dict[tuple[str, str], int] = {}  # (name, surface) -> calls
        self.failures: dict[tuple[str, str], int] = {}  # (name, code) -> refusals/failures

    def add(self, cmd: Command[Any, Any]) -> None:
        """Register a command (a name is registered once)."""
        if cmd.name in self._commands:
            raise ValueError(f"command {cmd.name!r} registered twice")
        self._commands[cmd.name] = cmd

    def command(self, name: str, payload: type[P], result: type[R], summary: str,
                **options: Any) -> Callable[[Callable[[P, CallContext], Awaitable[R]]],
                                            Callable[[P, CallContext], Awaitable[R]]]:
        """Decorator form of `add`."""
        def deco(fn: Callable[[P, CallContext], Awaitable[R]]
                 ) -> Callable[[P, CallContext], Awaitable[R]]:
            self.add(Command(name, payload, result, fn, summary, **options))
            return fn
        return deco

    def __iter__(self) -> Iterator[Command[Any, Any]]:
        return iter(self._commands.values())

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def get(self, name: str) -> Command[Any, Any]:
        """The command, or CommandError `unknown_command` (404)."""
        cmd = self._commands.get(name)
        if cmd is None:
            known = ", ".join(sorted(self._commands))
            raise CommandError("unknown_command", f"unknown command {name[:80]!r}; expected "
                               f"one of {known}", status=404)
        return cmd

    def parse(self, cmd: Command[P, Any], data: Mapping[str, Any] | BaseModel | None) -> P:
        """The validated payload, or CommandError `bad_payload` (400) naming each field."""
        if isinstance(data, cmd.payload):
            return data
        if isinstance(data, BaseModel):
            data = data.model_dump()
        try:
            return cmd.payload.model_validate(dict(data or {}))
        except ValidationError as e:
            raise CommandError("bad_payload", validation_message(e)) from None

    async def dispatch(self, name: str, data: Mapping[str, Any] | BaseModel | None,
                       ctx: CallContext) -> BaseModel:
        """Run command `name` for `ctx`; raises AgentError (code, status) when refused."""
        try:
            cmd = self.get(name)
            if ctx.surface not in cmd.surfaces:
                raise CommandError("unknown_command", f"{name} is not available over "
                                   f"{ctx.surface}", status=404)
            if ctx.surface not in UNLIMITED:
                self.limiter.check(name, ctx.client, ctx.loopback)
            payload = self.parse(cmd, data)
            self.calls[(name, ctx.surface)] = self.calls.get((name, ctx.surface), 0) + 1
            result: BaseModel = await cmd.handler(payload, ctx)
            return result
        except AgentError as e:
            key = (name if name in self._commands else "?", e.code)
            self.failures[key] = self.failures.get(key, 0) + 1
            raise
