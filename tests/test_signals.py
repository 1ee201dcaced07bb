"""Signals to a running `voice-agent run`: SIGTERM with each source, SIGHUP mid-stream.

SIGTERM must finish the utterance in progress (`reason: shutdown`) and exit 0 within the
shutdown grace, whatever the source is blocked on; SIGHUP must not stop the daemon or lose
an utterance. Each test runs the real CLI in its own process and waits on its events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from queue import Empty, Queue
from typing import IO, Any

import pytest
import soundfile as sf

from agent.daemon import SHUTDOWN_GRACE_S

from .conftest import REPO, Joined
from .pulse import PulseServer

NO_ASR = {"VOICE_AGENT__ASR__ENABLED": "false"}
EXIT_WITHIN_S = SHUTDOWN_GRACE_S + 3.0  # the grace, plus interpreter start-up slack
EVENT_WAIT_S = 60.0


class Agent:
    """`voice-agent run` in a subprocess; its events read by a thread into a queue."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 stdin: int | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", *args,
                                      "--events", "-"], stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                                     cwd=REPO)
        self.events: list[dict[str, Any]] = []
        self._q: Queue[dict[str, Any] | None] = Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self._q.put(json.loads(line))
        self._q.put(None)

    def until(self, event_type: str, within: float = EVENT_WAIT_S, count: int = 1
              ) -> dict[str, Any]:
        """Wait for the `count`-th event of `event_type` (seen from now on or before)."""
        deadline = time.monotonic() + within
        while sum(e["type"] == event_type for e in self.events) < count:
            try:
                ev = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                raise AssertionError(f"no {event_type} within {within} s: "
                                     f"{[e['type'] for e in self.events]}") from None
            if ev is None:
                raise AssertionError(f"daemon exited ({self.proc.wait()}) before {event_type}:"
                                     f" {self.stderr()}")
            self.events.append(ev)
        return [e for e in self.events if e["type"] == event_type][count - 1]

    def finish(self, within: float) -> int:
        """Wait for the exit, collecting the remaining events; the exit code."""
        rc = self.proc.wait(timeout=within)
        self._reader.join(5)
        while (ev := self._q.get_nowait() if not self._q.empty() else None) is not None:
            self.events.append(ev)
        return rc

    def stderr(self) -> str:
        """What the daemon logged (only once it has exited)."""
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        """Make sure nothing is left running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def ended(self) -> list[dict[str, Any]]:
        """Every utterance.ended so far."""
        return [e for e in self.events if e["type"] == "utterance.ended"]


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Daemons started by a test; killed if the test left one running."""
    started: list[Agent] = []
    yield started
    for a in started:
        a.kill()


def sigterm_and_check(agent: Agent) -> None:
    """SIGTERM mid-utterance: exit 0 in time, the utterance ended with `shutdown`."""
    started = agent.until("utterance.started")
    t0 = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    try:
        rc = agent.finish(EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_WITHIN_S} s after SIGTERM")
    took = time.monotonic() - t0
    assert rc == 0, agent.stderr()
    ended = [e for e in agent.ended() if e["utterance_id"] == started["utterance_id"]]
    assert [e["reason"] for e in ended] == ["shutdown"], (took, agent.events)
    assert ended[0]["audio_end_s"] > started["audio_start_s"]


def test_sigterm_with_a_file_source(agents: list[Agent], joined: Joined) -> None:
    a = Agent("--source", f"file:{joined.path}", "--realtime", "--mode", "vad", env=NO_ASR)
    agents.append(a)
    sigterm_and_check(a)
    # The recording is 48 s: the daemon stopped at the first utterance, not at the end.
    assert a.ended()[0]["audio_end_s"] < joined.spans[0].offset + 1.0


def _write_pcm(pipe: IO[bytes], pcm: bytes) -> None:
    pipe.write(pcm)
    pipe.flush()


def test_sigterm_with_stdin_held_open(agents: list[Agent], joined: Joined) -> None:
    pcm, _ = sf.read(joined.path, dtype="int16", frames=int(joined.spans[0].offset * 16000))
    a = Agent("--source", "stdin", "--mode", "vad", env=NO_ASR, stdin=subprocess.PIPE)
    agents.append(a)
    assert a.proc.stdin is not None
    # Speech up to the middle of the first utterance, then nothing, and the pipe stays open.
    _write_pcm(a.proc.stdin, pcm.tobytes())
    sigterm_and_check(a)


def test_sigterm_with_a_microphone(agents: list[Agent], pulse: PulseServer,
                                   joined: Joined) -> None:
    a = Agent("--source", "mic:pulse", "--mode", "vad", env=NO_ASR)
    agents.append(a)
    # Speech into the virtual microphone until the daemon hears some (it may still be
    # opening the device when playback starts).
    play = subprocess.Popen(pulse.paplay_cmd(joined.path), env=pulse.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sigterm_and_check(a)
    finally:
        play.kill()
        play.wait()


def test_sighup_keeps_running_and_loses_no_utterance(agents: list[Agent], joined: Joined
                                                     ) -> None:
    pcm, _ = sf.read(joined.path, dtype="int16")
    half = int((joined.spans[4].offset + 0.75) * 16000)  # in the gap after clip 5
    a = Agent("--source", "stdin", "--mode", "vad", env=NO_ASR, stdin=subprocess.PIPE)
    agents.append(a)
    assert a.proc.stdin is not None
    _write_pcm(a.proc.stdin, pcm[:half].tobytes())
    a.until("utterance.started", count=5)
    a.proc.send_signal(signal.SIGHUP)
    _write_pcm(a.proc.stdin, pcm[half:].tobytes())
    a.proc.stdin.close()
    rc = a.finish(60)
    assert rc == 0, a.stderr()
    ended = a.ended()
    assert len(ended) == len(joined.spans), ended
    assert [e["reason"] for e in ended] == ["silence"] * 9 + ["end_of_stream"] or \
        [e["reason"] for e in ended] == ["silence"] * 10
    assert not [e for e in a.events if e["type"] == "error" and e.get("fatal")]
