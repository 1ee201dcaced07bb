"""In-process event fan-out: one bounded, drop-oldest queue per subscriber."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any, TypeVar

from agent.events import BaseEvent

log = logging.getLogger(__name__)

_CLOSED = object()
E = TypeVar("E", bound=BaseEvent)


class Subscription:
    """One subscriber's view of the bus; iterate it to receive events in order."""

    def __init__(self, bus: EventBus, maxsize: int, types: Iterable[str] | None, name: str):
        self._bus = bus
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.types = frozenset(types) if types is not None else None
        self.name = name
        self.dropped = 0
        self.delivered = 0

    def _put(self, item: object) -> None:
        if self._queue.full():
            # A slow subscriber must never slow the daemon: lose its oldest event, count it.
            self._queue.get_nowait()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("subscriber %s is slow: %d events dropped", self.name, self.dropped)
        self._queue.put_nowait(item)

    def wants(self, event: BaseEvent) -> bool:
        """Whether this subscriber asked for this event type."""
        return self.types is None or event.type in self.types

    def __aiter__(self) -> AsyncIterator[BaseEvent]:
        return self

    async def __anext__(self) -> BaseEvent:
        item = await self._queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        self.delivered += 1
        assert isinstance(item, BaseEvent)
        return item

    def close(self) -> None:
        """Detach from the bus; iteration ends after what is already queued."""
        self._bus._subs.discard(self)
        self._put(_CLOSED)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._bus._subs.discard(self)


class EventBus:
    """Publishes typed events to every subscriber without ever blocking the publisher."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.published = 0
        self.closed = False

    def subscribe(self, maxsize: int = 1000, types: Iterable[str] | None = None,
                  name: str = "subscriber") -> Subscription:
        """Add a subscriber with its own bounded queue (drop-oldest when full)."""
        sub = Subscription(self, maxsize, types, name)
        if self.closed:
            sub._put(_CLOSED)
        else:
            self._subs.add(sub)
        return sub

    def publish(self, event: BaseEvent) -> None:
        """Deliver `event` to every interested subscriber; never blocks, never raises."""
        if self.closed:
            log.debug("event after close dropped: %s", event.type)
            return
        self.published += 1
        for sub in list(self._subs):
            if sub.wants(event):
                sub._put(event)

    @property
    def dropped(self) -> int:
        """Events dropped across the current subscribers."""
        return sum(s.dropped for s in self._subs)

    def close(self) -> None:
        """End every subscription once it has drained what it holds."""
        self.closed = True
        for sub in list(self._subs):
            sub.close()


class Publisher:
    """Stamps events with this daemon's device id and puts them on the bus."""

    def __init__(self, bus: EventBus, device_id: str) -> None:
        self.bus = bus
        self.device_id = device_id

    def emit(self, cls: type[E], **fields: Any) -> E:
        """Build, publish and return one event."""
        event = cls(device_id=self.device_id, **fields)
        self.bus.publish(event)
        return event
