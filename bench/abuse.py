"""Memory and time of a `voice-agent run` under bursts of expensive uploads.

Usage: python bench/abuse.py [--burst 10] [--out bench/results/abuse.json]
One daemon (its own process, real ASR model, a silent recording as the microphone); bursts
of `--burst` concurrent uploads of each kind below, one kind after another; its RSS sampled
every 20 ms. Reported per burst: RSS before (median of 1 s), peak during, after (median of
2 s, once the answers are in), the answers and their median time. The baseline is a normal
upload (a 3.5 s shared recording) timed in the same run, and the RSS before the first burst.

- `header-bomb`: 1 MB FLAC, 299 s of 384 kHz 8-channel silence (its header says so): 413.
- `stream-bomb`: the same with the header's length zeroed: decoded until the work bound, 413.
- `long-upload`: 30 s of 48 kHz stereo silence, accepted: decoded, then recognised: 200.

The bombs never reach a model: they are compared with the RSS before them (after a few
normal uploads). Long uploads are compared with the RSS after a warm-up burst of them: the
ONNX runtime's memory arenas grow once to the largest windows decoded at once and keep that
size (a high-water mark, not a leak: later bursts do not grow it); the warm-up itself is
reported with its peak.
Targets (issue 9): peak under 1 GB, back within 10 % of the baseline after each burst.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from tests.mosquitto import free_port  # noqa: E402

SPEECH = REPO.parent / "shared" / "data" / "asr-en" / "cards-005.wav"
TARGET_PEAK = 2**30
TARGET_AFTER = 1.10


def silence_flac(seconds: float, rate: int, channels: int) -> bytes:
    """FLAC of silence, written block by block."""
    buf = io.BytesIO()
    block = np.zeros((rate * 2, channels), np.int16)
    with sf.SoundFile(buf, "w", rate, channels, "PCM_16", format="FLAC") as f:
        left = int(seconds * rate)
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
    return buf.getvalue()


def unknown_length(flac: bytes) -> bytes:
    """STREAMINFO's total samples (and MD5) zeroed: the decoder cannot refuse on the header."""
    b = bytearray(flac)
    b[21] &= 0xF0
    b[22:42] = bytes(20)
    return bytes(b)


class Rss:
    """Samples a process's resident set size every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        """VmRSS in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.samples.append((time.monotonic(), self.now()))
            except OSError:
                return

    def between(self, t0: float, t1: float) -> list[int]:
        """Samples taken in [t0, t1]."""
        return [r for t, r in self.samples if t0 <= t <= t1]

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


async def upload(http: aiohttp.ClientSession, url: str, data: bytes,
                 ctype: str) -> tuple[int, float, str]:
    """POST one recording: (status, seconds, error code or text)."""
    t0 = time.monotonic()
    async with http.post(url, data=data, headers={"Content-Type": ctype}) as r:
        body = await r.json(content_type=None)
    what = body.get("error", {}).get("code") if "error" in body else body.get("text", "")
    return r.status, time.monotonic() - t0, str(what)


