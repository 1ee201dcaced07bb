"""The API's listening sockets: a connection cap that holds under floods, and header timeouts.

asyncio's own accept loop takes up to `backlog` sockets at once before any protocol sees
them, and logs every EMFILE it meets. Here each `accept()` is ours: the connection is counted
before it costs more than its socket, past `api.max_connections` (kept under the open-file
limit) the oldest idle connection (headers not finished, or keep-alive between requests) is
closed to make room, or the newcomer gets a one-line 503 and is closed at once, and running out
of file descriptors pauses accepting for a second with one log line per period. Accepted
sockets go to aiohttp with `loop.connect_accepted_socket`.

The header timeout is aiohttp's `keepalive_timeout`: a connection that has not sent a whole
request that long after connecting (or after its previous answer) is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import time
from typing import Any

from aiohttp import web

from agent.api.guard import GuardConfig, RequestGuard

log = logging.getLogger(__name__)

# File descriptors kept for everything but HTTP connections (models, stores, MQTT, logs,
# ffmpeg pipes): at least this many, or a quarter of the limit.
FD_RESERVE = 128
# The soft open-file limit is raised towards the hard one, up to this (the usual soft default,
# 1024, is the first thing a connection flood exhausts).
FD_WANT = 8192
BACKLOG = 64
ACCEPTS_PER_WAKEUP = 16
PAUSE_S = 1.0  # after EMFILE and friends, like asyncio
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BODY = (b'{"error": {"code": "too_many_connections", "message": "too many open connections; '
         b'retry shortly"}}')
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
           + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


def fd_headroom() -> int:
    """Connections the open-file limit leaves room for, after raising the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_WANT if hard == resource.RLIM_INFINITY else min(FD_WANT, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(8, soft - max(FD_RESERVE, soft // 4))


def runner_kwargs(cfg: GuardConfig) -> dict[str, Any]:
    """aiohttp server settings: the header timeout, no request decompression, short lingering."""
    return {"keepalive_timeout": cfg.header_timeout_s, "auto_decompress": False,
            "lingering_time": 2.0}


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port (every address of a name; one when the port is 0)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    unusable: OSError | None = None
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            s = socket.socket(family, kind, proto)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                s.close()
                if e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                unusable = e  # e.g. ::1 for "localhost" on a host without IPv6
                continue
            socks.append(s)
            s.listen(BACKLOG)
            s.setblocking(False)
            if port == 0:
                break
    except OSError:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise unusable or OSError(errno.EADDRNOTAVAIL, f"no address for {host}")
    return socks


class Acceptor:
    """Accepts connections for an aiohttp server, behind a connection cap."""

    def __init__(self, server: web.Server, guard: RequestGuard, limit: int) -> None:
        self.server = server
        self.guard = guard
        self.limit = max(1, min(limit, fd_headroom()))
        if self.limit < limit:
            log.warning("API: at most %d connections (api.max_connections %d is over what the "
                        "open-file limit allows)", self.limit, limit)
        self.sockets: list[socket.socket] = []
        self.refused = 0
        self.evicted = 0
        self.accept_errors = 0
        self._pending = 0  # accepted, not yet handed to aiohttp
        self._born: dict[asyncio.BaseProtocol, float] = {}  # protocols are not weak-referable
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int | None:
        """The bound port."""
        return self.sockets[0].getsockname()[1] if self.sockets else None

    def listen(self, host: str, port: int) -> None:
        """Bind and start accepting; OSError when the address cannot be bound."""
        self.sockets = _bind(host, port)
        for s in self.sockets:
            self._loop.add_reader(s.fileno(), self._on_readable, s)

    def close(self) -> None:
        """Stop accepting (open connections are aiohttp's to close)."""
        for s in self.sockets:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(s.fileno())
            s.close()
        self.sockets = []

    def _open(self) -> int:
        # Connections force-closed a moment ago still hold their socket until connection_lost.
        return self._pending + sum(1 for c in self.server.connections
                                   if getattr(c, "transport", None) is not None)

    def _on_readable(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in RESOURCE_ERRORS:
                    self._out_of_resources(listener, e)
                    return
                continue  # ECONNABORTED and the like: that one client's problem
            if self._open() >= self.limit and not self._evict():
                self._refuse(conn)
                continue
            conn.setblocking(False)
            self._pending += 1
            task = self._loop.create_task(self._hand_over(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol, sock=conn)
        except OSError:
            conn.close()
        finally:
            self._pending -= 1

    def _protocol(self) -> asyncio.BaseProtocol:
        handler = self.server()
        if len(self._born) > 2 * self.limit + 64:
            live = set(self.server.connections)
            self._born = {c: t for c, t in self._born.items() if c in live}
        self._born[handler] = time.monotonic()
        return handler

    def _evict(self) -> bool:
        """Close the oldest connection that is not in a request; False if there is none."""
        idle = [c for c in self.server.connections
                if c not in self.guard.busy and getattr(c, "transport", None) is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: self._born.get(c, 0.0))
        oldest.force_close()
        self.evicted += 1
        self.guard.log_limited("evicted", "API: %d connections open (api.max_connections); "
                               "closing idle ones to make room (%d so far)", self.limit,
                               self.evicted)
        return True

    def _refuse(self, conn: socket.socket) -> None:
        """Every connection is in a request: this one gets a 503 and is closed at once."""
        self.refused += 1
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(REFUSAL)
        conn.close()
        self.guard.log_limited("refused", "API: %d connections in requests; refusing new "
                               "ones (%d so far)", self.limit, self.refused)

    def _out_of_resources(self, listener: socket.socket, e: OSError) -> None:
        self.accept_errors += 1
        self.guard.log_limited("accept", "API: cannot accept connections: %s (%d times so far); "
                               "pausing %g s", e.strerror or e, self.accept_errors, PAUSE_S)
        self._loop.remove_reader(listener.fileno())

        def resume() -> None:
            if listener in self.sockets:
                self._loop.add_reader(listener.fileno(), self._on_readable, listener)

        self._loop.call_later(PAUSE_S, resume)


async def serve(runner: web.BaseRunner, host: str, port: int, guard: RequestGuard) -> Acceptor:
    """Listen on host:port for `runner` (set up already) behind the guard's connection cap."""
    assert runner.server is not None
    acceptor = Acceptor(runner.server, guard, guard.cfg.max_connections)
    acceptor.listen(host, port)
    return acceptor
