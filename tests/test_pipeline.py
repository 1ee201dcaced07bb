"""The whole chain on real speech: file -> gate -> VAD -> segmenter -> analysers -> events."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from agent.analysis import Analyser, Utterance
from agent.audio.base import AudioSource
from agent.audio.file import FileSource
from agent.bus import Publisher
from agent.config import load_config
from agent.daemon import Daemon
from agent.events import BaseEvent, UtteranceEnded

from .conftest import REPO

TOLERANCE_S = 0.25
NO_ASR = {"VOICE_AGENT__ASR__ENABLED": "false"}  # for tests about audio and VAD alone
Spans = list[tuple[float, float]]


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
            timeout: float = 120) -> tuple[int, list[dict], str]:
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "agent", *args], input=stdin,
                       capture_output=True, timeout=timeout, env=full_env, cwd=REPO)
    events = [json.loads(line) for line in p.stdout.decode().splitlines() if line.strip()]
    return p.returncode, events, p.stderr.decode()


def check_boundaries(events: list[dict], spans: Spans) -> None:
    utts = [e for e in events if e["type"] == "utterance.ended"]
    got = [(round(e["audio_start_s"], 3), round(e["audio_end_s"], 3)) for e in utts]
    assert len(utts) == len(spans), got
    for (s, e), (ts, te) in zip(got, spans, strict=True):
        assert abs(s - ts) <= TOLERANCE_S, (s, ts, got)
        assert abs(e - te) <= TOLERANCE_S, (e, te, got)
    starts = [e for e in events if e["type"] == "utterance.started"]
    assert [e["utterance_id"] for e in starts] == [e["utterance_id"] for e in utts]
    assert len({e["utterance_id"] for e in utts}) == len(utts)


@pytest.mark.parametrize("backend", ["webrtc", "silero"])
def test_vad_mode_finds_each_utterance(backend: str, joined_recording: tuple[Path, Spans]
                                       ) -> None:
    path, spans = joined_recording
    rc, events, err = run_cli("run", "--source", f"file:{path}", "--mode", "vad",
                              "--events", "-", env={"VOICE_AGENT__VAD__BACKEND": backend, **NO_ASR})
    assert rc == 0, err
    check_boundaries(events, spans)
    assert all(e["device_id"] for e in events)
    speech = [e["type"] for e in events if e["type"].startswith("speech.")]
    assert speech == ["speech.started", "speech.ended"] * 10


def test_stdin_source(joined_recording: tuple[Path, Spans]) -> None:
    import soundfile as sf

    path, spans = joined_recording
    pcm, _ = sf.read(path, dtype="int16")
    rc, events, err = run_cli("run", "--source", "stdin", "--mode", "vad", "--events", "-",
                              stdin=pcm.tobytes(), env=NO_ASR)
    assert rc == 0, err
    check_boundaries(events, spans)


class ScriptedSource(AudioSource):
    """A file source that issues gate commands when playback reaches given times."""

    def __init__(self, path: Path, script: list[tuple[float, str]]) -> None:
        super().__init__(30)
        self.inner = FileSource(path, 30)
        self.script = sorted(script)
        self.gate_handle = None  # set by the test once the daemon exists

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        pos = 0
        async for chunk in self.inner.chunks():
            while self.script and self.script[0][0] * 16000 <= pos:
                _, cmd = self.script.pop(0)
                self.gate_handle(cmd)  # type: ignore[misc]
            pos += len(chunk)
            yield chunk


class Recorder(Analyser):
    """Collects each utterance's audio; optionally slow or failing."""

    def __init__(self, name: str, delay: float = 0.0, fail: bool = False) -> None:
        self.name = name
        self.delay = delay
        self.fail = fail
        self.audio: dict[str, int] = {}
        self.done: dict[str, float] = {}
        self.aborted: list[str] = []

    async def analyse(self, utt: Utterance, audio: AsyncIterator[np.ndarray],
                      pub: Publisher) -> None:
        n = 0
        async for chunk in audio:
            assert chunk.dtype == np.int16
            n += len(chunk)
        if utt.aborted:
            self.aborted.append(utt.id)
            return
        if self.fail:
            raise RuntimeError("analyser exploded on purpose")
        await asyncio.sleep(self.delay)
        self.audio[utt.id] = n
        self.done[utt.id] = time.monotonic()


async def run_daemon(mode: str, source: AudioSource, analysers: list[Analyser] | None = None,
                     **env: str) -> tuple[Daemon, list[BaseEvent], int]:
    cfg = load_config(None, env={"VOICE_AGENT__GATE__MODE": mode, **NO_ASR, **env})
    d = Daemon(cfg, analysers=analysers, source=source)
    if isinstance(source, ScriptedSource):
        source.gate_handle = d.gate.handle  # type: ignore[assignment]
    sub = d.bus.subscribe(100_000)
    rc = await d.run()
    return d, [e async for e in sub], rc


