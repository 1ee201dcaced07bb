"""mDNS advertisement of the Wyoming server (`_wyoming._tcp.local.`), as Home Assistant finds it.

HA's Wyoming integration browses for this service type and offers to add what it finds, with
the host and port from the record. An unroutable bind address (0.0.0.0) is advertised as this
machine's address on its default route.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

from agent.wyoming.errors import WyomingError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."


def advertised_address(host: str) -> str:
    """The IPv4 address to put in the record for a server bound to `host`."""
    if host not in ("", "0.0.0.0", "::"):
        with contextlib.suppress(OSError):
            return socket.gethostbyname(host)
        return host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("224.0.0.251", 5353))  # picks the multicast interface; sends nothing
        addr: str = s.getsockname()[0]
        return addr
    return "127.0.0.1"


class Advertiser:
    """Registers one service record while the server runs."""

    def __init__(self, name: str, host: str, port: int,
                 interfaces: list[str] | None = None) -> None:
        self.name = name
        self.address = advertised_address(host)
        self.port = port
        self.interfaces = interfaces
        self._zc: Any = None
        self._info: Any = None

    @property
    def service_name(self) -> str:
        """The full instance name (may gain a suffix if the name was taken on the network)."""
        return self._info.name if self._info is not None else f"{self.name}.{SERVICE_TYPE}"

    async def start(self) -> None:
        """Announce the service; WyomingError when zeroconf is missing or cannot start."""
        try:
            from zeroconf import InterfaceChoice, IPVersion
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
        except ImportError as e:
            raise WyomingError("zeroconf_missing", f"zeroconf is not installed ({e}): pip "
                               "install zeroconf, or set wyoming.zeroconf: false") from e
        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces or InterfaceChoice.All,
                                     ip_version=IPVersion.V4Only)
            host = socket.gethostname().split(".")[0] or "voice-agent"
            self._info = AsyncServiceInfo(
                SERVICE_TYPE, f"{self.name}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(self.address)], port=self.port,
                properties={"version": "1"}, server=f"{host}.local.")
            # Another device may use the name already: take "name (2)" rather than fail.
            await self._zc.async_register_service(self._info, allow_name_change=True)
        except Exception as e:
            await self.close()
            raise WyomingError("zeroconf_failed", f"cannot announce {self.name} over mDNS: "
                               f"{e}") from e
        log.info("Wyoming announced over mDNS as %s (%s:%d)", self.service_name, self.address,
                 self.port)

    async def close(self) -> None:
        """Withdraw the record and close the sockets."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        with contextlib.suppress(Exception):
            if self._info is not None:
                await zc.async_unregister_service(self._info)
        with contextlib.suppress(Exception):
            await zc.async_close()
