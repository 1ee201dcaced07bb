"""The kiosk page in headless Chromium: a WAV as the browser microphone -> /ws/asr -> the page."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from agent.asr.base import AsrEngine
from agent.asr.wer import wer

from .conftest import REPO
from .test_api import KEY, WER_BOUND, clip, engine, make_daemon, serve  # noqa: F401 (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
OUTPUT = REPO / "test-output"
CLIP = "cards-005.wav"
LEAD_S, TAIL_S = 0.5, 1.0  # silence around the speech in the fake microphone's file
WAIT_S = 30.0


def need_browser() -> None:
    """Skip with the reason when Chromium, its driver or selenium is missing."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver "
                    "(.ci/setup does)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium not installed (pip install -e .[dev])")


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


def drive(url: str, mic_wav: Path, hold_s: float, shot: Path) -> dict[str, Any]:
    """Open the kiosk, hold push-to-talk over the speech, and read what the page shows."""
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
            wait.until(lambda d: "on" in d.find_element(By.ID, "conn").get_attribute("class"))
            wait.until(lambda d: d.find_element(By.ID, "gate").get_attribute("data-state"))
            out["gate_before"] = driver.find_element(By.ID, "gate").text
            ptt = driver.find_element(By.ID, "ptt")
            # Browser microphone: hold the button for the whole recording.
            ActionChains(driver).click_and_hold(ptt).perform()
            time.sleep(hold_s)
            ActionChains(driver).release(ptt).perform()
            final = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#finals li .text"))
            out["final"] = final[0].text
            out["meta"] = driver.find_element(By.CSS_SELECTOR, "#finals li .meta").text
            # The daemon's microphone: the same button drives the daemon's gate.
            Select(driver.find_element(By.ID, "mic")).select_by_value("daemon")
            ActionChains(driver).click_and_hold(ptt).perform()
            wait.until(lambda d: d.find_element(By.ID, "gate").get_attribute("data-state")
                       == "open")
            out["gate_held"] = driver.find_element(By.ID, "gate").text
            ActionChains(driver).release(ptt).perform()
            wait.until(lambda d: d.find_element(By.ID, "gate").get_attribute("data-state")
                       == "closed")
            out["log"] = driver.find_element(By.ID, "events").text
            driver.save_screenshot(str(shot))
        finally:
            out["console"] = [e["message"] for e in driver.get_log("browser")
                              if e["level"] == "SEVERE"]
            driver.quit()
    return out


async def test_kiosk_push_to_talk_shows_the_final_text(engine: AsrEngine,  # noqa: F811
                                                      tmp_path: Path) -> None:
    need_browser()
    x, ref = clip(CLIP)
    mic = tmp_path / "mic.wav"
    sf.write(mic, np.concatenate([np.zeros(int(LEAD_S * 16000), np.float32), x,
                                  np.zeros(int(TAIL_S * 16000), np.float32)]), 16000,
             subtype="PCM_16")
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "kiosk_browser.png"
    d = make_daemon(engine, api__key=KEY)
    async with serve(d) as client:
        url = f"{client.make_url('/')}?token={KEY}"
        hold_s = LEAD_S + len(x) / 16000 + 0.5
        # selenium blocks: it runs in a thread while this loop serves the page.
        out = await asyncio.wait_for(asyncio.to_thread(drive, url, mic, hold_s, shot), 110)
        stats = await (await client.get("/api/stats", headers={"X-API-Key": KEY})).json()
    print(f"kiosk screenshot: {shot}")
    assert out["console"] == [], out["console"]
    assert out["gate_before"] == "gate closed (ptt)"
    assert out["gate_held"] == "gate open (ptt)" and not d.gate.is_open
    assert wer([ref], [out["final"]]) <= WER_BOUND, out
    assert "this device" in out["meta"] and "after release" in out["meta"]
    assert "asr.final" in out["log"] and "state.changed" in out["log"]
    # The browser's audio went over /ws/asr as one session, at the right length.
    assert stats["latency_ms"]["ws_asr_final"]["count"] == 1
    assert shot.stat().st_size > 10_000
