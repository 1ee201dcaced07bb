"""The Wyoming front-end service: a TCP server for Home Assistant, announced over mDNS.

It starts listening once the daemon is ready (models loaded), so the first `describe` already
lists them; a port that cannot be bound is an `error` event (`wyoming/bind_failed`) and the
daemon goes on without Wyoming, as for the HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from wyoming.server import AsyncTcpServer, HandlerFactory

from agent.app.core import App
from agent.app.service import Service
from agent.errors import AgentError
from agent.wyoming.config import WyomingConfig, wyoming_config
from agent.wyoming.errors import WyomingError
from agent.wyoming.framing import MAX_LINE
from agent.wyoming.handler import WyomingHandler
from agent.wyoming.info import manifest_languages
from agent.wyoming.tts import Voice, local_voice
from agent.wyoming.zeroconf import Advertiser

log = logging.getLogger(__name__)


class _Server(AsyncTcpServer):
    """wyoming's TCP server with a bounded header line and the bound port known (port 0)."""

    async def start(self, handler_factory: HandlerFactory) -> None:
        """Listen without blocking."""
        self._server = await asyncio.start_server(
            partial(self._handler_callback, handler_factory), host=self.host, port=self.port,
            limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop every handler, stop listening, and wait until the sockets are closed."""
        await self.stop()
        if self._server is not None:
            await self._server.wait_closed()
        handlers = list(self._handlers)
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)


class WyomingService(Service):
    """Wyoming STT/TTS on wyoming.host:wyoming.port while the daemon runs."""

    name = "wyoming"

    def __init__(self, app: App, wcfg: WyomingConfig | None = None,
                 zeroconf_interfaces: list[str] | None = None) -> None:
        super().__init__(app)
        self.wcfg = wcfg or wyoming_config(app.cfg)
        self.voices: list[Voice] = []
        self.port: int | None = None
        self.bound = asyncio.Event()
        self.clients: set[WyomingHandler] = set()
        self.advertiser: Advertiser | None = None
        self._zeroconf_interfaces = zeroconf_interfaces
        self._server: _Server | None = None
        self._warm: asyncio.Task[None] | None = None

    # -- clients ----------------------------------------------------------------------------

    def admit(self, handler: WyomingHandler) -> bool:
        """Count a new client in; False past wyoming.max_clients."""
        if len(self.clients) >= self.wcfg.max_clients:
            return False
        self.clients.add(handler)
        return True

    def leave(self, handler: WyomingHandler) -> None:
        """A client is gone."""
        self.clients.discard(handler)

    # -- lifecycle --------------------------------------------------------------------------

    def load_voices(self) -> None:
        """The TTS voices (cheap: the model loads later, in the runner)."""
        if not self.wcfg.tts:
            return
        try:
            self.voices = [local_voice(self.app)]
        except AgentError as e:
            log.warning("Wyoming TTS off: %s", e)
        except ImportError as e:
            log.warning("Wyoming TTS off: %s", e)
        # Hook for replies: once the reply layer has cloud voices (CosyVoice), append them
        # here; `info` and `synthesize` take any `Voice`.

    async def _warm_up(self) -> None:
        for v in self.voices:
            try:
                await v.tts.warm_up()
            except Exception as e:  # the first request will say what is wrong
                log.warning("Wyoming TTS voice %s failed to load: %s", v.name, e)

    async def start(self) -> None:
        """Bind and announce (WyomingError `bind_failed` when the port is taken)."""
        await asyncio.to_thread(self.load_voices)
        engine = self.app.asr_engine
        if engine is not None:
            # The manifest is parsed here, once, so that `describe` answers from memory.
            await asyncio.to_thread(manifest_languages, engine.model_id)
        server = _Server(self.wcfg.host, self.wcfg.port)
        try:
            await server.start(partial(WyomingHandler, service=self))
        except OSError as e:
            raise WyomingError("bind_failed", f"cannot listen on {self.wcfg.host}:"
                               f"{self.wcfg.port}: {e.strerror or e}") from e
        self._server = server
        self.port = server.port
        self.bound.set()
        log.info("Wyoming server on tcp://%s:%d (no authentication: anyone who reaches the "
                 "port can use it)", self.wcfg.host, self.port)
        if self.voices:
            self._warm = asyncio.create_task(self._warm_up(), name="wyoming-tts-warm")
        if self.wcfg.zeroconf:
            name = self.wcfg.zeroconf_name or f"voice-agent-{self.app.cfg.device_id}"
            adv = Advertiser(name, self.wcfg.host, self.port, self._zeroconf_interfaces)
            try:
                await adv.start()
                self.advertiser = adv
            except WyomingError as e:
                self.app.report(e)  # the server still works; HA can be pointed at it by hand

    async def close(self) -> None:
        """Withdraw the announcement, hang up on clients, stop listening."""
        if self.advertiser is not None:
            await self.advertiser.close()
            self.advertiser = None
        if self._warm is not None:
            self._warm.cancel()
            with contextlib.suppress(BaseException):
                await self._warm
        if self._server is not None:
            await self._server.close()
            self._server = None
        for v in self.voices:
            with contextlib.suppress(Exception):
                await v.tts.aclose()

    async def run(self) -> None:
        """Serve from readiness until the daemon stops."""
        ready = asyncio.ensure_future(self.app.ready.wait())
        stopped = asyncio.ensure_future(self.app.stopped.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self.app.stopped.is_set():
            stopped.cancel()
            return
        try:
            try:
                await self.start()
            except WyomingError as e:
                self.app.report(e)
                stopped.cancel()
                return
            await stopped
        finally:
            stopped.cancel()
            await self.close()

    def describe(self) -> str | None:
        """One banner line."""
        if self.port is None:
            return None
        return f"Wyoming STT/TTS on tcp://{self.wcfg.host}:{self.port}"
