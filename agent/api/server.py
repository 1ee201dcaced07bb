"""The API service: builds the aiohttp app from a daemon and serves it while the daemon runs."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from agent.api import accept, routes_http, ws_asr, ws_events, ws_tts, ws_verify
from agent.api import guard as guards
from agent.api.auth import auth_middleware
from agent.api.context import CTX, ApiContext, is_loopback
from agent.api.errors import ApiError, error_body, error_response
from agent.app.core import App
from agent.app.service import Service
from agent.errors import AgentError

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 2.0  # requests in flight when the daemon stops: then answered 503
GUARD = web.AppKey("voice_agent_guard", guards.RequestGuard)
CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer"


def _error_response(status: int, code: str, message: str,
                    headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(code, message), status=status, headers=headers)


def _client_gone(request: web.Request, exc: BaseException) -> bool:
    """The request failed because its client hung up (mid-upload, typically)."""
    transport = request.transport
    return isinstance(exc, ConnectionError) or transport is None or transport.is_closing()


def _code_for(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure is JSON `{"error": {code, message}}`; request metrics are counted here."""
    ctx = request.app[CTX]
    t0 = time.monotonic()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    status = 500
    try:
        limit = int(ctx.cfg.max_body_mb * 2**20)
        if request.content_length is not None and request.content_length > limit:
            # Refused before reading a byte of it.
            raise ApiError(413, "too_large", f"request body of {request.content_length} bytes "
                           f"is over api.max_body_mb = {ctx.cfg.max_body_mb:g} MiB")
        resp = await handler(request)
        status = resp.status
        return resp
    except AgentError as e:
        resp = error_response(e)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        if e.status < 400:
            raise
        if e.status == 413:
            message = (f"request body is over api.max_body_mb = {ctx.cfg.max_body_mb:g} MiB")
            return _error_response(413, "too_large", message)
        # Keep Allow (405) and friends; replace aiohttp's text body with our JSON one.
        headers = {k: v for k, v in e.headers.items()
                   if k.lower() not in ("content-type", "content-length")}
        return _error_response(e.status, _code_for(e.status), e.text or e.reason, headers)
    except HttpProcessingError as e:
        # A malformed body seen while a handler reads it: the client's fault, not ours.
        status = e.code if 400 <= e.code < 500 else 400
        return _error_response(status, "bad_request", f"malformed request: {e.message}")
    except Exception as e:
        if _client_gone(request, e):
            # Not our failure, and nobody is left to read an answer: one line, counted as 499.
            status = CLIENT_CLOSED
            log.info("%s %s: client %s went away before the answer (%s)", request.method,
                     request.path, request.remote, type(e).__name__)
            return _error_response(status, "client_closed", "the client closed the connection")
        # A bug: logged with its traceback, and the client still gets JSON.
        log.exception("%s %s failed", request.method, request.path)
        return _error_response(500, "internal", "internal error (logged by the daemon)")
    finally:
        if name != "unmatched" or status != 404:
            ctx.metrics.http.inc(route=name, method=request.method, status=str(status))
        ctx.metrics.http_s.observe(time.monotonic() - t0, route=name)


def build_app(ctx: ApiContext) -> web.Application:
    """The aiohttp application for `ctx` (also what tests serve with aiohttp's test server)."""
    cfg = ctx.cfg
    guard = guards.RequestGuard(guards.GuardConfig.from_api(cfg))
    app = web.Application(
        client_max_size=int(cfg.max_body_mb * 2**20),
        # The guard before the key: a forged cross-site request is refused whatever it holds.
        middlewares=[errors_middleware, guard.middleware, auth_middleware(cfg.key)],
    )
    app[CTX] = ctx
    app[GUARD] = guard
    app.on_response_prepare.append(guard.on_prepare)
    routes_http.setup(app, ctx, kiosk_page=cfg.kiosk)
    ws_events.setup(app)
    ws_asr.setup(app)
    ws_tts.setup(app)
    ws_verify.setup(app)
    app.cleanup_ctx.append(ctx.lifecycle)
    app.on_shutdown.append(ctx.close_sockets)
    return app


class ApiService(Service):
    """HTTP + WebSocket API on api.host:api.port for as long as the daemon runs."""

    name = "api"

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.ctx = ApiContext(app)
        self.web = build_app(self.ctx)
        self.port: int | None = None  # the bound port (api.port may be 0)
        self.bound = asyncio.Event()  # listening: the banner can show the URL
        self.acceptor: accept.Acceptor | None = None  # the listening sockets, once bound

    def url(self) -> str | None:
        """The kiosk URL (with `?token=` when a key is set), once listening."""
        if self.port is None:
            return None
        cfg = self.ctx.cfg
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        host = f"[{host}]" if ":" in host else host
        token = ""
        if cfg.key is not None:
            token = "?token=" + urllib.parse.quote(cfg.key.get_secret_value(), safe="")
        return f"http://{host}:{self.port}/{token}"

    def describe(self) -> str | None:
        """One banner line: where the kiosk and the API are."""
        url = self.url()
        return None if url is None else f"kiosk and API at {url}"

    async def run(self) -> None:
        """Serve until `daemon.stopped`; a port that cannot be bound is an ApiError."""
        cfg = self.ctx.cfg
        if cfg.key is None and not is_loopback(cfg.host):
            log.warning("API on %s without api.key: anyone on the network can use it", cfg.host)
        guard = self.web[GUARD]
        runner = make_runner(self.web)
        await runner.setup()
        try:
            try:
                self.acceptor = await accept.serve(runner, cfg.host, cfg.port, guard)
            except OSError as e:
                raise ApiError(500, "bind_failed",
                               f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}"
                               ) from e
            self.port = self.acceptor.port or cfg.port
            log.info("API listening on http://%s:%d/", cfg.host, self.port)
            self.bound.set()
            await self.app.stopped.wait()
            await guard.drain(SHUTDOWN_TIMEOUT_S)
        finally:
            if self.acceptor is not None:
                self.acceptor.close()
            await runner.cleanup()
            log.info("API stopped")


def make_runner(web_app: web.Application) -> web.AppRunner:
    """The aiohttp runner for `web_app` with the guard's timeouts (serve it with accept.serve)."""
    return web.AppRunner(web_app, handle_signals=False, access_log=None,
                         shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                         **accept.runner_kwargs(web_app[GUARD].cfg))
