"""The kiosk page in headless Chromium against a daemon that really runs (`Daemon.run()` on a
real microphone): a WAV as the browser's microphone -> /ws/asr -> the page, and the daemon's
own audio state on the page, as it changes.

The daemon's microphone is the private PulseAudio's virtual source (tests/pulse.py), unplugged
when the daemon starts: the page must say so and offer only the browser's microphone; once it
is plugged back in, the banner goes and the page's button drives the daemon's gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from agent import models
from agent.api.server import ApiService
from agent.asr.wer import wer
from agent.config import load_config
from agent.daemon import Daemon
from agent.errors import ModelError

from .conftest import REPO, need_shared
from .pulse import PulseServer
from .test_api import KEY, WER_BOUND, clip
from .test_mic_events import replug, unplug

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
OUTPUT = REPO / "test-output"
CLIP = "cards-005.wav"
MODEL = "whisper-tiny.en-int8"
# The page opens its microphone at load, and the fake one plays its file once from then: the
# speech comes LEAD_S later, once the page is up and its banner checked; the button is
# pressed PRESS_EARLY_S before it.
LEAD_S, TAIL_S, PRESS_EARLY_S = 8.0, 1.0, 0.5
WAIT_S = 30.0
AUDIO_TOL_S = 0.1  # the final's audio against the time the button was held


def need_browser() -> None:
    """Skip with the reason when Chromium, its driver or selenium is missing."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver "
                    "(.ci/setup does)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium not installed (pip install -e .[dev])")


def need_model() -> None:
    """Skip with the reason when the default ASR model is not installed."""
    try:
        models.path(MODEL)
    except ModelError as e:
        pytest.skip(f"ASR model {MODEL} not installed ({e.message})")


def browser(mic_wav: Path, profile: Path) -> Any:
    """Headless Chromium with `mic_wav` as its microphone, driven by chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,800",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                # %noloop: the file plays once from the moment the page opens the microphone.
                f"--use-file-for-fake-audio-capture={mic_wav}%noloop"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager never tries to download one.
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def drive(url: str, mic_wav: Path, hold_s: float, shot: Path,
          plug_in: Callable[[], None]) -> dict[str, Any]:
    """Open the kiosk; read the audio banner; hold push-to-talk over the speech, watching for
    partials; plug the daemon's microphone in; drive the daemon's gate."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kiosk-profile-") as profile:
        driver = browser(mic_wav, Path(profile))
        try:
            driver.set_page_load_timeout(WAIT_S)
            driver.get(url)
            wait = WebDriverWait(driver, WAIT_S)
            by_id = driver.find_element
            wait.until(lambda d: "on" in by_id(By.ID, "conn").get_attribute("class"))
            wait.until(lambda d: by_id(By.ID, "gate").get_attribute("data-state"))
            out["gate_before"] = by_id(By.ID, "gate").text
            # The daemon's microphone is unplugged: the page says so, and why.
            banner = wait.until(lambda d: by_id(By.ID, "audio-banner").is_displayed()
                                and by_id(By.ID, "audio-banner"))
            out["banner"] = banner.text
            out["status_before"] = by_id(By.ID, "status").text
            daemon_opt = by_id(By.CSS_SELECTOR, '#mic option[value="daemon"]')
            out["daemon_mic_disabled"] = daemon_opt.get_attribute("disabled") is not None
            # The browser's microphone works regardless: hold the button over the speech.
            wait.until(lambda d: d.execute_script("return document.body.dataset.micSince"))
            since = float(driver.execute_script("return document.body.dataset.micSince"))
            now = float(driver.execute_script("return performance.now()"))
            early = (since + 1000 * (LEAD_S - PRESS_EARLY_S) - now) / 1000
            assert early > 0, f"the page took {-early:.1f} s too long to be ready"
            time.sleep(early)
            ptt = by_id(By.ID, "ptt")
            ActionChains(driver).click_and_hold(ptt).perform()
            shown: list[str] = []
            t_end = time.monotonic() + hold_s
            while time.monotonic() < t_end:
                text = by_id(By.ID, "partial").text
                if text and (not shown or shown[-1] != text):
                    shown.append(text)
                time.sleep(0.05)
            ActionChains(driver).release(ptt).perform()
            out["partials_shown"] = shown
            final = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#finals li"))[0]
            out["final"] = final.find_element(By.CSS_SELECTOR, ".text").text
            out["meta"] = final.find_element(By.CSS_SELECTOR, ".meta").text
            out["audio_s"] = float(final.get_attribute("data-audio-s"))
            out["held_s"] = int(final.get_attribute("data-held-ms")) / 1000
            # The microphone comes back: the banner goes (the page polls health), the
            # daemon's microphone can be chosen, and the button drives the daemon's gate.
            plug_in()
            wait.until(lambda d: not by_id(By.ID, "audio-banner").is_displayed()
                       and daemon_opt.get_attribute("disabled") is None)
            wait.until(lambda d: by_id(By.ID, "status").get_attribute("data-status") == "ok")
            Select(by_id(By.ID, "mic")).select_by_value("daemon")
            ActionChains(driver).click_and_hold(ptt).perform()
            wait.until(lambda d: by_id(By.ID, "gate").get_attribute("data-state") == "open")
            out["gate_held"] = by_id(By.ID, "gate").text
            ActionChains(driver).release(ptt).perform()
            wait.until(lambda d: by_id(By.ID, "gate").get_attribute("data-state") == "closed")
            out["log"] = by_id(By.ID, "events").text
            driver.save_screenshot(str(shot))
        finally:
            out["console"] = [e["message"] for e in driver.get_log("browser")
                              if e["level"] == "SEVERE"]
            driver.quit()
    return out


