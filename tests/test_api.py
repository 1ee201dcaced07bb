"""HTTP + WebSocket API: every route with auth on and off, every bad input, real recognition."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from agent import models
from agent.api.auth import key_matches
from agent.api.openapi import build_spec
from agent.api.server import ApiService
from agent.asr.analyser import AsrAnalyser
from agent.asr.base import AsrEngine, Transcript
from agent.asr.wer import wer
from agent.audio.decode import windows
from agent.config import SherpaOfflineAsrConfig, load_config
from agent.daemon import Daemon
from agent.errors import ConfigError, ModelError
from agent.events import AsrFinal, ErrorEvent, UtteranceEnded

from .conftest import ASR_EN, asr_en_rows, need_shared
from .sources import SilentSource

KEY = "kiosk-key-0123456789"
MODEL = "whisper-tiny.en-int8"
BASE_ENV = {"VOICE_AGENT__API__ENABLED": "true", "VOICE_AGENT__GATE__MODE": "ptt",
            "VOICE_AGENT__ASR__ENABLED": "false", "VOICE_AGENT__API__PORT": "0",
            # API tests never open a speaker, and load no models they do not use.
            "VOICE_AGENT__PLAYBACK__ENABLED": "false", "VOICE_AGENT__EMOTION__ENABLED": "false",
            "VOICE_AGENT__SPEAKER__ENABLED": "false",
            "VOICE_AGENT__STATE_DIR": tempfile.mkdtemp(prefix="voice-agent-api-test-")}
# Whisper tiny.en scores ~9 % on these clips; the bound catches broken audio paths (> 50 %).
WER_BOUND = 0.2
WS_TIMEOUT = 20.0


class StubEngine(AsrEngine):
    """An engine whose transcript is the number of samples it was given: no model needed."""

    model_id = "stub"
    language = "en"

    def decode(self, audio: np.ndarray) -> Transcript:
        return Transcript(f"{len(audio)} samples", "en")


def make_daemon(engine: AsrEngine | None = None, **env: str) -> Daemon:
    """A daemon with the API enabled, not running: its app is served by aiohttp's test server."""
    cfg = load_config(None, env={**BASE_ENV, **{f"VOICE_AGENT__{k.upper()}": v
                                                for k, v in env.items()}})
    d = Daemon(cfg, analysers=[], source=SilentSource(30))
    if engine is not None:
        d.app.analysers["asr"] = AsrAnalyser(engine, d.app.runner)
    d.ready.set()
    return d


def api_service(d: Daemon) -> ApiService:
    return next(s for s in d.services if isinstance(s, ApiService))


@asynccontextmanager
async def serve(d: Daemon) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(api_service(d).web)) as client:
        yield client


@pytest.fixture(scope="module")
def engine() -> AsrEngine:
    """The real default model (loaded once per module)."""
    need_shared()
    try:
        models.path(MODEL)
    except ModelError as e:
        pytest.skip(f"ASR model {MODEL} not installed ({e.message})")
    from agent.asr.sherpa import make_engine

    return make_engine(SherpaOfflineAsrConfig(model=MODEL))


def clip(name: str) -> tuple[np.ndarray, str]:
    """A shared clip (16 kHz float32) and its reference."""
    ref = next(r["reference"] for r in asr_en_rows() if r["file"] == name)
    x, sr = sf.read(ASR_EN / name, dtype="float32")
    assert sr == 16000
    return x, ref


def encode(x: np.ndarray, fmt: str, rate: int = 16000) -> bytes:
    """The samples as a WAV/FLAC/OGG file in memory; MP3 and webm/opus through ffmpeg."""
    if fmt in ("MP3", "WEBM"):
        wav = encode(x, "WAV", rate)
        out = ["-f", "mp3"] if fmt == "MP3" else ["-c:a", "libopus", "-f", "webm"]
        p = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "wav", "-i", "-",
                            *out, "-"], input=wav, capture_output=True, check=True)
        return p.stdout
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype={"WAV": "PCM_16", "FLAC": "PCM_16",
                                               "OGG": "VORBIS"}[fmt])
    return buf.getvalue()


