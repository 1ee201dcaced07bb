"""The front-end base class: a surface (HTTP, MQTT, Wyoming, terminal) over the application."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.app.core import App


class Service(abc.ABC):
    """A front-end that lives as long as the daemon.

    Built before the daemon starts, so it can subscribe to the bus before the first event;
    `run()` returns once `app.stopped` is set (after the bus closed and its subscription
    drained). A service that fails is reported as an `error` event; the daemon goes on.
    """

    name = "service"

    def __init__(self, app: App) -> None:
        self.app = app

    @abc.abstractmethod
    async def run(self) -> None:
        """Serve until the daemon stops."""

    def describe(self) -> str | None:
        """One line for the start-up banner (e.g. the kiosk URL), once it is serving."""
        return None
