"""Push-to-talk gate controller: the one place that HTTP, WebSocket and MQTT commands reach."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.bus import Publisher
from agent.errors import GateError
from agent.events import ErrorEvent, GateMode, GateState, StateChanged

log = logging.getLogger(__name__)

COMMANDS = ("start", "stop", "reset", "toggle")


@dataclass(frozen=True)
class GateMarker:
    """A gate transition, delivered to the pipeline between audio chunks."""

    kind: Literal["open", "close", "reset"]
    session_id: str | None
    reason: str
    # When the command arrived: PTT release -> final latency is measured from here.
    mono: float = field(default_factory=time.monotonic)


def new_id() -> str:
    """Short random id for sessions and utterances."""
    return uuid.uuid4().hex[:16]


class GateController:
    """Holds gate state; commands change it at once and queue a marker for the pipeline."""

    def __init__(self, mode: GateMode, publisher: Publisher, max_hold_s: float = 60.0) -> None:
        self.mode: GateMode = mode
        self.pub = publisher
        self.max_hold_s = max_hold_s
        self._markers: deque[GateMarker] = deque()
        self._hold_timer: asyncio.TimerHandle | None = None
        self.commands = 0
        # Half duplex: while the daemon speaks, audio past the gate reaches the VAD as silence.
        self.muted = False
        self.muted_samples = 0
        if mode == "vad":
            self.state: GateState = "open"
            self.session_id: str | None = new_id()
            self._markers.append(GateMarker("open", self.session_id, "vad_mode"))
        else:
            self.state = "closed"
            self.session_id = None

    @property
    def is_open(self) -> bool:
        """Whether audio currently reaches the pipeline."""
        return self.state == "open"

    def snapshot(self) -> dict[str, Any]:
        """Current state for status APIs."""
        return {"mode": self.mode, "state": self.state, "session_id": self.session_id}

    def mute(self, on: bool) -> None:
        """Half duplex: while on, audio passes the gate as silence (stream time goes on)."""
        self.muted = on

    def drain(self) -> list[GateMarker]:
        """Markers queued since the last call, oldest first."""
        out = list(self._markers)
        self._markers.clear()
        return out

    def _set(self, state: GateState, reason: str) -> None:
        previous = self.state
        if state == previous:
            return
        if state == "open":
            self.session_id = new_id()
            self._arm_hold_timer()
            # An explicit open is the user talking over the daemon (barge-in): their voice is
            # wanted from its first sample, not after the reply has been cancelled.
            self.muted = False
        elif self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.state = state
        self._markers.append(
            GateMarker("open" if state == "open" else "close", self.session_id, reason)
        )
        self.pub.emit(StateChanged, session_id=self.session_id, state=state, previous=previous,
                      mode=self.mode, reason=reason)

    def _arm_hold_timer(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # A lost "stop" (dropped connection, crashed client) must not leave the mic open.
        self._hold_timer = loop.call_later(self.max_hold_s, self._hold_expired)

    def _hold_expired(self) -> None:
        self._hold_timer = None
        if self.state == "open":
            log.warning("push-to-talk held longer than %.0f s: closing", self.max_hold_s)
            self.pub.emit(ErrorEvent, session_id=self.session_id, stage="gate",
                          code="max_hold", message=f"gate open longer than {self.max_hold_s:g} s")
            self._set("closed", "max_hold")

    def _need_ptt(self, command: str) -> None:
        if self.mode == "vad":
            raise GateError("wrong_mode", f"{command!r} needs gate.mode ptt or ptt_toggle; "
                                          "the gate is in vad mode (always listening)")

    def start(self, reason: str = "command") -> dict[str, Any]:
        """Open the gate (ptt); toggle it (ptt_toggle)."""
        self._need_ptt("start")
        if self.mode == "ptt_toggle" and self.state == "open":
            self._set("closed", reason)
        else:
            self._set("open", reason)
        return self.snapshot()

    def stop(self, reason: str = "command") -> dict[str, Any]:
        """Close the gate; the utterance in progress is finished and analysed."""
        self._need_ptt("stop")
        self._set("closed", reason)
        return self.snapshot()

    def toggle(self, reason: str = "command") -> dict[str, Any]:
        """Open if closed, close if open."""
        self._need_ptt("toggle")
        self._set("closed" if self.state == "open" else "open", reason)
        return self.snapshot()

    def reset(self, reason: str = "command") -> dict[str, Any]:
        """Abandon the utterance in progress (no results) and close the gate (ptt modes)."""
        self._markers.append(GateMarker("reset", self.session_id, reason))
        if self.mode != "vad":
            self._set("closed", reason)
        return self.snapshot()

    def handle(self, command: str, reason: str = "command") -> dict[str, Any]:
        """Dispatch a command by name; unknown names raise GateError."""
        if command not in COMMANDS:
            raise GateError("unknown_command",
                            f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
        self.commands += 1
        result: dict[str, Any] = getattr(self, command)(reason)
        return result