async def error_of(resp: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return str(body["error"]["message"])


# ---- health, auth ----------------------------------------------------------------------------


async def test_health_is_public_and_reports_models() -> None:
    d = make_daemon(StubEngine(), api__key=KEY)
    d.ready.clear()
    async with serve(d) as client:
        r = await client.get("/api/health")
        assert r.status == 200
        body = await r.json()
        assert body["status"] == "starting" and body["ready"] is False
        d.ready.set()
        body = await (await client.get("/api/health")).json()
        assert body["status"] == "ok" and body["version"] and body["uptime_s"] >= 0
        assert body["models"] == {"asr": "stub", "vad": "webrtc", "speaker": None,
                                  "emotion": None, "tts": "piper-joe-us"}
        assert body["device_id"] == d.cfg.device_id


def _requests(spec: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for path, ops in spec["paths"].items():
        for method in ops:
            out.append((method.upper(), path.replace("{name}", "app.js")))
    return out


async def test_every_route_needs_the_key_when_one_is_set() -> None:
    d = make_daemon(StubEngine(), api__key=KEY)
    spec = build_spec(d.cfg.api, d.app.commands, api_service(d).web.router)
    routes = _requests(spec)
    # The document describes exactly the routes served: the fixed views and every command.
    served = {(r.method, r.resource.canonical) for r in api_service(d).web.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    assert {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops} == served
    assert {("POST", c.path) for c in d.app.commands if c.http.method == "POST"} <= served
    assert len(routes) >= 13
    async with serve(d) as client:
        for method, path in routes:
            public = path == "/api/health"
            r = await client.request(method, path)
            if public:
                assert r.status == 200
                continue
            msg = await error_of(r, 401, "unauthorized")
            assert "missing API key" in msg and "X-API-Key" in msg
            r = await client.request(method, path, headers={"X-API-Key": KEY + "x"})
            assert "wrong API key" in await error_of(r, 401, "unauthorized")
            r = await client.request(method, path, headers={"X-API-Key": KEY[:-1]})
            await error_of(r, 401, "unauthorized")
            for kwargs in ({"headers": {"X-API-Key": KEY}}, {"params": {"token": KEY}}):
                r = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
                assert r.status != 401, (method, path, kwargs)
                if r.status == 503:  # an analyser this daemon does not run: said so, not a 500
                    body = await r.json()
                    assert body["error"]["code"].endswith("_unavailable"), (method, path, body)
                else:
                    assert r.status < 500, (method, path, await r.text())
        # Unknown paths do not reveal themselves without the key.
        assert (await client.get("/nope")).status == 401
        assert (await client.get("/nope", headers={"X-API-Key": KEY})).status == 404
        # WebSockets take ?token= (browsers cannot set headers on the handshake).
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await client.ws_connect("/ws/events")
        assert exc.value.status == 401
        async with client.ws_connect("/ws/events", params={"token": KEY}) as ws:
            assert (await ws.receive_json(timeout=WS_TIMEOUT))["type"] == "snapshot"
        async with client.ws_connect("/ws/asr", headers={"X-API-Key": KEY}) as ws:
            assert (await ws.receive_json(timeout=WS_TIMEOUT))["status"] == "ready"


async def test_without_a_key_every_route_is_open() -> None:
    d = make_daemon(StubEngine())
    spec = build_spec(d.cfg.api, d.app.commands, api_service(d).web.router)
    assert "security" not in spec
    async with serve(d) as client:
        for method, path in _requests(spec):
            r = await client.request(method, path)
            assert r.status not in (401, 403), (method, path)
            if r.status == 503:  # a capability this test daemon runs without
                code = (await r.json())["error"]["code"]
                assert code.endswith("_unavailable"), (method, path, code)
                continue
            assert r.status < 500, (method, path, await r.text())


def test_key_comparison() -> None:
    from pydantic import SecretStr

    key = SecretStr("s3cret-ключ")
    assert key_matches("s3cret-ключ", key)
    for wrong in (None, "", "s3cret", "s3cret-ключ ", "S3CRET-ключ", "\udcff"):
        assert not key_matches(wrong, key)
    with pytest.raises(ConfigError, match=r"api\.key: empty key"):
        load_config(None, env={"VOICE_AGENT__API__KEY": "'  '"})


# ---- stats, metrics, ptt ---------------------------------------------------------------------


METRIC_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*'
                         r'(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})?'
                         r" (-?[0-9.e+-]+|\+Inf|-Inf|NaN)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition; fails on a malformed line."""
    out: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in typed, f"TYPE twice: {name}"
            typed.add(name)
            continue
        if line.startswith("# HELP ") or not line:
            continue
        assert METRIC_LINE.match(line), line
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out


async def test_stats_and_metrics_count_events_latencies_and_requests() -> None:
    d = make_daemon(StubEngine())
    async with serve(d) as client:
        for i, (dur, ms) in enumerate([(1.2, 150.0), (2.5, 250.0), (0.7, 90.0)]):
            d.pub.emit(UtteranceEnded, utterance_id=f"u{i}", audio_start_s=0.0, audio_end_s=dur,
                       duration_s=dur, reason="ptt_stop")
            d.pub.emit(AsrFinal, utterance_id=f"u{i}", text="hi", language="en", model="m",
                       audio_s=dur, decode_ms=ms - 10, eos_to_final_ms=ms, partials=1)
        d.pub.emit(ErrorEvent, stage="audio", code="x", message="y")
        await asyncio.sleep(0.05)  # the metrics follower runs on the loop
        r = await client.get("/api/stats")
        assert r.status == 200
        s = await r.json()
        assert s["utterances"] == {"total": 3, "by_reason": {"ptt_stop": 3}, "finals": 3}
        lat = s["latency_ms"]["asr_eos_to_final"]
        assert lat["count"] == 3 and lat["p50"] == 150.0 and 240 <= lat["p95"] <= 250
        assert s["latency_ms"]["asr_decode"]["max"] == 240.0
        assert s["events"]["by_type"] == {"utterance.ended": 3, "asr.final": 3, "error": 1}
        assert s["drops"] == {"bus_events": 0, "audio_chunks": 0, "ws_clients": {},
                              "ws_asr_rejected": 0, "partials_shed": 0}
        assert s["connections"] == {"ws_events": 0, "ws_asr": 0,
                                    "ws_asr_max": d.cfg.api.max_asr_sessions,
                                    "http_requests": 0}  # this request counts once answered
        r = await client.get("/metrics")
        assert r.status == 200 and r.content_type == "text/plain"
        m = parse_metrics(await r.text())
    assert m['voice_agent_events_total{type="asr.final"}'] == 3
    assert m['voice_agent_utterances_total{reason="ptt_stop"}'] == 3
    hist = 'voice_agent_stage_latency_seconds_bucket{stage="asr_eos_to_final",le="%s"}'
    assert m[hist % "0.1"] == 1 and m[hist % "0.2"] == 2 and m[hist % "0.3"] == 3
    assert m[hist % "+Inf"] == 3
    assert m['voice_agent_stage_latency_seconds_count{stage="asr_eos_to_final"}'] == 3
    assert m['voice_agent_stage_latency_seconds_sum{stage="asr_eos_to_final"}'] == 0.49
    assert m['voice_agent_http_requests_total{method="GET",route="/api/stats",status="200"}'] == 1
    assert m['voice_agent_ws_connections{endpoint="asr"}'] == 0
    assert m["voice_agent_ready"] == 1 and m['voice_agent_gate_open{mode="ptt"}'] == 0
    # Buckets are cumulative in every histogram.
    for name in ("voice_agent_stage_latency_seconds", "voice_agent_http_request_duration_seconds"):
        series: dict[str, list[float]] = {}
        for k, v in m.items():
            if k.startswith(name + "_bucket"):
                series.setdefault(re.sub(r',?le="[^"]*"', "", k), []).append(v)
        assert series and all(vals == sorted(vals) for vals in series.values())


async def test_ptt_routes_drive_the_gate() -> None:
    d = make_daemon()
    sub = d.bus.subscribe(100, types=["state.changed"])
    async with serve(d) as client:
        r = await client.post("/api/ptt/start")
        body = await r.json()
        assert r.status == 200 and body["ok"] and body["gate"]["state"] == "open"
        assert d.gate.is_open
        body = await (await client.post("/api/ptt/stop")).json()
        assert body["gate"]["state"] == "closed" and not d.gate.is_open
        await client.post("/api/ptt/toggle")
        assert d.gate.is_open
        body = await (await client.post("/api/ptt/reset")).json()
        assert body["command"] == "reset" and not d.gate.is_open
        assert (await client.get("/api/ptt/start")).status == 405
    reasons = []
    while not sub._queue.empty():
        reasons.append((await sub.__anext__()).reason)  # type: ignore[attr-defined]
    assert reasons == ["http"] * 4

    d = make_daemon(gate__mode="vad")
    async with serve(d) as client:
        msg = await error_of(await client.post("/api/ptt/start"), 409, "wrong_mode")
        assert "vad mode" in msg


# ---- transcribe ------------------------------------------------------------------------------


async def test_transcribe_every_upload_form_and_format(engine: AsrEngine) -> None:
    d = make_daemon(engine)
    cards, cards_ref = clip("cards-005.wav")
    sense, sense_ref = clip("sense_and_sensibility_01_austen_64kb-0880.wav")
    refs, hyps = [], []
    async with serve(d) as client:
        # multipart WAV
        form = aiohttp.FormData()
        form.add_field("file", encode(cards, "WAV"), filename="a.wav", content_type="audio/wav")
        r = await client.post("/api/asr/transcribe", data=form)
        body = await r.json()
        assert r.status == 200, body
        assert body["model"] == MODEL and body["language"] == "en" and body["windows"] == 1
        assert abs(body["audio_s"] - len(cards) / 16000) < 0.01
        t = body["timings"]
        assert t["total_ms"] >= t["decode_ms"] > 0 and 0 < t["rtf"] < 1
        refs.append(cards_ref)
        hyps.append(body["text"])
        # JSON base64: FLAC, and OGG as a data: URL; 44.1 kHz stereo MP3 as a raw body.
        flac = base64.b64encode(encode(sense, "FLAC")).decode()
        body = await (await client.post("/api/asr/transcribe", json={"audio": flac})).json()
        refs.append(sense_ref)
        hyps.append(body["text"])
        ogg = "data:audio/ogg;base64," + base64.b64encode(encode(cards, "OGG", 16000)).decode()
        body = await (await client.post("/api/asr/transcribe", json={"audio": ogg})).json()
        refs.append(cards_ref)
        hyps.append(body["text"])
        import soxr

        stereo = np.stack([soxr.resample(sense, 16000, 44100)] * 2, axis=1)
        mp3 = encode(stereo, "MP3", 44100)
        r = await client.post("/api/asr/transcribe", data=mp3,
                              headers={"Content-Type": "audio/mpeg"})
        body = await r.json()
        assert r.status == 200, body
        refs.append(sense_ref)
        hyps.append(body["text"])
        # webm/opus (what browsers record) goes through ffmpeg.
        r = await client.post("/api/asr/transcribe", data=encode(cards, "WEBM"),
                              headers={"Content-Type": "audio/webm"})
        body = await r.json()
        assert r.status == 200, body
        refs.append(cards_ref)
        hyps.append(body["text"])
        s = await (await client.get("/api/stats")).json()
        assert s["latency_ms"]["transcribe_total"]["count"] == 5
    assert wer(refs, hyps) <= WER_BOUND, hyps


async def test_transcribe_long_audio_in_windows(engine: AsrEngine,
                                                joined_recording: tuple[Path, Any]) -> None:
    path, _ = joined_recording
    rows = asr_en_rows()
    d = make_daemon(engine)
    async with serve(d) as client:
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(path.read_bytes()), filename="joined.wav")
        r = await client.post("/api/asr/transcribe", data=form)
        body = await r.json()
    assert r.status == 200, body
    # At least two windows (the cut points follow the quietest frames: noise moves them).
    assert body["audio_s"] > 45 and body["windows"] >= 2
    # One window alone would have lost everything after 30 s (whisper's limit).
    assert wer([" ".join(r["reference"] for r in rows)], [body["text"]]) <= WER_BOUND, body


def test_windows_cut_at_quiet_points() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, 16000 * 70).astype(np.float32)
    for q in (24.0, 48.0):
        x[int(q * 16000):int((q + 0.2) * 16000)] = 0
    parts = windows(x)
    cuts = np.cumsum([len(p) for p in parts])[:-1] / 16000
    assert len(parts) == 3 and sum(len(p) for p in parts) == len(x)
    assert 24.0 < cuts[0] < 24.2 and 48.0 < cuts[1] < 48.2, cuts
    assert len(windows(x[:16000 * 28])) == 1


async def test_transcribe_bad_inputs_are_400_never_500(tmp_path: Path) -> None:
    d = make_daemon(StubEngine(), api__max_body_mb="0.05", api__max_audio_s="1")
    rng = np.random.default_rng(1)
    noise = rng.uniform(-0.1, 0.1, 8000).astype(np.float32)
    post = "/api/asr/transcribe"
    async with serve(d) as client:
        ok = await client.post(post, data=encode(noise, "WAV"),
                               headers={"Content-Type": "audio/wav"})
        assert ok.status == 200 and (await ok.json())["text"] == "8000 samples"
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"data": b"{not json", "headers": {"Content-Type": "application/json"}},
             400, "bad_json"),
            ({"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}},
             400, "bad_json"),
            ({"json": [1, 2]}, 400, "bad_request"),
            # Payload fields are checked by the command registry, as on every surface.
            ({"json": {"audo": "AAAA"}}, 400, "bad_payload"),
            ({"json": {"audio": 12}}, 400, "bad_payload"),
            ({"json": {"audio": "not base64!!"}}, 400, "bad_base64"),
            ({"json": {"audio": "AAA"}}, 400, "bad_base64"),
            ({"json": {"audio": ""}}, 400, "empty_audio"),
            ({"json": {"audio": base64.b64encode(rng.bytes(3000)).decode()}}, 400, "bad_audio"),
            ({"data": rng.bytes(3000), "headers": {"Content-Type": "audio/wav"}},
             400, "bad_audio"),
            ({"data": b"RIFF\x24\x00\x00\x00WAVEfmt " + rng.bytes(400),
              "headers": {"Content-Type": "audio/wav"}}, 400, "bad_audio"),
            ({"data": b"", "headers": {"Content-Type": "audio/wav"}}, 400, "empty_audio"),
            ({"data": encode(np.zeros(0, np.float32), "WAV"),
              "headers": {"Content-Type": "audio/wav"}}, 400, "empty_audio"),
            ({"data": encode(noise[:160], "WAV", rate=800),
              "headers": {"Content-Type": "audio/wav"}}, 400, "bad_audio"),
            ({"data": b"hello", "headers": {"Content-Type": "text/plain"}},
             415, "unsupported_media_type"),
            ({"data": b"--x\r\n\r\n", "headers": {
                "Content-Type": "multipart/form-data; boundary=x"}}, 400, "bad_multipart"),
            ({"data": b"", "headers": {"Content-Type": "multipart/form-data"}},
             400, "bad_multipart"),
            ({"data": aiohttp.FormData({"name": "value"}, default_to_multipart=True)},
             400, "no_file"),
            # 2 s of (compressible) audio, 1 s allowed.
            ({"data": encode(np.zeros(32000, np.float32), "FLAC"),
              "headers": {"Content-Type": "audio/flac"}}, 413, "audio_too_long"),
            ({"data": b"\0" * 60_000, "headers": {"Content-Type": "audio/wav"}},
             413, "too_large"),
        ]
        for kwargs, status, code in cases:
            r = await client.post(post, **kwargs)
            await error_of(r, status, code)

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"\0" * 10_000

        await error_of(await client.post(post, data=chunked(),
                                         headers={"Content-Type": "audio/wav"}),
                       413, "too_large")
        form = aiohttp.FormData()
        form.add_field("file", b"\0" * 60_000, filename="big.wav")
        await error_of(await client.post(post, data=form), 413, "too_large")
        s = await (await client.get("/api/stats")).json()
        assert s["utterances"]["total"] == 0
    # No engine: the service is unavailable, not broken.
    d = make_daemon(None)
    async with serve(d) as client:
        msg = await error_of(await client.post(post, data=encode(noise, "WAV"),
                                               headers={"Content-Type": "audio/wav"}),
                             503, "asr_unavailable")
        assert "no ASR model" in msg