async def run(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    """The baseline, then one burst per kind."""
    url = f"http://127.0.0.1:{port}/api/asr/transcribe"
    rss = Rss(pid)
    print("making the uploads (299 s of 384 kHz 8-channel FLAC takes ~15 s) ...", flush=True)
    header = await asyncio.to_thread(silence_flac, 299, 384_000, 8)
    kinds = {"header-bomb": header, "stream-bomb": unknown_length(header),
             "long-upload": await asyncio.to_thread(silence_flac, 30, 48_000, 2)}
    out: dict[str, Any] = {"bursts": {}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(600)) as http:
        out["rss_start_mb"] = round(rss.now() / 2**20, 1)
        await asyncio.sleep(1.0)
        speech = SPEECH.read_bytes()
        times = [(await upload(http, url, speech, "audio/wav"))[1] for _ in range(5)]
        out["baseline"] = {"upload": SPEECH.name, "median_s": round(statistics.median(times), 3)}
        await asyncio.sleep(2.0)
        baseline = statistics.median(rss.between(time.monotonic() - 1.0, time.monotonic()))
        out["rss_baseline_mb"] = round(baseline / 2**20, 1)
        order = ["header-bomb", "stream-bomb", "warm-up", "long-upload"]
        for kind in order:
            data = kinds["long-upload" if kind == "warm-up" else kind]
            t0 = time.monotonic()
            before = statistics.median(rss.between(t0 - 1.0, t0))
            answers = await asyncio.gather(*(upload(http, url, data, "audio/flac")
                                             for _ in range(args.burst)))
            t1 = time.monotonic()
            await asyncio.sleep(3.0)
            after = statistics.median(rss.between(t1 + 1.0, t1 + 3.0))
            peak = max(rss.between(t0, t1 + 3.0))
            row = {"size_kb": round(len(data) / 1024, 1),
                   "statuses": sorted({a[0] for a in answers}),
                   "answers": sorted({a[2] for a in answers}),
                   "median_s": round(statistics.median(a[1] for a in answers), 3),
                   "max_s": round(max(a[1] for a in answers), 3),
                   "rss_before_mb": round(before / 2**20, 1),
                   "rss_peak_mb": round(peak / 2**20, 1),
                   "rss_after_mb": round(after / 2**20, 1),
                   "after_vs_baseline": round(after / baseline, 3),
                   "peak_ok": peak < TARGET_PEAK,
                   # The warm-up sets the baseline for what follows (see the docstring).
                   "after_ok": kind == "warm-up" or after <= TARGET_AFTER * baseline}
            if kind == "warm-up":
                baseline = after
                out["rss_warm_baseline_mb"] = round(after / 2**20, 1)
            out["bursts"][kind] = row
            print(f"{kind:13s} {row['statuses']} {row['answers']}: median {row['median_s']} s, "
                  f"RSS {row['rss_before_mb']} -> peak {row['rss_peak_mb']} -> "
                  f"{row['rss_after_mb']} MB ({row['after_vs_baseline']}x baseline)",
                  flush=True)
    rss.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "abuse.json")
    args = ap.parse_args()
    if not SPEECH.exists():
        raise SystemExit(f"shared speech not found: {SPEECH}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    wav = tmp / "silence.wav"
    sf.write(wav, np.zeros(20 * 60 * 16000, np.int16), 16000)  # outlasts the bench
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT__")}
    env.update({"VOICE_AGENT__API__PORT": str(port), "VOICE_AGENT__MQTT__ENABLED": "false",
                "VOICE_AGENT__ASR__PARTIALS": "false", "VOICE_AGENT__STATE_DIR": str(tmp)})
    log = (tmp / "daemon.log").open("wb")
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--source", f"file:{wav}",
                          "--realtime"], env=env, cwd=REPO, stdout=log,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while b"kiosk and API at" not in (tmp / "daemon.log").read_bytes():
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((tmp / "daemon.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        result = asyncio.run(run(args, port, p.pid))
    finally:
        p.terminate()
        p.wait(30)
        wav.unlink()
    result.update(burst=args.burst, machine=platform.machine(), cpus=os.cpu_count(),
                  targets={"peak_mb": TARGET_PEAK / 2**20, "after_vs_baseline": TARGET_AFTER})
    ok = all(b["peak_ok"] and b["after_ok"] for b in result["bursts"].values())
    result["targets_met"] = ok
    write_report(args.out, result)
    print(f"baseline upload {result['baseline']['median_s']} s; RSS at start "
          f"{result['rss_start_mb']} MB, baseline {result['rss_baseline_mb']} MB, after the "
          f"warm-up {result['rss_warm_baseline_mb']} MB; targets {'met' if ok else 'MISSED'}; "
          f"-> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
