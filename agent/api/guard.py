"""What stands between the network and the API's handlers.

- **Host** (every request): only names this daemon answers to (loopback names, IP literals,
  the bind address, `api.allowed_hosts`), so a DNS-rebound page cannot talk to it.
- **Origin** (WebSocket handshakes and state-changing requests): same-origin or one of
  `api.cors_origins`; browsers send it on exactly the requests another site could forge (a
  `text/plain` POST, a WebSocket), and CORS stays closed unless it is configured.
- **Bodies** must have fully arrived within `api.body_timeout_s`; requests still running when
  the daemon stops are answered 503 (not dropped); compressed request bodies are refused.

The connection cap and the header timeout are in `agent.api.accept`; `busy` here tells it
which connections are inside a request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from agent.api.errors import ApiError, error_body
from agent.config import ApiConfig

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                            "ip6-loopback"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CORS_METHODS = "GET, POST, PATCH, DELETE"
CORS_HEADERS = "X-API-Key, Content-Type"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
LOG_EVERY_S = 10.0  # repeated refusals and accept errors: one log line this often
MAX_SHOWN = 100  # characters of a client's Host/Origin echoed back


@dataclass(frozen=True)
class GuardConfig:
    """The guard's settings, from `api.*`, normalised for matching."""

    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    bind_host: str = "127.0.0.1"

    @classmethod
    def from_api(cls, cfg: ApiConfig) -> GuardConfig:
        """From the `api` config section."""
        return cls(
            allowed_hosts=tuple(h.lower().rstrip(".") for h in cfg.allowed_hosts),
            cors_origins=tuple(o for o in (normal_origin(x) for x in cfg.cors_origins) if o),
            max_connections=cfg.max_connections, header_timeout_s=cfg.header_timeout_s,
            body_timeout_s=cfg.body_timeout_s, bind_host=cfg.host)


def _shown(value: str) -> str:
    cut = "".join(c if c.isprintable() else "?" for c in value[:MAX_SHOWN])
    return cut + ("..." if len(value) > MAX_SHOWN else "")


def split_host(value: str) -> tuple[str, int | None]:
    """`Host` header -> (lower-case name without brackets or trailing dot, port or None)."""
    value = value.strip().lower()
    port: int | None = None
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif value.count(":") == 1:
        name, _, p = value.partition(":")
        port = int(p) if p.isdigit() else -1
    else:
        name = value
    return name.rstrip("."), port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def host_allowed(name: str, cfg: GuardConfig) -> bool:
    """Whether requests naming host `name` are served.

    IP literals always are: no DNS is involved, so no page can rebind them.
    """
    if _is_ip(name) or name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    if name == cfg.bind_host.lower().rstrip("."):
        return True
    for pattern in cfg.allowed_hosts:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def normal_origin(origin: str) -> str | None:
    """`scheme://host:port` with the default port made explicit; None when not an origin."""
    try:
        u = urllib.parse.urlsplit(origin.strip())
        port = u.port
    except ValueError:
        return None
    if u.scheme not in DEFAULT_PORTS or not u.hostname:
        return None
    host = u.hostname.rstrip(".")
    host = f"[{host}]" if ":" in host else host
    return f"{u.scheme}://{host}:{port or DEFAULT_PORTS[u.scheme]}"


def same_origin(origin: str, host_header: str) -> bool:
    """Whether `origin` names the host and port this request was sent to."""
    o = normal_origin(origin)
    if o is None:
        return False
    scheme, rest = o.split("://", 1)
    o_host, o_port = split_host(rest)
    h_host, h_port = split_host(host_header)
    return o_host == h_host and o_port == (h_port or DEFAULT_PORTS[scheme])