# ---- OpenAPI and kiosk -----------------------------------------------------------------------


async def test_openapi_describes_every_route() -> None:
    d = make_daemon(StubEngine(), api__key=KEY)
    app = api_service(d).web
    async with serve(d) as client:
        r = await client.get("/api/openapi.json", headers={"X-API-Key": KEY})
        spec = await r.json()
    assert spec["openapi"].startswith("3.1") and spec["info"]["version"]
    registered = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
                  if r.resource is not None and r.method != "HEAD"}
    documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert registered == documented
    schemas = spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and op["operationId"] and op["responses"], (method, path)
            for resp in op["responses"].values():
                for media in resp.get("content", {}).values():
                    ref = media["schema"].get("$ref")
                    assert ref is None or ref.rsplit("/", 1)[1] in schemas
            if path != "/api/health":
                assert "401" in op["responses"], (method, path)
    assert spec["paths"]["/api/health"]["get"]["security"] == []
    assert spec["security"] == [{"ApiKeyHeader": []}, {"ApiKeyQuery": []}]
    for code in ("400", "413", "415", "503"):
        assert code in spec["paths"]["/api/asr/transcribe"]["post"]["responses"]


async def test_kiosk_page_passes_its_token_to_assets() -> None:
    d = make_daemon(StubEngine(), api__key=KEY)
    async with serve(d) as client:
        r = await client.get("/", params={"token": KEY})
        page = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', page)
        assert sorted(a.split("?")[0] for a in assets) == ["/static/app.js", "/static/style.css"]
        for url in assets:
            assert url.endswith(f"?token={KEY}")
            r = await client.get(url)
            assert r.status == 200 and r.content_type in ("text/javascript", "text/css")
        r = await client.get("/static/capture-worklet.js", headers={"X-API-Key": KEY})
        assert "registerProcessor" in await r.text()
        await error_of(await client.get("/static/../server.py", params={"token": KEY}),
                       404, "not_found")
        await error_of(await client.get("/static/secret.txt", params={"token": KEY}),
                       404, "not_found")
        await error_of(await client.get("/static/app.js"), 401, "unauthorized")
    d = make_daemon(api__kiosk="false")
    async with serve(d) as client:
        await error_of(await client.get("/"), 404, "not_found")
        page = await (await client.get("/api/openapi.json")).json()
        assert "/" not in page["paths"]