async def test_ptt_utterances_only_inside_windows(joined_recording: tuple[Path, Spans]) -> None:
    path, spans = joined_recording
    windows = [(8.0, 19.0), (27.0, 29.0), (41.0, 41.9)]
    script = [(a, "start") for a, _ in windows] + [(b, "stop") for _, b in windows]
    src = ScriptedSource(path, script)
    _, events, rc = await run_daemon("ptt", src)
    assert rc == 0
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    chunk = 0.03  # commands take effect at the next 30 ms chunk boundary
    for e in ended:
        assert any(a <= e.audio_start_s and e.audio_end_s <= b + chunk for a, b in windows), e
    # Inside (8, 19): utterances 2 and 3 whole; (27, 29) and (41, 41.9) cut by the stop.
    assert len(ended) == 4
    assert [e.reason for e in ended] == ["silence", "silence", "ptt_stop", "ptt_stop"]
    assert abs(ended[0].audio_start_s - spans[1][0]) <= TOLERANCE_S
    assert abs(ended[2].audio_end_s - 29.0) <= chunk + 0.001
    states = [(e.state, e.reason) for e in events if e.type == "state.changed"]  # type: ignore[attr-defined]
    assert states == [("open", "command"), ("closed", "command")] * 3
    # Each hold is its own session, and utterances carry the session they belong to.
    sessions = [e.session_id for e in events if e.type == "state.changed"][::2]
    assert len(set(sessions)) == 3
    assert [e.session_id for e in ended] == [sessions[0], sessions[0], sessions[1], sessions[2]]


async def test_ptt_reset_abandons_utterance(joined_recording: tuple[Path, Spans]) -> None:
    path, _ = joined_recording
    rec = Recorder("rec")
    src = ScriptedSource(path, [(0.0, "start"), (3.0, "reset")])
    _, events, _ = await run_daemon("ptt", src, [rec])
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    assert [e.reason for e in ended] == ["reset"]
    assert rec.aborted == [ended[0].utterance_id] and rec.audio == {}


async def test_analysers_run_in_parallel_and_fail_alone(joined_recording: tuple[Path, Spans]
                                                        ) -> None:
    path, _ = joined_recording
    fast, slow, broken = Recorder("fast"), Recorder("slow", delay=1.0), Recorder("bad", fail=True)
    t0 = time.monotonic()
    _, events, rc = await run_daemon("vad", FileSource(path, 30), [fast, slow, broken])
    assert rc == 0
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    assert len(ended) == 10
    # Every analyser saw exactly the utterance's audio.
    for e in ended:
        want = round((e.audio_end_s - e.audio_start_s) * 16000)
        assert fast.audio[e.utterance_id] == want
        assert slow.audio[e.utterance_id] == want
    # The slow analyser held up nobody: all ten ran concurrently, not one after another.
    assert max(slow.done.values()) - t0 < 10 * 1.0
    assert max(fast.done.values()) < min(slow.done.values())
    errors = [e for e in events if e.type == "error"]
    assert len(errors) == 10 and all(e.stage == "bad" for e in errors)  # type: ignore[attr-defined]


def test_corrupt_and_missing_files_fail_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(2000))
    rc, events, err = run_cli("run", "--source", f"file:{bad}", "--events", "-", env=NO_ASR)
    assert rc == 1
    errs = [e for e in events if e["type"] == "error"]
    assert errs and errs[0]["stage"] == "audio" and errs[0]["code"] == "corrupt"
    assert str(bad) in errs[0]["message"] and "Traceback" not in err
    rc, events, err = run_cli("run", "--source", f"file:{tmp_path / 'nope.flac'}",
                              "--events", "-", env=NO_ASR)
    assert rc == 1 and [e["code"] for e in events if e["type"] == "error"] == ["not_found"]


def test_unknown_mic_keeps_daemon_alive_and_retrying() -> None:
    env = {**os.environ, **NO_ASR, "VOICE_AGENT__AUDIO__RETRY_INITIAL_S": "0.2",
           "VOICE_AGENT__AUDIO__RETRY_MAX_S": "0.4"}
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--source",
                          "mic:no-such-microphone-xyz", "--events", "-"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert p.stdout is not None
        errors = []
        deadline = time.monotonic() + 30
        while len(errors) < 3 and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            if ev["type"] == "error":
                errors.append(ev)
        assert len(errors) == 3, errors
        assert p.poll() is None  # still running
        assert {e["code"] for e in errors} <= {"device_not_found", "portaudio_missing"}
        assert "no-such-microphone-xyz" in errors[0]["message"] or \
            errors[0]["code"] == "portaudio_missing"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_sigterm_finishes_current_utterance(joined_recording: tuple[Path, Spans]) -> None:
    path, spans = joined_recording
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--source", f"file:{path}",
                          "--realtime", "--mode", "vad", "--events", "-"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **NO_ASR}, cwd=REPO)
    try:
        assert p.stdout is not None
        # Wait for the first utterance to start (the first clip starts at 0 s), then stop.
        for line in p.stdout:
            if json.loads(line)["type"] == "utterance.started":
                break
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in p.stdout]
        assert p.wait(timeout=15) == 0
    finally:
        if p.poll() is None:
            p.kill()
    ended = [e for e in rest if e["type"] == "utterance.ended"]
    assert [e["reason"] for e in ended] == ["shutdown"]
    assert 0.5 < ended[0]["audio_end_s"] < spans[0][1]
