"""A live snapshot of the daemon for status topics and APIs (fed by the bus)."""

from __future__ import annotations

import time
from typing import Any

from agent.bus import Subscription
from agent.events import AsrFinal, BaseEvent, ErrorEvent, UtteranceEnded, UtteranceStarted


class StateTracker:
    """Follows events to know the current utterance, the last final and simple counters."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.current_utterance: str | None = None
        self.last_final: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        self.counts: dict[str, int] = {}

    def apply(self, ev: BaseEvent) -> None:
        """Update from one event."""
        self.counts[ev.type] = self.counts.get(ev.type, 0) + 1
        if isinstance(ev, UtteranceStarted):
            self.current_utterance = ev.utterance_id
        elif isinstance(ev, UtteranceEnded) and ev.utterance_id == self.current_utterance:
            self.current_utterance = None
        elif isinstance(ev, AsrFinal):
            self.last_final = ev.model_dump(include={"utterance_id", "text", "language", "ts"})
        elif isinstance(ev, ErrorEvent):
            self.last_error = ev.model_dump(include={"stage", "code", "message", "ts"})

    async def follow(self, sub: Subscription) -> None:
        """Apply every event until the bus closes."""
        async for ev in sub:
            self.apply(ev)

    @property
    def uptime_s(self) -> float:
        """Seconds since the daemon started."""
        return time.monotonic() - self.started