# ---- /ws/events ------------------------------------------------------------------------------


async def test_ws_events_snapshot_events_filters_and_commands() -> None:
    d = make_daemon(StubEngine())
    async with serve(d) as client, client.ws_connect("/ws/events") as ws:
        snap = await ws.receive_json(timeout=WS_TIMEOUT)
        assert snap["type"] == "snapshot" and snap["gate"]["state"] == "closed"
        assert snap["models"]["asr"] == "stub" and "asr.final" in snap["event_types"]
        await ws.send_json({"command": "start", "id": 7})
        got = [await ws.receive_json(timeout=WS_TIMEOUT) for _ in range(2)]
        by_type = {m["type"]: m for m in got}
        assert by_type["state.changed"]["state"] == "open"
        assert by_type["state.changed"]["reason"] == "ws"
        assert by_type["command.result"]["id"] == 7 and by_type["command.result"]["ok"]
        # Filter: only finals from now on.
        await ws.send_json({"types": ["asr.final"]})
        assert (await ws.receive_json(timeout=WS_TIMEOUT)) == {
            "type": "subscribed", "id": None, "types": ["asr.final"]}
        d.pub.emit(ErrorEvent, stage="x", code="y", message="filtered out")
        d.pub.emit(AsrFinal, utterance_id="u1", text="hello", language="en", model="m",
                   audio_s=1.0, decode_ms=1.0, eos_to_final_ms=2.0, partials=0)
        ev = await ws.receive_json(timeout=WS_TIMEOUT)
        assert ev["type"] == "asr.final" and ev["text"] == "hello" and ev["device_id"]
        # Problems are answered and the connection stays.
        for bad, code in [("{oops", "bad_json"), ("[1]", "bad_message"), ('{"x": 1}',
                          "bad_message"), ('{"command": "jump"}', "unknown_command"),
                          ('{"command": 5}', "unknown_command"),
                          ('{"types": ["nope"]}', "unknown_event_type"),
                          ('{"types": 5}', "bad_filter")]:
            await ws.send_str(bad)
            err = await ws.receive_json(timeout=WS_TIMEOUT)
            # Registry refusals carry the registry's stage; framing problems the API's.
            stage = "command" if code == "unknown_command" and "jump" in bad else "api"
            assert err["type"] == "error" and err["code"] == code and err["stage"] == stage, err
            assert err["fatal"] is False
        await ws.send_bytes(b"\0\1")
        assert (await ws.receive_json(timeout=WS_TIMEOUT))["code"] == "bad_message"
        await ws.send_json({"types": None})
        assert (await ws.receive_json(timeout=WS_TIMEOUT))["types"] is None
        await ws.send_json({"command": "stop"})
        got = [await ws.receive_json(timeout=WS_TIMEOUT) for _ in range(2)]
        assert {m["type"] for m in got} == {"state.changed", "command.result"}
        assert not d.gate.is_open
        s = await (await client.get("/api/stats")).json()
        assert s["connections"]["ws_events"] == 1

    d = make_daemon(gate__mode="vad")
    async with serve(d) as client:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await client.ws_connect("/ws/events", params={"types": "asr.final,bogus"})
        assert exc.value.status == 400
        async with client.ws_connect("/ws/events", params={"types": "error"}) as ws:
            assert (await ws.receive_json(timeout=WS_TIMEOUT))["types"] == ["error"]
            await ws.send_json({"command": "start"})
            err = await ws.receive_json(timeout=WS_TIMEOUT)
            assert err["code"] == "wrong_mode" and "vad mode" in err["message"]