@contextlib.asynccontextmanager
async def running_daemon() -> AsyncIterator[tuple[Daemon, str]]:
    """The daemon with its API and ASR, on the pulse microphone; yields it and the page URL."""
    env = {"VOICE_AGENT__API__ENABLED": "true", "VOICE_AGENT__API__PORT": "0",
           "VOICE_AGENT__API__KEY": KEY, "VOICE_AGENT__GATE__MODE": "ptt",
           "VOICE_AGENT__AUDIO__SOURCE": "mic", "VOICE_AGENT__AUDIO__DEVICE": "pulse",
           "VOICE_AGENT__AUDIO__RETRY_INITIAL_S": "0.5", "VOICE_AGENT__AUDIO__RETRY_MAX_S": "1"}
    d = Daemon(load_config(None, env=env))
    api = next(s for s in d.services if isinstance(s, ApiService))
    run = asyncio.ensure_future(d.run())
    try:
        await asyncio.wait_for(asyncio.gather(api.bound.wait(), d.ready.wait()), 60)
        yield d, f"http://127.0.0.1:{api.port}/?token={KEY}"
    finally:
        d.shutdown()
        assert await asyncio.wait_for(run, 30) == 0


async def test_kiosk_push_to_talk_and_the_daemons_audio_state(pulse: PulseServer,
                                                             tmp_path: Path) -> None:
    need_browser()
    need_shared()
    need_model()
    x, ref = clip(CLIP)
    mic = tmp_path / "mic.wav"
    sf.write(mic, np.concatenate([np.zeros(int(LEAD_S * 16000), np.float32), x,
                                  np.zeros(int(TAIL_S * 16000), np.float32)]), 16000,
             subtype="PCM_16")
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "kiosk_browser.png"
    hold_s = PRESS_EARLY_S + len(x) / 16000 + 0.5
    await asyncio.to_thread(unplug, pulse)
    plugged = False

    def plug_in() -> None:
        nonlocal plugged
        replug(pulse)
        plugged = True

    try:
        async with running_daemon() as (d, url):
            assert d.app.health().audio.state == "unavailable"
            # selenium blocks: it runs in a thread while this loop runs the daemon.
            out = await asyncio.wait_for(
                asyncio.to_thread(drive, url, mic, hold_s, shot, plug_in), 150)
            assert not d.gate.is_open and d.app.health().audio.state == "ok"
    finally:
        if not plugged:
            await asyncio.to_thread(replug, pulse)
    print(f"kiosk screenshot: {shot}; audio {out['audio_s']} s for a {out['held_s']} s hold; "
          f"partials shown: {out['partials_shown']}")
    assert out["console"] == [], out["console"]
    assert out["gate_before"] == "gate closed (ptt)"
    # The daemon's real audio state, with its reason, while the microphone was gone.
    assert "unavailable" in out["banner"] and "pulse" in out["banner"], out["banner"]
    assert out["daemon_mic_disabled"] and out["status_before"] == "degraded"
    # The browser's microphone: partials during the hold, then the final, of the right length.
    assert out["partials_shown"], "no partial was shown while the button was held"
    assert wer([ref], [out["final"]]) <= WER_BOUND, out
    assert abs(out["audio_s"] - out["held_s"]) <= AUDIO_TOL_S, (out["audio_s"], out["held_s"])
    assert "this device" in out["meta"] and "after release" in out["meta"]
    # Plugged back in: the button drove the daemon's own gate.
    assert out["gate_held"] == "gate open (ptt)"
    assert "state.changed" in out["log"] and "asr.final" in out["log"]
    assert shot.stat().st_size > 10_000
