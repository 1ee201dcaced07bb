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
import soundfile as sf

from agent.analysis import Analyser, Utterance
from agent.audio.base import AudioSource
from agent.audio.file import FileSource
from agent.bus import Publisher
from agent.config import WebrtcVadConfig, load_config
from agent.daemon import Daemon
from agent.events import BaseEvent, UtteranceEnded
from agent.vad.base import Vad
from agent.vad.factory import make_vad
from agent.vad.segmenter import Segmenter, SegmenterParams

from .conftest import ASR_EN, GAP_S, REPO, Joined, asr_en_rows

NO_ASR = {"VOICE_AGENT__ASR__ENABLED": "false"}  # for tests about audio and VAD alone
Spans = list[tuple[float, float]]
# Labels (tests/joined.py) are 10 ms frames; VAD frames are 30/32 ms: what one frame of
# quantisation on each side allows.
TOL_S = 0.03
# Measured lateness of the real VADs on this recording (tests/joined.py labels; errors are
# printed by check_boundaries). Starts: webrtc is within TOL_S; Silero reacts late on soft
# onsets ("and", "four": its probability stays under 0.5 for up to 5 frames). Ends: both
# VADs hold speech for a hangover after the energy falls (webrtc's GMM overhang, Silero's
# hysteresis), up to ~0.33 s on "five five" (its tail decays slowly). A VAD that is early,
# or that clips speech, is held to TOL_S.
LATE_START_S = {"webrtc": TOL_S, "silero": 0.2}
LATE_END_S = {"webrtc": 0.4, "silero": 0.3}


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
            timeout: float = 120) -> tuple[int, list[dict], str]:
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "agent", *args], input=stdin,
                       capture_output=True, timeout=timeout, env=full_env, cwd=REPO)
    events = [json.loads(line) for line in p.stdout.decode().splitlines() if line.strip()]
    return p.returncode, events, p.stderr.decode()


def rolls(backend: str) -> tuple[float, float]:
    """The pre- and post-roll the segmenter really applies (whole VAD frames), seconds."""
    cfg = load_config(None, env={"VOICE_AGENT__VAD__BACKEND": backend})
    frame_ms = 30.0 if backend == "webrtc" else 32.0
    seg = Segmenter(SegmenterParams.from_config(cfg.segmenter, frame_ms))
    return seg.pre_roll * frame_ms / 1000, seg.post_roll * frame_ms / 1000


def boundaries(events: list[dict]) -> Spans:
    """(audio_start_s, audio_end_s) of every utterance.ended."""
    return [(e["audio_start_s"], e["audio_end_s"]) for e in events
            if e["type"] == "utterance.ended"]


def check_boundaries(got: Spans, spans: Spans, backend: str) -> None:
    """One utterance per labelled span; start = onset - pre-roll, end = offset + post-roll."""
    assert len(got) == len(spans), got
    pre, post = rolls(backend)
    errors = [(round(s - (on - pre), 3), round(e - (off + post), 3))
              for (s, e), (on, off) in zip(got, spans, strict=True)]
    print(f"{backend}: start/end errors (s) against the labels: {errors}")
    for (ds, de), span in zip(errors, spans, strict=True):
        assert -TOL_S <= ds <= LATE_START_S[backend], (span, ds, errors)
        assert -TOL_S <= de <= LATE_END_S[backend], (span, de, errors)


def check_events(events: list[dict]) -> None:
    """Starts pair with ends, ids unique."""
    utts = [e for e in events if e["type"] == "utterance.ended"]
    starts = [e for e in events if e["type"] == "utterance.started"]
    assert [e["utterance_id"] for e in starts] == [e["utterance_id"] for e in utts]
    assert len({e["utterance_id"] for e in utts}) == len(utts)


@pytest.mark.parametrize("backend", ["webrtc", "silero"])
def test_vad_mode_finds_each_utterance(backend: str, joined: Joined) -> None:
    rc, events, err = run_cli("run", "--source", f"file:{joined.path}", "--mode", "vad",
                              "--events", "-", env={"VOICE_AGENT__VAD__BACKEND": backend, **NO_ASR})
    assert rc == 0, err
    check_boundaries(boundaries(events), list(joined_spans(joined)), backend)
    check_events(events)
    assert all(e["device_id"] for e in events)
    speech = [e["type"] for e in events if e["type"].startswith("speech.")]
    assert speech == ["speech.started", "speech.ended"] * 10


def joined_spans(joined: Joined) -> Spans:
    return [(s.onset, s.offset) for s in joined.spans]


class NonZeroVad(Vad):
    """The broken VAD the fixture must expose: any non-zero sample is speech."""

    name = "webrtc"  # judged by the webrtc rules: same 30 ms frames
    frame_samples = 480

    def is_speech(self, frame: np.ndarray) -> bool:
        return bool(np.any(frame))