async def test_ws_events_slow_client_is_dropped_with_a_reason() -> None:
    d = make_daemon(api__ws_queue_size="8")
    async with serve(d) as client:
        async with client.ws_connect("/ws/events") as slow, \
                client.ws_connect("/ws/events", params={"types": "asr.final"}) as calm:
            await slow.receive_json(timeout=WS_TIMEOUT)
            await calm.receive_json(timeout=WS_TIMEOUT)
            # A burst the client's queue cannot hold: the publisher never waits.
            for i in range(50):
                d.pub.emit(ErrorEvent, stage="test", code=str(i), message="burst")
            msgs = []
            while True:
                msg = await slow.receive(timeout=WS_TIMEOUT)
                if msg.type != WSMsgType.TEXT:
                    break
                msgs.append(json.loads(msg.data))
            assert msg.type == WSMsgType.CLOSE and slow.close_code == 1008
            assert msgs[-1]["code"] == "slow_client" and msgs[-1]["fatal"] is True
            assert "api.ws_queue_size" in msgs[-1]["message"]
            # Others are unaffected.
            d.pub.emit(AsrFinal, utterance_id="u", text="still here", language="en",
                       model="m", audio_s=1.0, decode_ms=1.0, eos_to_final_ms=1.0, partials=0)
            assert (await calm.receive_json(timeout=WS_TIMEOUT))["text"] == "still here"
            s = await (await client.get("/api/stats")).json()
            assert s["drops"]["ws_clients"] == {"slow_client": 1}
            assert s["connections"]["ws_events"] == 1


