"""The analyser hub: every analyser consumes the same utterance audio in parallel, at its pace."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import numpy as np

from agent.analysis import Analyser, Utterance
from agent.bus import Publisher
from agent.errors import AgentError
from agent.events import ErrorEvent

log = logging.getLogger(__name__)

_END = object()


async def _iter_queue(q: asyncio.Queue[object]) -> AsyncIterator[np.ndarray]:
    while True:
        item = await q.get()
        if item is _END:
            return
        assert isinstance(item, np.ndarray)
        yield item


class AnalyserHub:
    """Fans utterance audio out to every analyser through its own unbounded queue.

    Unbounded is safe: an utterance is capped by segmenter.max_utterance_s, and it keeps a
    slow analyser (a long final decode) from ever holding up the others or the capture.
    """

    def __init__(self, analysers: list[Analyser], pub: Publisher) -> None:
        self.analysers = analysers
        self.pub = pub
        self._queues: dict[str, list[asyncio.Queue[object]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0

    def start(self, utt: Utterance) -> None:
        """Begin analysing a new utterance."""
        queues: list[asyncio.Queue[object]] = []
        for a in self.analysers:
            q: asyncio.Queue[object] = asyncio.Queue()
            queues.append(q)
            task = asyncio.create_task(self._run(a, utt, q), name=f"{a.name}:{utt.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._queues[utt.id] = queues

    def audio(self, utt: Utterance, samples: np.ndarray) -> None:
        """Hand the next piece of utterance audio to every analyser."""
        for q in self._queues.get(utt.id, ()):
            q.put_nowait(samples)

    def end(self, utt: Utterance, end_s: float, reason: str, mono: float | None = None) -> None:
        """Close the utterance's audio streams; `mono` is when its end became known."""
        utt.end_s, utt.end_reason = end_s, reason
        utt.end_mono = time.monotonic() if mono is None else mono
        utt.ended.set()
        for q in self._queues.pop(utt.id, ()):
            q.put_nowait(_END)

    async def _run(self, a: Analyser, utt: Utterance, q: asyncio.Queue[object]) -> None:
        try:
            await a.analyse(utt, _iter_queue(q), self.pub)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # One analyser failing must not take down the others or the daemon.
            self.failures += 1
            code = e.code if isinstance(e, AgentError) else type(e).__name__
            log.exception("analyser %s failed on utterance %s", a.name, utt.id)
            self.pub.emit(ErrorEvent, session_id=utt.session_id, utterance_id=utt.id,
                          stage=a.name, code=code, message=str(e))
        finally:
            # Whoever waits for this analyser's result stops waiting, whatever happened.
            utt.result_event(a.name).set()

    @property
    def busy(self) -> int:
        """Analyser tasks still running."""
        return len(self._tasks)

    async def drain(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for running analyses; True when all finished within `timeout`."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for t in pending:
            t.cancel()
        return not pending

    async def close(self) -> None:
        """Cancel what is left and close every analyser."""
        await self.drain(0)
        for a in self.analysers:
            await a.close()
