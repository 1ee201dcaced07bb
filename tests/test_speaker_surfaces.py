"""The speaker commands on every surface: HTTP (aiohttp's test server), `/ws/events`,
`/ws/speakers/verify`, MQTT (the router's bad-input matrix and a real mosquitto round trip)
and the CLI. Real model, real shared speech, real SQLite store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile as sf
import soxr
from aiohttp.test_utils import TestClient, TestServer

from agent.api.server import ApiService
from agent.config import load_config
from agent.daemon import Daemon
from agent.mqtt.commands import CommandRouter
from agent.mqtt.service import MqttService
from agent.speaker.embedder import Ge2eEmbedder

from .conftest import REPO
from .mosquitto import Mosquitto, Subscriber, have_mosquitto
from .sources import SilentSource
from .test_speaker_app import (
    MODEL_ID,
    SR,
    A,
    B,
    C,
    attach,
    audio_of,
    b64,
    clip_bytes,
    clip_path,
    encode,
    ge2e_or_skip,
    speaker_config,
)
from .test_speaker_diarize import alternate

KEY = "speaker-test-key-0123"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def embedder() -> Ge2eEmbedder:
    """The real default speaker model, loaded once per module."""
    return ge2e_or_skip()


def make_daemon(state_dir: Path, embedder: Ge2eEmbedder | None, **env: str) -> Daemon:
    """A daemon with the API on (not running): served by aiohttp's test server."""
    cfg = speaker_config(state_dir, api__enabled="true", gate__mode="ptt", **env)
    d = Daemon(cfg, analysers=[], source=SilentSource(30))
    if embedder is not None:
        attach(d.app, embedder)
    d.ready.set()
    return d


@asynccontextmanager
async def serve(d: Daemon) -> AsyncIterator[TestClient[Any, Any]]:
    svc = next(s for s in d.services if isinstance(s, ApiService))
    try:
        async with TestClient(TestServer(svc.web)) as client:
            yield client
    finally:
        await d.app.close()


async def ok(resp: aiohttp.ClientResponse) -> Any:
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def error_of(resp: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


def multipart(data: bytes, name: str = "clip.flac") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="audio/flac")
    return form


# ---- HTTP -------------------------------------------------------------------------------------


async def test_http_routes_do_every_operation(tmp_path: Path, embedder: Ge2eEmbedder) -> None:
    d = make_daemon(tmp_path, embedder)
    async with serve(d) as client:
        r = await ok(await client.post("/api/speakers/register", json={
            "name": "Ann", "metadata": {"room": "kitchen"}, "audio": b64(clip_bytes(A, 8))}))
        ann = r["speaker"]["id"]
        assert r["warning"] and not r["quality"]["ok"]  # 4 s clip: under the 8 s bar
        assert r["timings"]["upload_ms"] is not None
        r = await ok(await client.post(f"/api/speakers/{ann}/samples",
                                       data=multipart(clip_bytes(A, 0))))
        assert r["speaker"]["samples"] == 2 and r["quality"]["ok"] and r["warning"] is None
        await ok(await client.post("/api/speakers/register", json={
            "name": "Bea", "audio": b64(clip_bytes(B, 0))}))
        # a raw audio body, as from `curl --data-binary @clip.flac -H 'Content-Type: audio/flac'`
        who = await ok(await client.post("/api/speakers/identify", data=clip_bytes(A, 5),
                                         headers={"Content-Type": "audio/flac"}))
        assert who["name"] == "Ann" and who["is_match"] and len(who["candidates"]) == 2
        v = await ok(await client.post("/api/speakers/verify", json={
            "speaker_id": ann, "audio": b64(clip_bytes(B, 5))}))
        assert v["result"] == "reject" and v["processing_time_ms"] > 0
        v = await ok(await client.post("/api/speakers/verify", json={
            "audio": b64(clip_bytes(C, 5)), "reference": b64(clip_bytes(C, 4))}))
        assert v["result"] == "accept" and v["similarity"] >= v["threshold"]
        batch = await ok(await client.post("/api/speakers/verify_batch", json={
            "speaker_id": ann, "tests": [{"audio": b64(clip_bytes(s, 6))} for s in (A, B)]}))
        assert [o["is_match"] for o in batch["results"]] == [True, False]
        listed = await ok(await client.get("/api/speakers"))
        assert [s["name"] for s in listed["speakers"]] == ["Ann", "Bea"]
        got = await ok(await client.get(f"/api/speakers/{ann}"))
        assert got["speaker"]["metadata"] == {"room": "kitchen"}
        upd = await ok(await client.patch(f"/api/speakers/{ann}", json={"name": "Anne"}))
        assert upd["speaker"]["name"] == "Anne"
        re = await ok(await client.get("/api/speakers/reenrolment"))
        assert re == {"model": MODEL_ID, "count": 0, "speakers": []}
        audio, _ = alternate(A, B)
        di = await ok(await client.post("/api/speakers/diarize",
                                        data=multipart(encode(audio), "talk.wav")))
        assert di["num_speakers"] == 2 and di["segments"]
        assert {s["name"] for s in di["speakers"]} == {"Anne", "Bea"}
        gone = await ok(await client.delete(f"/api/speakers/{ann}"))
        assert gone["deleted"]["name"] == "Anne"
        await error_of(await client.get(f"/api/speakers/{ann}"), 404, "not_found")
        spec = await ok(await client.get("/api/openapi.json"))
        for path in ("/api/speakers", "/api/speakers/{speaker_id}", "/api/speakers/register",
                     "/api/speakers/{speaker_id}/samples", "/api/speakers/diarize"):
            assert path in spec["paths"], path
        assert set(spec["paths"]["/api/speakers/{speaker_id}"]) == {"get", "patch", "delete"}


