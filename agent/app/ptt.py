"""Push-to-talk commands: `ptt/start`, `ptt/stop`, `ptt/reset`, `ptt/toggle`, and `listening`.

`listening` sets the gate to a wanted state (`{"on": true}` opens it, `{"on": false}` closes
it) and does nothing when it is already there: what a switch needs (Home Assistant's
"Listening" switch), where `ptt/toggle` would flip a gate that someone else already opened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel, StrictBool

from agent.app.commands import CallContext, Command, Empty, Payload
from agent.app.status import GateStatus
from agent.errors import GateError
from agent.pipeline.gate import COMMANDS

if TYPE_CHECKING:
    from agent.app.core import App


class PttResult(BaseModel):
    """The gate after the command."""

    ok: bool = True
    command: str  # the gate command: start, stop, reset, toggle
    gate: GateStatus


class ListeningRequest(Payload):
    """The gate state wanted: open (`on`) or closed."""

    on: StrictBool  # strict: 0 or "off" is a mistake, not false


SUMMARIES = {
    "start": "Push-to-talk: open the gate (ptt_toggle mode: toggle it)",
    "stop": "Push-to-talk: close the gate; the utterance in progress is finished and analysed",
    "reset": "Push-to-talk: abandon the utterance in progress (no results) and close the gate",
    "toggle": "Push-to-talk: open if closed, close if open",
}


def _handler(app: App, gate_cmd: str) -> Callable[[Empty, CallContext], Awaitable[PttResult]]:
    async def handler(_: Empty, ctx: CallContext) -> PttResult:
        app.gate.handle(gate_cmd, reason=ctx.surface)
        return PttResult(command=gate_cmd, gate=app.gate_status())
    return handler


def _listening(app: App) -> Callable[[ListeningRequest, CallContext], Awaitable[PttResult]]:
    async def handler(req: ListeningRequest, ctx: CallContext) -> PttResult:
        gate = app.gate
        if gate.mode == "vad":
            # Refused like the ptt commands: in vad mode the VAD alone decides.
            raise GateError("wrong_mode", "'listening' needs gate.mode ptt or ptt_toggle; the "
                            "gate is in vad mode (always listening)")
        want = "open" if req.on else "closed"
        command = "none"
        if gate.state != want:
            # `start` opens a closed gate in both ptt modes (in ptt_toggle it toggles, and the
            # gate is closed here); `stop` closes in both.
            command = "start" if req.on else "stop"
            gate.handle(command, reason=ctx.surface)
        return PttResult(command=command, gate=app.gate_status())
    return handler


def register(app: App) -> None:
    """Add the four gate commands and `listening`."""
    for gate_cmd in COMMANDS:
        app.commands.add(Command(
            f"ptt/{gate_cmd}", Empty, PttResult, _handler(app, gate_cmd), SUMMARIES[gate_cmd],
            errors={409: "refused: the gate is in vad mode (wrong_mode)"}))
    app.commands.add(Command(
        "listening", ListeningRequest, PttResult, _listening(app),
        "Set listening on (open the gate) or off (close it); nothing changes when it already "
        "is (`command` says what was done: start, stop or none)",
        errors={409: "refused: the gate is in vad mode (wrong_mode)"}))