async def test_ws_events_closed_when_the_daemon_stops() -> None:
    d = make_daemon()
    async with serve(d) as client, client.ws_connect("/ws/events") as ws:
        await ws.receive_json(timeout=WS_TIMEOUT)
        d.bus.close()
        msg = await ws.receive(timeout=WS_TIMEOUT)
        assert msg.type == WSMsgType.CLOSE and ws.close_code == 1001


# ---- /ws/asr ---------------------------------------------------------------------------------


async def recv_until(ws: aiohttp.ClientWebSocketResponse, **match: Any) -> list[dict[str, Any]]:
    """Messages up to and including the first that has every `match` field."""
    out = []
    while True:
        m = await ws.receive_json(timeout=WS_TIMEOUT)
        out.append(m)
        if all(m.get(k) == v for k, v in match.items()):
            return out


def pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()


async def stream(ws: aiohttp.ClientWebSocketResponse, x: np.ndarray, speed: float,
                 as_json: bool = False, frame_s: float = 0.1) -> None:
    """Send 16-bit PCM in frames, `speed` times faster than real time."""
    n = int(16000 * frame_s)
    for i in range(0, len(x), n):
        data = pcm(x[i:i + n])
        if as_json:
            await ws.send_json({"type": "audio", "data": base64.b64encode(data).decode()})
        else:
            await ws.send_bytes(data)
        await asyncio.sleep(frame_s / speed)


async def test_ws_asr_recognises_streamed_speech(engine: AsrEngine) -> None:
    d = make_daemon(engine, api__asr_partial_interval_ms="200")
    names = ["cards-005.wav", "sense_and_sensibility_01_austen_64kb-0890.wav"]
    refs, hyps = [], []
    async with serve(d) as client, client.ws_connect("/ws/asr") as ws:
        ready = await ws.receive_json(timeout=WS_TIMEOUT)
        assert ready["type"] == "status" and ready["status"] == "ready"
        assert ready["model"] == MODEL and ready["sample_rate"] == 16000
        for i, name in enumerate(names):
            x, ref = clip(name)
            await ws.send_json({"type": "control", "command": "start"})
            started = await ws.receive_json(timeout=WS_TIMEOUT)
            assert started["status"] == "started" and started["implicit"] is False
            await stream(ws, x, speed=3.0, as_json=bool(i))  # binary, then base64 JSON
            await ws.send_json({"type": "control", "command": "stop"})
            msgs = await recv_until(ws, mode="final")
            partials = [m for m in msgs if m.get("mode") == "partial"]
            final = msgs[-1]
            assert partials and all(p["text"] for p in partials), msgs
            assert [p["seq"] for p in partials] == list(range(1, len(partials) + 1))
            assert {"type": "status", "status": "stopped"}.items() <= msgs[-2].items()
            assert final["partials"] == len(partials) and final["reason"] == "stop"
            assert abs(final["audio_s"] - len(x) / 16000) < 0.11
            assert final["processing_time_ms"] > 0
            assert final["latency_ms"] >= final["processing_time_ms"]
            refs.append(ref)
            hyps.append(final["text"])
        s = await (await client.get("/api/stats")).json()
    assert wer(refs, hyps) <= WER_BOUND, hyps
    assert s["latency_ms"]["ws_asr_final"]["count"] == 2
    assert s["connections"]["ws_asr"] == 1


