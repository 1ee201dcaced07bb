"""Abuse of a whole `voice-agent` process: the open-file limit, SIGTERM mid-request, bad config.

Runs the real CLI in a subprocess (its own open-file limit, real signals), a silent recording
played in real time standing in for the microphone.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile as sf

from agent.config import check_model_ids, load_config
from agent.errors import ConfigError
from agent.models import load_manifest

from .conftest import REPO
from .mosquitto import free_port

NOFILE = 256  # the daemon's open-file limit in this test


def _env(tmp: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT__")}
    return {**env, "VOICE_AGENT__API__PORT": str(port), "VOICE_AGENT__ASR__ENABLED": "false",
            "VOICE_AGENT__EMOTION__ENABLED": "false", "VOICE_AGENT__MQTT__ENABLED": "false",
            "VOICE_AGENT__STATE_DIR": str(tmp / "state"), **extra}


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))  # hard too: no raising it


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """`voice-agent run` on 120 s of silence in real time, at most NOFILE open files."""
    wav = tmp_path / "silence.wav"
    sf.write(wav, np.zeros(120 * 16000, np.int16), 16000)
    port = free_port()
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--source", f"file:{wav}",
                              "--realtime"], env=_env(tmp_path, port), cwd=REPO, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=_low_nofile)
    try:
        deadline = time.monotonic() + 60
        while b"API listening" not in log.read_bytes():
            assert p.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the daemon never listened"
            time.sleep(0.1)
        yield p, port, log
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


async def _health(base: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/api/health",
                                                         timeout=aiohttp.ClientTimeout(5)) as r:
        assert r.status == 200
        return await r.json()


async def test_a_connection_flood_under_a_low_open_file_limit(
        daemon: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    p, port, log = daemon
    base = f"http://127.0.0.1:{port}"
    conns = []
    for _ in range(2 * NOFILE):  # far more than the daemon may open
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        conns.append(w)
    t0 = time.monotonic()
    health = await _health(base)
    assert time.monotonic() - t0 < 3.0 and health["status"] in ("ok", "degraded")
    for w in conns:
        w.close()
    await asyncio.sleep(0.5)
    assert (await _health(base))["status"] in ("ok", "degraded")
    text = log.read_text(errors="replace")
    assert "Too many open files" not in text and "Traceback" not in text, text[-3000:]
    assert f"at most {NOFILE - 128} connections" in text  # the cap followed the limit
    print(f"\ndaemon fds after the flood: {len(os.listdir(f'/proc/{p.pid}/fd'))}")
    assert p.poll() is None


async def test_requests_in_flight_at_sigterm_get_a_503(
        daemon: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    p, port, log = daemon
    r, w = await asyncio.open_connection("127.0.0.1", port)
    # An upload still arriving when the daemon is told to stop.
    w.write(b"POST /api/asr/transcribe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"audio/wav\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 1000)
    await w.drain()
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    answer = await asyncio.wait_for(r.read(), 15)
    took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b'"stopping"' in answer and b"Retry-After" in answer
    assert await asyncio.to_thread(p.wait, 15) == 0
    assert took < 5.0, took
    assert "Traceback" not in log.read_text(errors="replace")


# ---- secrets and config --------------------------------------------------------------------


def check_config(tmp_path: Path, yaml_text: str, **env: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    return subprocess.run([sys.executable, "-m", "agent", "check-config", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**_env(tmp_path, 0), **env})


@pytest.mark.parametrize("value", ["", "~", "null", "  "])
def test_an_empty_key_variable_is_a_config_error(tmp_path: Path, value: str) -> None:
    r = check_config(tmp_path, "api:\n  key: yaml-secret-4711\n", VOICE_AGENT__API__KEY=value)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "VOICE_AGENT__API__KEY" in r.stderr and "empty" in r.stderr
    assert "yaml-secret-4711" not in r.stderr + r.stdout


def test_secrets_are_plain_strings_and_never_printed(tmp_path: Path) -> None:
    ok = check_config(tmp_path, "{}\n", VOICE_AGENT__MQTT__PASSWORD="123456",
                      VOICE_AGENT__API__KEY="0777")
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    cfg = load_config(None, env={"VOICE_AGENT__MQTT__PASSWORD": "123456",
                                 "VOICE_AGENT__API__KEY": "0777"})
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "123456"
    assert cfg.api.key is not None and cfg.api.key.get_secret_value() == "0777"  # not octal
    bad = check_config(tmp_path, "api:\n  key: 98765432\nmqtt:\n  password: [hunter2]\n")
    assert bad.returncode == 2
    assert "api.key" in bad.stderr and "mqtt.password" in bad.stderr
    assert "98765432" not in bad.stderr and "hunter2" not in bad.stderr


def test_a_bad_environment_override_names_its_variable(tmp_path: Path) -> None:
    r = check_config(tmp_path, "{}\n", VOICE_AGENT__GATE__MODE="sometimes")
    assert r.returncode == 2
    assert "gate.mode:" in r.stderr and "VOICE_AGENT__GATE__MODE" in r.stderr
    with pytest.raises(ConfigError) as e:
        load_config(None, env={"VOICE_AGENT__GATE__MODE": "sometimes"})
    assert e.value.source == "VOICE_AGENT__GATE__MODE"  # type: ignore[attr-defined]


def test_an_unknown_model_id_is_a_config_error() -> None:
    known = load_manifest().ids
    check_model_ids(load_config(None, env={}), known)  # the defaults are all known
    with pytest.raises(ConfigError) as e:
        check_model_ids(load_config(None, env={"VOICE_AGENT__ASR__MODEL": "whisper-tinny"}),
                        known)
    assert "asr.model: unknown model id 'whisper-tinny'" in e.value.message
    # A directory overrides the id: it is only a label then.
    check_model_ids(load_config(None, env={"VOICE_AGENT__ASR__MODEL": "my-own",
                                           "VOICE_AGENT__ASR__MODEL_DIR": "/opt/m"}), known)
