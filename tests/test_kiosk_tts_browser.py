"""The kiosk page plays the daemon's replies: headless Chromium, /ws/tts, Web Audio.

The daemon speaks through the fake cloud's voice (a tone per character, so every sample is
known); the page's player (agent/web/player.js) schedules the chunks gaplessly, and what it
reports is read back: samples received and played, the playout time against the audio's
length, underruns, and the level a Web Audio AnalyserNode measured on the page's output.
A barge-in (push-to-talk) must stop the page's audio at once.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.dashscope_fake import FakeDashscope, TtsScript, fake_pcm
from tests.test_kiosk_browser import CHROMEDRIVER, CHROMIUM, need_browser
from tests.test_reply_app import reply_daemon

KEY = "kiosk-tts-key-0123456789"
WAIT_S = 30.0
TEXT = "Welcome home. The heating is on!"
OUTPUT = REPO / "test-output"


def browser(profile: Path) -> Any:
    """Headless Chromium that may start audio without a click (a kiosk's setting)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,800",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def post(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A blocking POST from the browser thread (the daemon's loop serves it meanwhile)."""
    req = urllib.request.Request(base + path, data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json",
                                          "X-API-Key": KEY}, method="POST")
    with urllib.request.urlopen(req, timeout=WAIT_S) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


def drive(base: str, shot: Path) -> dict[str, Any]:
    """Open the kiosk, have the daemon speak twice (the second time cut short), read stats."""
    from selenium.webdriver.support.ui import WebDriverWait

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kiosk-tts-") as profile:
        driver = browser(Path(profile))
        try:
            driver.set_page_load_timeout(WAIT_S)
            driver.get(f"{base}/?token={KEY}")
            wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.02)

            def stats(d: Any = driver) -> dict[str, Any]:
                s: dict[str, Any] = d.execute_script(
                    "return window.voiceAgentPlayer ? "
                    "Object.assign({}, window.voiceAgentPlayer.stats) : null") or {}
                return s

            wait.until(lambda d: stats(d).get("connected"))
            out["said"] = post(base, "/api/say", {"text": TEXT})
            wait.until(lambda d: stats(d).get("ended", 0) >= 1)
            out["first"] = stats()
            out["badge"] = driver.find_element("id", "tts").text
            # A long reply at real-time pace, cut short by push-to-talk.
            talk = threading.Thread(target=lambda: out.update(
                long=post(base, "/api/say", {"text": "Mmmmmmmmmm. " * 40})))
            talk.start()
            wait.until(lambda d: stats(d).get("chunks", 0) >= out["first"]["chunks"] + 8
                       and stats(d).get("level", 0) > 0.1)
            out["before_abort"] = stats()
            t_cmd = time.monotonic()
            post(base, "/api/ptt/start")
            wait.until(lambda d: stats(d).get("aborts", 0) >= 1)
            out["abort_ms"] = 1000 * (time.monotonic() - t_cmd)
            time.sleep(0.3)
            out["after_abort"] = stats()
            talk.join(WAIT_S)
            driver.save_screenshot(str(shot))
        finally:
            out["console"] = [e["message"] for e in driver.get_log("browser")
                              if e["level"] == "SEVERE"]
            driver.quit()
    return out


async def test_kiosk_page_plays_a_reply_and_stops_on_barge_in() -> None:
    need_browser()
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "kiosk_tts_browser.png"
    async with FakeDashscope() as fake, reply_daemon(fake, api__key=KEY) as run:
        fake.tts_plan.append(TtsScript())
        # The long reply: 50 ms frames, paced in real time.
        fake.tts_default = TtsScript(frame_bytes=1600, frame_interval_s=0.05)
        out = await asyncio.wait_for(asyncio.to_thread(drive, run.base, shot), 110)
        sent = b"".join(fake_pcm(t) for _, t in fake.tts_log[0].texts)
        cancelled = run.of("reply.cancelled")
    first, said = out["first"], out["said"]
    print(f"page: {first}; abort seen {out['abort_ms']:.0f} ms after PTT; "
          f"after: {out['after_abort']}")
    assert out["console"] == [], out["console"]
    assert first["replies"] == 1 and first["lastReplyId"] == said["reply_id"]
    assert first["samples"] == len(sent) // 2 and first["played"] == first["samples"]
    assert first["sampleRate"] == 16000 and first["underruns"] == 0
    # Played in real time, gaplessly: the playout lasted as long as the audio, no longer.
    assert first["lastDurationS"] == pytest.approx(said["audio_s"], abs=0.12)
    assert first["peak"] > 0.2  # the tones (0.3 full scale) reached the page's output
    assert out["badge"] == "speaker idle"
    # Barge-in: the page stopped playing, its output went silent.
    assert out["long"]["outcome"] == "cancelled"
    assert [c.reason for c in cancelled] == ["barge_in"]
    after = out["after_abort"]
    assert after["aborts"] == 1 and after["active"] == 0 and after["level"] < 0.01
    assert out["abort_ms"] < 500  # including the selenium polling round trips
    assert shot.stat().st_size > 10_000