async def test_ws_asr_resamples_other_rates(engine: AsrEngine) -> None:
    import soxr

    x, ref = clip("cards-005.wav")
    d = make_daemon(engine, api__asr_partials="false")
    async with serve(d) as client, client.ws_connect("/ws/asr") as ws:
        await ws.receive_json(timeout=WS_TIMEOUT)
        await ws.send_json({"type": "control", "command": "start", "sample_rate": 48000})
        assert (await ws.receive_json(timeout=WS_TIMEOUT))["sample_rate"] == 48000
        y = soxr.resample(x, 16000, 48000)
        await ws.send_bytes(pcm(y))
        await ws.send_json({"type": "control", "command": "stop"})
        final = (await recv_until(ws, mode="final"))[-1]
    assert final["partials"] == 0
    assert abs(final["audio_s"] - len(x) / 16000) < 0.05
    assert wer([ref], [final["text"]]) <= WER_BOUND, final


async def test_ws_asr_final_reuses_a_partial_that_heard_all_the_speech() -> None:
    need_shared()
    x, _ = clip("cards-003.wav")
    silence = np.zeros(8000, np.float32)
    d = make_daemon(StubEngine(), api__asr_partial_interval_ms="50")
    async with serve(d) as client, client.ws_connect("/ws/asr") as ws:
        await ws.receive_json(timeout=WS_TIMEOUT)
        # Speech, then half a second of silence before the button is let go.
        await ws.send_json({"type": "control", "command": "start"})
        await stream(ws, np.concatenate([x, silence]), speed=4.0)
        want = len(x) + 8000
        msgs = await recv_until(ws, mode="partial", text=f"{want} samples")
        await ws.send_json({"type": "control", "command": "stop"})
        final = (await recv_until(ws, mode="final"))[-1]
        assert final["from_partial"] is True, (msgs, final)
        # The stub's text says how much it decoded: the partial's audio, not a second decode.
        assert final["text"] == msgs[-1]["text"] and final["latency_ms"] < 100
        # Let go mid-word: whichever way the final is made, it heard every sample.
        await ws.send_json({"type": "control", "command": "start"})
        await stream(ws, x[:12000], speed=4.0)
        await ws.send_json({"type": "control", "command": "stop"})
        final = (await recv_until(ws, mode="final"))[-1]
        assert final["text"] == "12000 samples", final
    d = make_daemon(StubEngine(), api__asr_partial_interval_ms="50",
                    api__asr_final_from_partial="false")
    async with serve(d) as client, client.ws_connect("/ws/asr") as ws:
        await ws.receive_json(timeout=WS_TIMEOUT)
        await ws.send_json({"type": "control", "command": "start"})
        await stream(ws, np.concatenate([x, silence]), speed=4.0)
        await recv_until(ws, mode="partial", text=f"{len(x) + 8000} samples")
        await ws.send_json({"type": "control", "command": "stop"})
        final = (await recv_until(ws, mode="final"))[-1]
        assert final["from_partial"] is False and final["text"] == f"{len(x) + 8000} samples"


async def test_ws_asr_protocol_errors_keep_the_connection() -> None:
    d = make_daemon(StubEngine(), api__asr_partials="false", api__asr_max_utterance_s="1")
    async with serve(d) as client, client.ws_connect("/ws/asr") as ws:
        await ws.receive_json(timeout=WS_TIMEOUT)
        for bad, code in [("{oops", "bad_json"), ("[]", "bad_message"),
                          ('{"type": "sing"}', "bad_message"),
                          ('{"type": "audio"}', "bad_message"),
                          ('{"type": "audio", "data": "%%%"}', "bad_base64"),
                          ('{"type": "control", "command": "jump"}', "unknown_command"),
                          ('{"type": "control", "command": "stop"}', "not_started"),
                          ('{"type": "control", "command": "start", "sample_rate": 12345}',
                           "bad_sample_rate"),
                          ('{"type": "control", "command": "start", "sample_rate": "16000"}',
                           "bad_sample_rate"),
                          ('{"type": "control", "command": "start", "partials": 1}',
                           "bad_message")]:
            await ws.send_str(bad)
            err = await ws.receive_json(timeout=WS_TIMEOUT)
            assert err["type"] == "error" and err["code"] == code, (bad, err)
        await ws.send_bytes(b"\0\0\0")
        assert (await ws.receive_json(timeout=WS_TIMEOUT))["code"] == "bad_audio"
        # Audio without start starts an utterance; reset abandons it (no result).
        await ws.send_bytes(b"\0\0" * 1600)
        started = await ws.receive_json(timeout=WS_TIMEOUT)
        assert started["status"] == "started" and started["implicit"] is True
        await ws.send_json({"type": "control", "command": "reset"})
        assert (await ws.receive_json(timeout=WS_TIMEOUT))["status"] == "reset"
        # 2.5 s against a 1 s limit: two finals by themselves, the rest waits for stop.
        await ws.send_json({"type": "control", "command": "start"})
        await ws.receive_json(timeout=WS_TIMEOUT)
        await ws.send_bytes(b"\0\0" * 40_000)
        await ws.send_json({"type": "control", "command": "stop"})
        msgs = await recv_until(ws, mode="final", reason="stop")
        finals = [m for m in msgs if m.get("mode") == "final"]
        assert [(f["text"], f["reason"]) for f in finals] == [
            ("16000 samples", "max_length"), ("16000 samples", "max_length"),
            ("8000 samples", "stop")]
        # A second start finishes the first utterance instead of losing it.
        await ws.send_json({"type": "control", "command": "start"})
        await ws.send_bytes(b"\0\0" * 100)
        await ws.send_json({"type": "control", "command": "start"})
        msgs = await recv_until(ws, mode="final")
        assert msgs[-1]["text"] == "100 samples" and msgs[-1]["reason"] == "restart"


