"""API-key check: `X-API-Key` header or `?token=` (browsers cannot set WebSocket headers)."""

from __future__ import annotations

import hashlib
import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import SecretStr

from agent.api.errors import ApiError

log = logging.getLogger(__name__)

HEADER = "X-API-Key"
QUERY = "token"
PUBLIC_PATHS = frozenset({"/api/health"})


def _digest(value: str) -> bytes:
    # Hashing first gives equal-length inputs, so not even the key's length leaks.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def presented(request: web.Request) -> str | None:
    """The key the client sent, header first; None when it sent none."""
    return request.headers.get(HEADER) or request.query.get(QUERY) or None


def key_matches(given: str | None, key: SecretStr) -> bool:
    """Constant-time comparison of the presented key with the configured one."""
    if given is None:
        return False
    return hmac.compare_digest(_digest(given), _digest(key.get_secret_value()))


def auth_middleware(key: SecretStr | None) -> Middleware:
    """401 for every route but the public ones unless the right key comes with the request."""

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if key is None or request.path in PUBLIC_PATHS:
            return await handler(request)
        given = presented(request)
        if not key_matches(given, key):
            log.info("refused %s %s from %s: %s API key", request.method, request.path,
                     request.remote, "wrong" if given else "no")
            raise ApiError(401, "unauthorized",
                           f"{'wrong' if given else 'missing'} API key: send it in the "
                           f"{HEADER} header (or ?{QUERY}= where headers cannot be set)")
        return await handler(request)

    return check_key
