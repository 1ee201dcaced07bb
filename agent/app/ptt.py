"""Push-to-talk commands: `ptt/start`, `ptt/stop`, `ptt/reset`, `ptt/toggle`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel

from agent.app.commands import CallContext, Command, Empty
from agent.app.status import GateStatus
from agent.pipeline.gate import COMMANDS

if TYPE_CHECKING:
    from agent.app.core import App


class PttResult(BaseModel):
    """The gate after the command."""

    ok: bool = True
    command: str  # the gate command: start, stop, reset, toggle
    gate: GateStatus


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


def register(app: App) -> None:
    """Add the four gate commands."""
    for gate_cmd in COMMANDS:
        app.commands.add(Command(
            f"ptt/{gate_cmd}", Empty, PttResult, _handler(app, gate_cmd), SUMMARIES[gate_cmd],
            errors={409: "refused: the gate is in vad mode (wrong_mode)"}))