def _websocket(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


class RequestGuard:
    """The checks and bookkeeping around every request (one aiohttp middleware)."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.draining = False
        self.refused: dict[str, int] = {}  # code -> requests refused by the guard
        # Connections (aiohttp protocols) inside a request now; the rest may be evicted.
        self.busy: set[asyncio.BaseProtocol] = set()
        self._inflight: dict[asyncio.Task[web.StreamResponse], web.Request] = {}
        self._streaming: set[int] = set()  # id() of requests whose answer has begun
        self._why: dict[asyncio.Task[web.StreamResponse], str] = {}  # our cancellations
        self._logged: dict[str, float] = {}

    # -- checks -----------------------------------------------------------------------------

    def _refuse(self, status: int, code: str, message: str) -> ApiError:
        self.refused[code] = self.refused.get(code, 0) + 1
        self.log_limited(code, "API refused a request: %s", message)
        return ApiError(status, code, message)

    def log_limited(self, key: str, msg: str, *args: object) -> None:
        """Log at most once per LOG_EVERY_S for `key` (floods must not fill the journal)."""
        now = time.monotonic()
        if now - self._logged.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[key] = now
            log.warning(msg, *args)

    def check(self, request: web.BaseRequest) -> None:
        """Host, Origin and Content-Encoding; ApiError 403/415 when refused."""
        host = request.headers.get("Host")
        if host is not None and not host_allowed(split_host(host)[0], self.cfg):
            raise self._refuse(403, "bad_host", f"this daemon does not answer to Host "
                               f"{_shown(host)!r}: add the name to api.allowed_hosts")
        if request.method not in SAFE_METHODS or _websocket(request):
            if not self.origin_allowed(request):
                origin = request.headers.get("Origin")
                shown = _shown(origin) if origin is not None else "another site"
                raise self._refuse(403, "cross_origin", f"refused a cross-site request from "
                                   f"{shown!r}: only the daemon's own pages (or "
                                   "api.cors_origins) may send it")
        enc = request.headers.get("Content-Encoding", "identity").strip().lower()
        if enc not in ("", "identity"):
            # Decompressing is work (and memory) the client chooses; audio is compressed already.
            raise self._refuse(415, "unsupported_encoding", f"Content-Encoding {_shown(enc)!r} "
                               "is not accepted: send the body uncompressed")

    def origin_allowed(self, request: web.BaseRequest) -> bool:
        """Same-origin (or a configured CORS origin), or no browser involved at all."""
        origin = request.headers.get("Origin")
        if origin is None:
            # No Origin: not a browser (curl, scripts, MQTT bridges), or a same-origin
            # navigation; browsers that say where a request comes from are believed.
            return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin",
                                                                            "none")
        if normal_origin(origin) in self.cfg.cors_origins:
            return True
        host = request.headers.get("Host")
        return host is not None and same_origin(origin, host)

    def _cors_origin(self, request: web.BaseRequest) -> str | None:
        origin = request.headers.get("Origin")
        if origin is not None and normal_origin(origin) in self.cfg.cors_origins:
            return origin
        return None

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """aiohttp on_response_prepare: CORS headers for configured origins, on every answer."""
        self._streaming.add(id(request))  # a stream (SSE) begun cannot be answered 503 any more
        origin = self._cors_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers.add("Vary", "Origin")

    # -- the middleware ---------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Checks, then the handler in a task of its own (body deadline, draining)."""
        if self.draining:
            return self._answer(503, "stopping", "the daemon is stopping; retry once it is "
                                "back", retry_after=5)
        self.check(request)
        if request.method == "OPTIONS" and self._cors_origin(request) and \
                "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS, "Access-Control-Max-Age": "600"})
        protocol = request.protocol
        if protocol is not None:
            self.busy.add(protocol)
        try:
            if _websocket(request):
                # Long-lived: closed by the API's shutdown hook, not answered 503.
                return await handler(request)
            return await self._bounded(request, handler)
        finally:
            if protocol is not None:
                self.busy.discard(protocol)

    async def _bounded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task: asyncio.Task[web.StreamResponse] = asyncio.ensure_future(handler(request))
        self._inflight[task] = request
        timer = None
        if request.body_exists and not request.content.is_eof():
            timer = asyncio.get_running_loop().call_later(
                self.cfg.body_timeout_s, self._body_deadline, request, task)
        try:
            return await task
        except asyncio.CancelledError:
            why = self._why.pop(task, None)
            current = asyncio.current_task()
            if why is None or (current is not None and current.cancelling()):
                raise
            if why == "body_timeout":
                return self._answer(408, "body_timeout", "the request body did not arrive "
                                    f"within {self.cfg.body_timeout_s:g} s (api.body_timeout_s)")
            return self._answer(503, "stopping", "the daemon stopped before this request "
                                "finished; retry once it is back", retry_after=5)
        finally:
            if timer is not None:
                timer.cancel()
            self._inflight.pop(task, None)
            self._why.pop(task, None)
            self._streaming.discard(id(request))

    def _body_deadline(self, request: web.Request, task: asyncio.Task[Any]) -> None:
        if not request.content.is_eof() and not task.done():
            self.refused["body_timeout"] = self.refused.get("body_timeout", 0) + 1
            self.log_limited("body_timeout", "API: %s %s from %s: body not complete after "
                             "%g s, refused (408)", request.method, request.path,
                             request.remote, self.cfg.body_timeout_s)
            self._why[task] = "body_timeout"
            task.cancel()

    def _answer(self, status: int, code: str, message: str,
                retry_after: int | None = None) -> web.Response:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        resp = web.json_response(error_body(code, message), status=status, headers=headers)
        resp.force_close()  # a client we refuse this way gets no keep-alive
        return resp

    async def drain(self, grace_s: float) -> None:
        """Stop taking requests; give those in flight `grace_s`, then answer them 503."""
        self.draining = True
        # Streams already answering (SSE) end with the server's own shutdown, like WebSockets.
        pending = [t for t, r in self._inflight.items()
                   if not t.done() and id(r) not in self._streaming]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for t in late:
                self._why[t] = "stopping"
                t.cancel()
            if late:
                log.info("API stopping: %d requests still running answered 503", len(late))
                # Let the middleware write those answers before the connections close.
                await asyncio.wait(late, timeout=1.0)
                await asyncio.sleep(0.05)
