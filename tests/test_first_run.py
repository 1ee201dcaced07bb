"""The first run, as a new user has it: `voice-agent run` on the defaults, with no microphone.

It must print where the kiosk is, say honestly that it has no audio, and still let the user
talk through the browser's microphone; on a terminal, Enter is push-to-talk.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from agent.asr.wer import wer

from .conftest import ASR_EN, REPO, need_shared
from .test_kiosk_browser import browser, need_browser

EXE = REPO / ".venv" / "bin" / "voice-agent"
URL_LINE = re.compile(r"kiosk and API at (http://\S+)")
WER_BOUND = 0.2
CARDS = ("cards-005.wav", "eight of spades four of clubs seven of hearts")


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The user's environment with no voice-agent settings but a private state dir and port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT")}
    # Port 0: the default 8765 may be taken on a shared machine; the banner shows the real one.
    env.update(VOICE_AGENT__STATE_DIR=str(tmp / "state"), VOICE_AGENT__API__PORT="0",
               PULSE_SERVER="unix:/nonexistent", **extra)
    return env


def read_until(proc: subprocess.Popen[str], pattern: re.Pattern[str], within: float
               ) -> tuple[re.Match[str], list[str]]:
    """Lines of stdout until one matches (read by a thread: pipes buffer ahead of select)."""
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        m = pattern.search(line)
        if m:
            return m, seen
    raise AssertionError(f"no line matching {pattern.pattern!r} within {within} s: {seen}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def hold_browser_mic(url: str, mic_wav: Path, hold_s: float) -> dict[str, Any]:
    """Open the kiosk, hold push-to-talk with the browser's microphone, read the final."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="first-run-profile-") as profile:
        driver = browser(mic_wav, Path(profile))
        try:
            driver.set_page_load_timeout(30)
            # ?mic=press: the microphone (a file played once) opens at the press, so the file's
            # lead silence, not the speech, covers the page's start-up.
            driver.get(url + ("&" if "?" in url else "?") + "mic=press")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: "on" in d.find_element(By.ID, "conn").get_attribute("class"))
            out["page"] = driver.find_element(By.TAG_NAME, "body").text
            ptt = driver.find_element(By.ID, "ptt")
            ActionChains(driver).click_and_hold(ptt).perform()
            time.sleep(hold_s)
            ActionChains(driver).release(ptt).perform()
            final = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#finals li .text"))
            out["final"] = final[0].text
        finally:
            out["console"] = [e["message"] for e in driver.get_log("browser")
                              if e["level"] == "SEVERE"]
            driver.quit()
    return out


@pytest.mark.slow
def test_default_run_without_a_mic_is_honest_and_the_browser_mic_works(tmp_path: Path) -> None:
    need_shared()
    need_browser()
    x, _ = sf.read(ASR_EN / CARDS[0], dtype="float32")
    mic = tmp_path / "mic.wav"
    # 1.5 s of lead silence: the page's microphone and socket start-up, slower on a busy box.
    sf.write(mic, np.concatenate([np.zeros(24000, np.float32), x, np.zeros(16000, np.float32)]),
             16000, subtype="PCM_16")
    proc = subprocess.Popen([str(EXE), "run"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(tmp_path))
    try:
        m, lines = read_until(proc, URL_LINE, 90)
        url = m.group(1)
        banner = "".join(lines)
        assert "audio unavailable" in banner and "degraded" in banner, banner
        health = get_json(url.split("?")[0].rstrip("/") + "/api/health")
        assert health["status"] == "degraded" and health["ready"] is True
        assert health["audio"]["state"] == "unavailable"
        assert "input device" in health["audio"]["reason"]
        assert any("audio unavailable" in p for p in health["problems"])
        metrics = urllib.request.urlopen(url.split("?")[0] + "metrics", timeout=5).read()
        assert b'voice_agent_audio_state{state="unavailable"} 1' in metrics
        assert b"voice_agent_healthy 0" in metrics
        out = hold_browser_mic(url, mic, 1.5 + len(x) / 16000 + 0.7)
        assert out["console"] == [], out["console"]
        assert wer([CARDS[1]], [out["final"]]) <= WER_BOUND, out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def _pty_read(fd: int, until: re.Pattern[str], within: float, seen: list[str]) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                break
            seen.append(chunk)
            text = "".join(seen)
            if until.search(text):
                return text
    raise AssertionError(f"no {until.pattern!r} within {within} s; terminal showed: "
                         f"{''.join(seen)[-2000:]!r}")


@pytest.mark.slow
def test_terminal_push_to_talk_on_enter_prints_the_final(tmp_path: Path) -> None:
    """Enter opens the gate, Enter closes it, and the final is printed with its latency."""
    need_shared()
    x, _ = sf.read(ASR_EN / CARDS[0], dtype="float32")
    lead = 2.0
    rec = tmp_path / "rec.wav"
    sf.write(rec, np.concatenate([np.zeros(int(lead * 16000), np.float32), x,
                                  np.zeros(3 * 16000, np.float32)]), 16000, subtype="PCM_16")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a daemon on a terminal, a file standing in for the mic
        os.execve(str(EXE), [str(EXE), "run", "--source", f"file:{rec}", "--realtime",
                             "--mode", "ptt"], clean_env(tmp_path))
    seen: list[str] = []
    try:
        # The file starts playing when the models are loaded, which is when the banner shows.
        text = _pty_read(fd, re.compile(r"press Enter or Space"), 90, seen)
        assert URL_LINE.search(text), text
        t0 = time.monotonic()
        time.sleep(max(0.0, lead - 0.6 - (time.monotonic() - t0)))
        os.write(fd, b"\n")  # open: just before the speech
        time.sleep(max(0.0, lead + len(x) / 16000 + 0.6 - (time.monotonic() - t0)))
        os.write(fd, b"\n")  # close: just after it
        text = _pty_read(fd, re.compile(r"> .*\(\d+ ms\)"), 30, seen)
        # "> [speaker, emotion] text  (N ms)": the tags go before the text when analysers run
        final = re.findall(r"> (?:\[[^\]]*\] )?([^\r\n]*?)\s+\((\d+) ms\)", text)[-1]
        assert wer([CARDS[1]], [final[0]]) <= WER_BOUND, text[-1000:]
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # the recording ended, and the daemon with it
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