async def test_http_refuses_bad_requests_and_keeps_the_store(tmp_path: Path,
                                                             embedder: Ge2eEmbedder) -> None:
    d = make_daemon(tmp_path, embedder, api__key=KEY)
    h = {"X-API-Key": KEY}
    async with serve(d) as client:
        await error_of(await client.get("/api/speakers"), 401, "unauthorized")
        r = await ok(await client.post("/api/speakers/register", headers=h, json={
            "name": "Ann", "audio": b64(clip_bytes(A, 0))}))
        ann = r["speaker"]["id"]

        async def speakers() -> list[tuple[str, int]]:
            body = await ok(await client.get("/api/speakers", headers=h))
            return [(s["name"], s["samples"]) for s in body["speakers"]]

        before = await speakers()
        post = client.post
        cases = [
            (post("/api/speakers/register", headers={**h, "Content-Type": "text/plain"},
                  data=b"Ann"), 415, "unsupported_media_type"),
            (post("/api/speakers/register", headers={**h, "Content-Type": "application/json"},
                  data=b"{oops"), 400, "bad_json"),
            (post("/api/speakers/register", headers=h, json={"name": "Bo",
                                                           "audio": b64(b"junk" * 50)}),
             400, "bad_audio"),
            (post("/api/speakers/register", headers=h, json={
                "name": "Bo", "audio": b64(encode(np.zeros(SR * 2, np.float32)))}),
             400, "silent"),
            (post("/api/speakers/register", headers=h, json={
                "name": "Bo", "audio": b64(encode(np.tile(audio_of(A, 0), 3)))}),
             413, "audio_too_long"),
            (post("/api/speakers/register", headers=h, json={
                "name": "ann", "audio": b64(clip_bytes(B, 0))}), 409, "name_taken"),
            (post("/api/speakers/register", headers=h, json={"audio": b64(clip_bytes(B, 0))}),
             400, "bad_payload"),
            (post("/api/speakers/identify", headers=h,
                  data=aiohttp.FormData({"x": "y"}, default_to_multipart=True)),
             400, "no_file"),
            (post(f"/api/speakers/{'a' * 32}/samples", headers=h,
                  data=multipart(clip_bytes(B, 0))), 404, "not_found"),
            (client.put(f"/api/speakers/{ann}", headers=h), 405, "method_not_allowed"),
            (client.patch(f"/api/speakers/{ann}", headers=h, json={"bogus": 1}),
             400, "bad_payload"),
        ]
        for req, status, code in cases:
            await error_of(await req, status, code)
        assert await speakers() == before
    # No model loaded: the model's commands are 503, the store's still answer.
    d = make_daemon(tmp_path, None)
    async with serve(d) as client:
        await error_of(await client.post("/api/speakers/identify", data=clip_bytes(A, 1),
                                         headers={"Content-Type": "audio/flac"}),
                       503, "speaker_unavailable")
        assert (await ok(await client.get("/api/speakers")))["count"] == 1