def segment(path: Path, vad: Vad) -> Spans:
    """The segmenter's utterances over a file, with the daemon's segmenter settings."""
    x, _ = sf.read(path, dtype="int16")
    cfg = load_config(None, env={})
    frame_ms = 1000 * vad.frame_samples / 16000
    seg = Segmenter(SegmenterParams.from_config(cfg.segmenter, frame_ms))
    n = vad.frame_samples
    frames = [x[i * n:(i + 1) * n] for i in range(len(x) // n)]
    events = [ev for f in frames for ev in seg.feed(vad.is_speech(f))]
    events += seg.flush("end_of_stream")
    starts = [e.frame for e in events if e.kind == "utterance_start"]
    ends = [e.frame for e in events if e.kind == "utterance_end"]
    return [(a * frame_ms / 1000, b * frame_ms / 1000) for a, b in zip(starts, ends, strict=True)]


def test_the_recording_tells_a_real_vad_from_a_fake(joined: Joined) -> None:
    spans = joined_spans(joined)
    # The real webrtc VAD, in process, passes the same check as through the daemon ...
    check_boundaries(segment(joined.path, make_vad(WebrtcVadConfig())), spans, "webrtc")
    # ... a VAD that calls any non-zero sample speech does not: the gaps hold room tone.
    with pytest.raises(AssertionError):
        check_boundaries(segment(joined.path, NonZeroVad()), spans, "webrtc")
    # Nor do the file edges: the labels are where each clip's speech is.
    edges, at = [], 0.0
    for row in asr_en_rows():
        dur = sf.info(ASR_EN / row["file"]).duration
        edges.append((at, at + dur))
        at += dur + GAP_S
    pre, post = rolls("webrtc")
    with pytest.raises(AssertionError):
        check_boundaries([(a - pre, b + post) for a, b in edges], spans, "webrtc")
    # The room tone is a realistic level, and the gaps are not digital silence.
    x, _ = sf.read(joined.path, dtype="float64")
    gap = x[int((spans[0][1] + 0.5) * 16000):int((spans[1][0] - 0.5) * 16000)]
    assert -60 < 20 * np.log10(np.sqrt(np.mean(gap ** 2))) < -40
    assert -60 < joined.tone_dbfs < -40 and np.count_nonzero(gap) > 0.9 * len(gap)


def test_stdin_source(joined: Joined) -> None:
    pcm, _ = sf.read(joined.path, dtype="int16")
    rc, events, err = run_cli("run", "--source", "stdin", "--mode", "vad", "--events", "-",
                              stdin=pcm.tobytes(), env=NO_ASR)
    assert rc == 0, err
    check_boundaries(boundaries(events), joined_spans(joined), "webrtc")
    check_events(events)


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
    """Collects each utterance's audio; optionally failing, or held until `hold` is set.

    `all_done` is set once `expect` utterances were recorded.
    """

    def __init__(self, name: str, fail: bool = False, hold: asyncio.Event | None = None,
                 all_done: asyncio.Event | None = None, expect: int = 0) -> None:
        self.name = name
        self.fail = fail
        self.hold = hold
        self.all_done = all_done
        self.expect = expect
        self.audio: dict[str, int] = {}
        self.aborted: list[str] = []
        self.held = 0
        self.max_held = 0

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
        if self.hold is not None:
            self.held += 1
            self.max_held = max(self.max_held, self.held)
            try:
                # Bounded: an analyser that held up the others would deadlock the daemon.
                await asyncio.wait_for(self.hold.wait(), 30)
            finally:
                self.held -= 1
        self.audio[utt.id] = n
        if self.all_done is not None and len(self.audio) == self.expect:
            self.all_done.set()


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
    pre, _ = rolls("webrtc")
    assert -TOL_S <= ended[0].audio_start_s - (spans[1][0] - pre) <= LATE_START_S["webrtc"]
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
    path, spans = joined_recording
    fast_done = asyncio.Event()
    fast = Recorder("fast", all_done=fast_done, expect=len(spans))
    # The slow analyser finishes nothing until the fast one has done every utterance.
    slow, broken = Recorder("slow", hold=fast_done), Recorder("bad", fail=True)
    _, events, rc = await run_daemon("vad", FileSource(path, 30), [fast, slow, broken])
    assert rc == 0
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    assert len(ended) == 10
    # Every analyser saw exactly the utterance's audio.
    for e in ended:
        want = round((e.audio_end_s - e.audio_start_s) * 16000)
        assert fast.audio[str(e.utterance_id)] == want
        assert slow.audio[str(e.utterance_id)] == want
    # The slow analyser held up nobody: its analyses of (nearly) every utterance waited at
    # once while the fast one went through all ten.
    assert slow.max_held >= len(ended) - 1, slow.max_held
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
        errors: list[dict[str, str]] = []
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