async def test_ws_asr_session_limit_and_no_engine() -> None:
    d = make_daemon(StubEngine(), api__max_asr_sessions="1")
    async with serve(d) as client:
        async with client.ws_connect("/ws/asr") as first:
            assert (await first.receive_json(timeout=WS_TIMEOUT))["status"] == "ready"
            async with client.ws_connect("/ws/asr") as second:
                err = await second.receive_json(timeout=WS_TIMEOUT)
                assert err["type"] == "error" and err["code"] == "too_many_sessions"
                assert "api.max_asr_sessions" in err["message"]
                assert (await second.receive(timeout=WS_TIMEOUT)).type == WSMsgType.CLOSE
                assert second.close_code == 1013
        # The slot is free again once the first client left.
        async with client.ws_connect("/ws/asr") as third:
            assert (await third.receive_json(timeout=WS_TIMEOUT))["status"] == "ready"
        s = await (await client.get("/api/stats")).json()
        assert s["drops"]["ws_asr_rejected"] == 1
    d = make_daemon(None)
    async with serve(d) as client, client.ws_connect("/ws/asr") as ws:
        err = await ws.receive_json(timeout=WS_TIMEOUT)
        assert err["code"] == "asr_unavailable"
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await client.ws_connect("/ws/asr", method="POST")
        assert exc.value.status == 405
        r = await client.get("/ws/asr")
        await error_of(r, 400, "not_websocket")


# ---- inside `voice-agent run` ----------------------------------------------------------------


async def test_api_serves_while_the_daemon_runs() -> None:
    cfg = load_config(None, env={**BASE_ENV, "VOICE_AGENT__API__KEY": KEY})
    d = Daemon(cfg, source=SilentSource(30))
    svc = api_service(d)
    task = asyncio.create_task(d.run())
    for _ in range(200):
        if svc.port:
            break
        await asyncio.sleep(0.02)
    base = f"http://127.0.0.1:{svc.port}"
    async with aiohttp.ClientSession(headers={"X-API-Key": KEY}) as http:
        # The API is up before the analysers have loaded: "starting" until they have.
        for _ in range(500):
            health = await (await http.get(f"{base}/api/health")).json()
            if health["status"] != "starting":
                break
            await asyncio.sleep(0.02)
        assert health["status"] == "ok"
        async with http.ws_connect(f"{base}/ws/events") as ws:
            assert (await ws.receive_json(timeout=WS_TIMEOUT))["type"] == "snapshot"
            r = await http.post(f"{base}/api/ptt/start")
            assert r.status == 200
            ev = await ws.receive_json(timeout=WS_TIMEOUT)
            assert ev["type"] == "state.changed" and ev["state"] == "open"
            await http.post(f"{base}/api/ptt/stop")
            d.shutdown()
            assert await asyncio.wait_for(task, 10) == 0
            # The client is told the daemon is going away.
            while (msg := await ws.receive(timeout=WS_TIMEOUT)).type == WSMsgType.TEXT:
                pass
            assert msg.type == WSMsgType.CLOSE and msg.data == 1001, msg
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{base}/api/health")
    assert d.app.tracker.counts["state.changed"] == 2


async def test_port_in_use_is_an_error_event_and_the_daemon_goes_on() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = load_config(None, env={**BASE_ENV, "VOICE_AGENT__API__PORT": str(port)})
        d = Daemon(cfg, source=SilentSource(30))
        sub = d.bus.subscribe(100, types=["error"])
        task = asyncio.create_task(d.run())
        ev = await asyncio.wait_for(sub.__anext__(), 10)
        assert isinstance(ev, ErrorEvent)
        assert ev.stage == "api" and ev.code == "bind_failed" and str(port) in ev.message
        assert not task.done()
        d.shutdown()
        assert await asyncio.wait_for(task, 10) == 0
