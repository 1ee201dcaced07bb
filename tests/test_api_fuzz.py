"""Schemathesis against /api/openapi.json: generated and mutated requests never get a 5xx."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed "
                                   "(pip install -e .[dev])")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from agent import models  # noqa: E402
from agent.api.openapi import build_spec  # noqa: E402
from agent.api.server import ApiService  # noqa: E402
from agent.asr.base import AsrEngine  # noqa: E402
from agent.errors import ModelError  # noqa: E402

from .test_api import KEY, MODEL, StubEngine, make_daemon  # noqa: E402

EXAMPLES = 50  # per operation and phase: the whole file stays well under a minute
# Small limits: the audio_too_long and too_large paths are closer.
SERVER_ENV = {"api__key": KEY, "api__max_body_mb": "0.5", "api__max_audio_s": "20"}


def _engine() -> AsrEngine:
    """The real model when installed (random audio through the real decoder), else a stub."""
    try:
        models.path(MODEL)
    except ModelError:
        return StubEngine()
    from agent.asr.sherpa import make_engine
    from agent.config import SherpaOfflineAsrConfig

    return make_engine(SherpaOfflineAsrConfig(model=MODEL))


class ServerThread:
    """The API on a real port, served by its own event loop in a thread (requests blocks)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="api-fuzz-server", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:  # reported by start()
            self.error = e
            self._started.set()

    async def _serve(self) -> None:
        from aiohttp import web

        d = make_daemon(_engine(), **SERVER_ENV)
        svc = next(s for s in d.services if isinstance(s, ApiService))
        runner = web.AppRunner(svc.web, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        await runner.cleanup()

    def start(self) -> str:
        self._thread.start()
        self._started.wait(60)
        if self.error is not None:
            raise self.error
        return self.url

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    server = ServerThread()
    yield server.start()
    server.stop()


def _spec() -> dict[str, Any]:
    """The document the fuzz server serves (same config), known before any server runs."""
    d = make_daemon(StubEngine(), **SERVER_ENV)
    svc = next(s for s in d.services if isinstance(s, ApiService))
    d.bus.close()
    return build_spec(d.cfg.api, d.app.commands, svc.web.router)


schemathesis.serializer.alias("audio/wav", "application/octet-stream")
schema = schemathesis.openapi.from_dict(_spec())


def test_fuzzed_document_is_the_served_one(api_url: str) -> None:
    import requests

    served = requests.get(f"{api_url}/api/openapi.json", headers={"X-API-Key": KEY}, timeout=10)
    assert served.status_code == 200 and served.json() == schema.raw_schema


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case: Any, api_url: str) -> None:
    # Every other check runs (status codes, content types and bodies as documented, auth
    # enforced, 405 for other methods). Not positive_data_acceptance: a body that matches
    # the schema ("any base64 string") is still rightly refused when it is not audio.
    case.call_and_validate(base_url=api_url, headers={"X-API-Key": KEY},
                           excluded_checks=[positive_data_acceptance])


def test_the_fuzzer_reached_every_route_and_error(api_url: str) -> None:
    import requests

    text = requests.get(f"{api_url}/metrics", headers={"X-API-Key": KEY}, timeout=10).text
    seen: dict[str, set[str]] = {}
    for route, status in re.findall(
            r'^voice_agent_http_requests_total\{method="[A-Z]+",route="([^"]*)",'
            r'status="(\d+)"\}', text, re.M):
        seen.setdefault(route, set()).add(status)
    documented = {p for p in schema.raw_schema["paths"]}
    assert documented <= set(seen), documented - set(seen)
    statuses = set().union(*seen.values())
    assert {"200", "400", "401", "405", "415"} <= statuses, seen  # 413: tests/test_api.py
    assert not any(s.startswith("5") for s in statuses), seen