# ---- /ws/events -------------------------------------------------------------------------------


async def test_ws_events_runs_speaker_commands(tmp_path: Path, embedder: Ge2eEmbedder) -> None:
    d = make_daemon(tmp_path, embedder)
    # Small enough for a /ws/events message (64 KiB): 3 s as Ogg Vorbis.
    small = encode(audio_of(A, 9)[:3 * SR], "OGG")
    assert len(b64(small)) < 60_000
    async with serve(d) as client:
        await ok(await client.post("/api/speakers/register", json={
            "name": "Ann", "audio": b64(clip_bytes(A, 0))}))
        async with client.ws_connect("/ws/events", params={"types": "error"}) as ws:
            assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "snapshot"
            await ws.send_json({"command": "speakers/identify", "id": 1, "audio": b64(small)})
            r = await ws.receive_json(timeout=TIMEOUT)
            assert r["type"] == "command.result" and r["id"] == 1 and r["name"] == "Ann"
            await ws.send_json({"command": "speakers/list", "id": 2})
            r = await ws.receive_json(timeout=TIMEOUT)
            assert r["count"] == 1 and r["speakers"][0]["name"] == "Ann"
            sid = r["speakers"][0]["id"]
            await ws.send_json({"command": "speakers/update", "id": 3, "speaker_id": sid,
                                "email": "ann@example.org"})
            assert (await ws.receive_json(timeout=TIMEOUT))["speaker"]["email"]
            for msg, code in [({"command": "speakers/get", "speaker_id": "x"}, "not_found"),
                              ({"command": "speakers/identify", "audio": "@@"}, "bad_base64"),
                              ({"command": "speakers/delete"}, "bad_payload")]:
                await ws.send_json({**msg, "id": 9})
                err = await ws.receive_json(timeout=TIMEOUT)
                assert err["type"] == "error" and err["code"] == code and err["id"] == 9, err
            await ws.send_json({"command": "speakers/delete", "id": 4, "speaker_id": sid})
            assert (await ws.receive_json(timeout=TIMEOUT))["deleted"]["name"] == "Ann"


# ---- /ws/speakers/verify ----------------------------------------------------------------------


async def stream(ws: aiohttp.ClientWebSocketResponse, x: np.ndarray, rate: int = SR,
                 as_json: bool = False, pause_s: float = 0.025) -> None:
    """Audio as 100 ms s16le frames, binary or base64 JSON, 4x faster than real time."""
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    step = rate // 10 * 2
    for i in range(0, len(pcm), step):
        if as_json:
            await ws.send_json({"type": "audio", "data": b64(pcm[i:i + step])})
        else:
            await ws.send_bytes(pcm[i:i + step])
        await asyncio.sleep(pause_s)


