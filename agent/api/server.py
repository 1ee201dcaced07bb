"""The API service: builds the aiohttp app from a daemon and serves it while the daemon runs."""

from __future__ import annotations

import logging
import time
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from agent.api import routes_http, ws_asr, ws_events
from agent.api.auth import auth_middleware
from agent.api.context import CTX, ApiContext, is_loopback
from agent.api.errors import ApiError, error_body, error_response
from agent.app.core import App
from agent.app.service import Service
from agent.errors import AgentError

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 2.0


def _error_response(status: int, code: str, message: str,
                    headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(code, message), status=status, headers=headers)


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
    except Exception:
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
    app = web.Application(
        client_max_size=int(cfg.max_body_mb * 2**20),
        middlewares=[errors_middleware, auth_middleware(cfg.key)],
    )
    app[CTX] = ctx
    routes_http.setup(app, ctx, kiosk_page=cfg.kiosk)
    ws_events.setup(app)
    ws_asr.setup(app)
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

    async def run(self) -> None:
        """Serve until `daemon.stopped`; a port that cannot be bound is an ApiError."""
        cfg = self.ctx.cfg
        if cfg.key is None and not is_loopback(cfg.host):
            log.warning("API on %s without api.key: anyone on the network can use it", cfg.host)
        runner = web.AppRunner(self.web, handle_signals=False, access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
            try:
                await site.start()
            except OSError as e:
                raise ApiError(500, "bind_failed",
                               f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}"
                               ) from e
            addrs = runner.addresses
            self.port = addrs[0][1] if addrs else cfg.port
            log.info("API listening on http://%s:%d/", cfg.host, self.port)
            await self.app.stopped.wait()
        finally:
            await runner.cleanup()
            log.info("API stopped")
