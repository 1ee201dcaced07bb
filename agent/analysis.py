"""What analysers and the decode runner share: utterances, the analyser interface, priorities.

Core layer: model packages (asr, speaker, emotion) implement `Analyser` and schedule their
model calls through a `Runner`; the application layer provides the runner and builds the
analysers; the pipeline feeds them utterances.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from agent.bus import Publisher

T = TypeVar("T")


class Priority(enum.IntEnum):
    """Decode order across the daemon: lower runs first; partials are shed under load."""

    FINAL = 0  # a final someone is waiting for (PTT release, /ws/asr stop, a streaming feed)
    SEGMENT = 1  # a closed sub-segment of an utterance still going on: needed by its final
    ANALYSIS = 2  # per-utterance speaker / emotion
    UPLOAD = 3  # HTTP/CLI uploads: batch work
    PARTIAL = 4  # best effort: superseded by the next one


class Runner(Protocol):
    """Runs synchronous model calls in worker threads, in priority order."""

    async def run(self, fn: Callable[..., T], *args: Any, priority: Priority = Priority.FINAL,
                  kind: str = "asr") -> T:
        """Run `fn(*args)` in a worker; wait for the result."""
        ...

    async def partial(self, fn: Callable[..., T], *args: Any, kind: str = "asr") -> T | None:
        """Run a best-effort call; None when it was shed (more important work waits)."""
        ...


@dataclass
class Utterance:
    """What an analyser knows about the utterance it is given."""

    id: str
    session_id: str | None
    start_s: float
    end_s: float | None = None
    end_reason: str | None = None
    end_mono: float | None = None  # when the end was known: VAD end or PTT release
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # Results analysers leave for each other (e.g. the speaker, for the reply's speaker gate).
    results: dict[str, Any] = field(default_factory=dict)
    done: dict[str, asyncio.Event] = field(default_factory=dict)

    @property
    def aborted(self) -> bool:
        """Reset utterances are abandoned: analysers publish nothing for them."""
        return self.end_reason == "reset"

    def result_event(self, name: str) -> asyncio.Event:
        """Set once analyser `name` has published its result for this utterance."""
        return self.done.setdefault(name, asyncio.Event())


class Analyser(abc.ABC):
    """Consumes one utterance's 16 kHz int16 audio and publishes its own events."""

    name = "analyser"

    @abc.abstractmethod
    async def analyse(self, utt: Utterance, audio: AsyncIterator[np.ndarray],
                      pub: Publisher) -> None:
        """Runs once per utterance; `audio` ends when the utterance ends."""

    @property
    def model_id(self) -> str | None:
        """The model this analyser runs, for status and health."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, most analysers hold nothing
        """Release models and threads."""