async def until(ws: aiohttp.ClientWebSocketResponse, kind: str, mode: str | None = None
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read until a message of `kind` (and `mode`); returns it and what came before."""
    seen: list[dict[str, Any]] = []
    while True:
        m = await ws.receive_json(timeout=TIMEOUT)
        if m["type"] == kind and (mode is None or m.get("mode") == mode):
            return m, seen
        assert m["type"] != "error", m
        seen.append(m)


async def test_ws_verify_streams_similarities(tmp_path: Path, embedder: Ge2eEmbedder) -> None:
    d = make_daemon(tmp_path, embedder)
    async with serve(d) as client:
        r = await ok(await client.post("/api/speakers/register", json={
            "name": "Ann", "audio": b64(clip_bytes(A, 0))}))
        ann = r["speaker"]["id"]
        async with client.ws_connect("/ws/speakers/verify") as ws:
            ready = await ws.receive_json(timeout=TIMEOUT)
            assert ready["status"] == "ready" and ready["model"] == MODEL_ID
            # 1. The first 8 s of audio (reference_s) are the reference; the same voice follows.
            await ws.send_json({"type": "control", "command": "start", "window_s": 3.0,
                                "hop_s": 1.5})
            started, _ = await until(ws, "status")
            assert started["status"] == "started" and started["reference"] == "audio"
            await stream(ws, np.concatenate([audio_of(A, 1), audio_of(A, 6)]))
            await ws.send_json({"type": "control", "command": "stop"})
            final, before = await until(ws, "result", "final")
            refs = [m for m in before if m["type"] == "reference"]
            windows = [m for m in before if m.get("mode") == "window"]
            assert len(refs) == 1 and refs[0]["speech_s"] > 2
            assert len(windows) >= 3, before
            assert [w["seq"] for w in windows] == list(range(1, len(windows) + 1))
            assert all(w["end_s"] - w["start_s"] == pytest.approx(3.0) for w in windows)
            scored = [w for w in windows if w["similarity"] is not None]
            assert scored and all(w["is_match"] for w in scored), scored

            assert final["is_match"] and final["similarity"] >= final["threshold"]
            # 2. Against the enrolled speaker: another voice, sent as base64 JSON.
            await ws.send_json({"type": "control", "command": "start", "speaker_id": ann})
            started, _ = await until(ws, "status")
            assert started["reference"] == "speaker" and started["name"] == "Ann"
            await stream(ws, audio_of(B, 1), as_json=True)
            await ws.send_json({"type": "control", "command": "stop"})
            final, before = await until(ws, "result", "final")
            windows = [m for m in before if m.get("mode") == "window"]
            assert windows and not any(w["is_match"] for w in windows)
            assert final["is_match"] is False and final["similarity"] < final["threshold"]
            # 3. 48 kHz audio, started implicitly by the audio itself after a reset.
            await ws.send_json({"type": "control", "command": "start", "sample_rate": 48000,
                                "speaker_id": ann})
            await until(ws, "status")
            await ws.send_json({"type": "control", "command": "reset"})
            assert (await until(ws, "status"))[0]["status"] == "reset"
            x48 = soxr.resample(np.concatenate([audio_of(A, 7), audio_of(A, 6)]), SR, 48000)
            await stream(ws, x48, rate=48000)
            await ws.send_json({"type": "control", "command": "stop"})
            final, before = await until(ws, "result", "final")
            assert any(m.get("implicit") for m in before)  # 48 kHz kept from the last start
            assert final["is_match"], final


async def test_ws_verify_answers_protocol_errors_and_stays(tmp_path: Path,
                                                           embedder: Ge2eEmbedder) -> None:
    d = make_daemon(tmp_path, embedder)
    async with serve(d) as client:
        async with client.ws_connect("/ws/speakers/verify") as ws:
            await ws.receive_json(timeout=TIMEOUT)
            bad: list[tuple[str | bytes, str]] = [
                ("{oops", "bad_json"), ("[1, 2]", "bad_json"),
                ('{"type": "dance"}', "bad_message"),
                ('{"type": "audio", "data": "@@@"}', "bad_base64"),
                ('{"type": "audio"}', "bad_message"),
                ('{"type": "control", "command": "jump"}', "unknown_command"),
                ('{"type": "control", "command": "stop"}', "not_started"),
                ('{"type": "control", "command": "start", "sample_rate": 12345}',
                 "bad_sample_rate"),
                ('{"type": "control", "command": "start", "window_s": 60}', "bad_message"),
                ('{"type": "control", "command": "start", "hop_s": 5, "window_s": 2}',
                 "bad_message"),
                ('{"type": "control", "command": "start", "speaker_id": "' + "f" * 32 + '"}',
                 "not_found"),
                (b"\x01\x02\x03", "bad_audio"),
            ]
            for msg, code in bad:
                if isinstance(msg, bytes):
                    await ws.send_bytes(msg)
                else:
                    await ws.send_str(msg)
                err = await ws.receive_json(timeout=TIMEOUT)
                assert err["type"] == "error" and err["code"] == code, (msg, err)
            # Silence as the reference: listened to up to speaker.max_audio_s, then refused.
            await ws.send_json({"type": "control", "command": "start", "reference_s": 2})
            await until(ws, "status")
            await stream(ws, np.zeros(31 * SR, np.float32), pause_s=0.0)
            while (m := await ws.receive_json(timeout=TIMEOUT))["type"] != "error":
                assert m["type"] == "status", m  # audio after the refusal starts anew
            assert m["code"] == "bad_reference" and "start again" in m["message"], m
            await ws.send_json({"type": "control", "command": "reset"})
            while (m := await ws.receive_json(timeout=TIMEOUT)).get("status") != "reset":
                assert m["type"] == "status" and m["status"] == "started", m
    d = make_daemon(tmp_path, None)
    async with serve(d) as client, client.ws_connect("/ws/speakers/verify") as ws:
        err = await ws.receive_json(timeout=TIMEOUT)
        assert err["code"] == "speaker_unavailable"
        assert (await ws.receive(timeout=TIMEOUT)).type == aiohttp.WSMsgType.CLOSE


# ---- MQTT -------------------------------------------------------------------------------------


async def test_mqtt_router_bad_input_matrix(tmp_path: Path, embedder: Ge2eEmbedder) -> None:
    d = make_daemon(tmp_path, embedder)
    router = CommandRouter(d.app.commands)
    try:
        good = await router.handle("speakers/register", json.dumps({
            "request_id": "r1", "name": "Ann", "audio": b64(clip_bytes(A, 0))}).encode())
        assert good.ok and good.request_id == "r1" and good.result
        sid = good.result["speaker"]["id"]
        cases = [
            ("speakers/register", b"not json", "bad_payload", None),
            ("speakers/register", b"[1]", "bad_payload", None),
            ("speakers/register", b'{"request_id": "r2", "name": "Bo"}', "empty_audio", "r2"),
            ("speakers/register", b'{"name": "Bo", "audio": "@@"}', "bad_base64", None),
            ("speakers/register", json.dumps({"name": "Bo", "audio": b64(b"x" * 99)}).encode(),
             "bad_audio", None),
            ("speakers/register", json.dumps({"name": "ANN", "audio": b64(
                clip_bytes(B, 0))}).encode(), "name_taken", None),
            ("speakers/identify", b'{"request_id": "bad/id", "audio": ""}', "bad_request_id",
             None),
            ("speakers/get", b'{"speaker_id": "nope", "request_id": "r3"}', "not_found", "r3"),
            ("speakers/update", json.dumps({"speaker_id": sid, "colour": 1}).encode(),
             "bad_payload", None),
            ("speakers/nope", b"", "unknown_command", None),
        ]
        for name, raw, code, rid in cases:
            reply = await router.handle(name, raw)
            assert not reply.ok and reply.error and reply.error.code == code, (name, reply)
            assert reply.request_id == rid
        listed = await router.handle("speakers/list", b"")
        assert listed.ok and listed.result and listed.result["count"] == 1
    finally:
        await d.app.close()


need_broker = pytest.mark.skipif(not have_mosquitto(), reason="mosquitto not installed "
                                 "(apt-get install mosquitto mosquitto-clients)")


@need_broker
async def test_mqtt_round_trip_on_a_real_broker(tmp_path: Path, embedder: Ge2eEmbedder) -> None:
    prefix = "voice-agent/spk-test"
    env = {"VOICE_AGENT__DEVICE_ID": "spk-test", "VOICE_AGENT__STATE_DIR": str(tmp_path),
           "VOICE_AGENT__ASR__ENABLED": "false", "VOICE_AGENT__EMOTION__ENABLED": "false",
           "VOICE_AGENT__MQTT__ENABLED": "true", "VOICE_AGENT__MQTT__HOST": "127.0.0.1",
           "VOICE_AGENT__API__PORT": "0", "VOICE_AGENT__MQTT__RECONNECT_INITIAL_S": "0.1"}
    with Mosquitto() as broker:
        env["VOICE_AGENT__MQTT__PORT"] = str(broker.port)
        # The speaker analyser comes from the registry, as in production.
        d = Daemon(load_config(None, env=env), source=SilentSource())
        task = asyncio.create_task(d.run())
        try:
            async with Subscriber(broker.port, [f"{prefix}/reply/#"]) as sub:
                mqtt = next(s for s in d.services if isinstance(s, MqttService))
                await asyncio.wait_for(mqtt.connected.wait(), 30)
                await asyncio.wait_for(d.ready.wait(), 30)
                await sub.publish(f"{prefix}/cmd/speakers/register", json.dumps({
                    "request_id": "reg", "name": "Ann", "audio": b64(clip_bytes(A, 0))}))
                reg = (await sub.wait_for(lambda: sub.on(f"{prefix}/reply/reg"), 30))[0].json()
                assert reg["ok"] and reg["result"]["speaker"]["name"] == "Ann", reg
                await sub.publish(f"{prefix}/cmd/speakers/identify", json.dumps({
                    "request_id": "who", "audio": b64(clip_bytes(A, 3))}))
                who = (await sub.wait_for(lambda: sub.on(f"{prefix}/reply/who"), 30))[0].json()
                assert who["ok"] and who["result"]["name"] == "Ann"
                await sub.publish(f"{prefix}/cmd/speakers/delete", '{"request_id": "del", '
                                  '"speaker_id": "0123"}')
                bad = (await sub.wait_for(lambda: sub.on(f"{prefix}/reply/del"), 30))[0].json()
                assert not bad["ok"] and bad["error"]["code"] == "not_found"
        finally:
            d.shutdown()
            assert await asyncio.wait_for(task, 30) == 0


# ---- CLI --------------------------------------------------------------------------------------


def cli(state: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "VOICE_AGENT__STATE_DIR": str(state)}
    p = subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                       timeout=180, env=env, cwd=REPO)
    return p.returncode, p.stdout, p.stderr


def test_cli_speakers_and_diarize(tmp_path: Path, embedder: Ge2eEmbedder) -> None:
    state = tmp_path / "state"
    rc, out, err = cli(state, "speakers", "register", "Ann", str(clip_path(A, 8)),
                       str(clip_path(A, 0)), "--json")
    assert rc == 0, err
    reg = json.loads(out)
    assert reg["speaker"]["samples"] == 2 and reg["quality"]["ok"]
    rc, out, err = cli(state, "speakers", "identify", str(clip_path(A, 5)))
    assert rc == 0 and out.startswith("Ann ") and "(match)" in out, (out, err)
    rc, out, _ = cli(state, "speakers", "verify", str(clip_path(B, 5)), "--speaker", "ann")
    assert rc == 0 and out.startswith("reject ")
    rc, out, _ = cli(state, "speakers", "verify", str(clip_path(B, 5)), "--reference",
                     str(clip_path(B, 6)), "--json")
    assert rc == 0 and json.loads(out)["result"] == "accept"
    rc, out, _ = cli(state, "speakers", "update", "Ann", "--name", "Anne")
    assert rc == 0 and out.startswith("Anne ")
    rc, out, _ = cli(state, "speakers", "list")
    assert rc == 0 and "Anne" in out and "2 samples" in out
    audio, truth = alternate(A, B)
    talk = tmp_path / "talk.wav"
    sf.write(talk, audio, SR, subtype="PCM_16")
    rc, out, err = cli(state, "diarize", str(talk), "--json")
    assert rc == 0, err
    di = json.loads(out)
    assert di["num_speakers"] == 2 and len(di["segments"]) >= len(truth)
    assert "Anne" in {s["name"] for s in di["speakers"]}
    rc, out, _ = cli(state, "diarize", str(talk), "--num-speakers", "2")
    assert rc == 0 and "(Anne)" in out and "SPEAKER_01" in out
    # Failures: exit 1 with the reason on stderr, and the store as it was.
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really")
    for args, why in [(("speakers", "register", "Bo", str(junk)), "bad_audio"),
                      (("speakers", "register", "Bo", str(tmp_path / "missing.wav")),
                       "cannot read"),
                      (("speakers", "get", "nobody"), "not_found"),
                      (("speakers", "register", "anne", str(clip_path(B, 0))), "name_taken")]:
        rc, out, err = cli(state, *args)
        assert rc == 1 and why in err, (args, rc, out, err)
    rc, out, _ = cli(state, "speakers", "list", "--json")
    assert [s["name"] for s in json.loads(out)["speakers"]] == ["Anne"]
    rc, out, _ = cli(state, "speakers", "delete", "anne")
    assert rc == 0 and "deleted" in out
    rc, out, _ = cli(state, "speakers", "list")
    assert rc == 0 and out.strip() == "no speakers"
