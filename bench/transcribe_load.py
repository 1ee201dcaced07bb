"""Benchmark HTTP transcribe under concurrent uploads: the daemon stays responsive, nothing 5xx.

Usage: python bench/transcribe_load.py [--uploads 20] [--rounds 3] [--out PATH]
One `voice-agent run` (own process, idle stdin source, API on a free port). Each round sends
`--uploads` shared recordings at once to `POST /api/asr/transcribe` while a prober asks
`GET /api/health` every 50 ms. Reported: health latency p50/p95/max during the bursts against
an idle baseline measured in the same run, every upload's status (no 5xx is the target, and
no 503: the queue must hold them), upload latency, and the daemon's RSS.
Targets (issue 8): health p95 < 50 ms under 20 concurrent uploads; no 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from bench.ws_asr import free_port, proc_cpu_s  # noqa: E402

SPEECH = REPO.parent / "shared" / "data" / "asr-en"
PROBE_S = 0.05


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(900):
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited with {proc.returncode}")
            try:
                async with http.get(f"{base}/api/health") as r:
                    body = await r.json()
                    if body["ready"] and body["models"]["asr"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("daemon did not become ready")


async def probe(http: aiohttp.ClientSession, base: str, stop: asyncio.Event,
                out: list[float]) -> None:
    """Health latency every PROBE_S until stopped."""
    while not stop.is_set():
        t = time.perf_counter()
        async with http.get(f"{base}/api/health") as r:
            await r.read()
        out.append(1000 * (time.perf_counter() - t))
        try:
            await asyncio.wait_for(stop.wait(), PROBE_S)
        except TimeoutError:
            pass


async def upload(http: aiohttp.ClientSession, base: str, data: bytes) -> tuple[int, float]:
    t = time.perf_counter()
    form = aiohttp.FormData()
    form.add_field("file", data, filename="clip.wav", content_type="audio/wav")
    async with http.post(f"{base}/api/asr/transcribe", data=form) as r:
        await r.read()
        return r.status, 1000 * (time.perf_counter() - t)


async def run(args: argparse.Namespace, proc: subprocess.Popen[bytes], base: str,
              clips: list[bytes]) -> dict[str, Any]:
    try:
        await wait_ready(base, proc)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            idle: list[float] = []
            stop = asyncio.Event()
            task = asyncio.create_task(probe(http, base, stop, idle))
            await asyncio.sleep(3.0)
            stop.set()
            await task
            rss0 = rss_mb(proc.pid)
            rounds: list[dict[str, Any]] = []
            for i in range(args.rounds):
                busy: list[float] = []
                stop = asyncio.Event()
                task = asyncio.create_task(probe(http, base, stop, busy))
                cpu0, t0 = proc_cpu_s(proc.pid), time.monotonic()
                batch = [clips[(i * args.uploads + k) % len(clips)] for k in range(args.uploads)]
                results = await asyncio.gather(*(upload(http, base, d) for d in batch))
                wall = time.monotonic() - t0
                stop.set()
                await task
                statuses: dict[str, int] = {}
                for status, _ in results:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                lat = [ms for _, ms in results]
                rounds.append({
                    "health_ms": {"p50": pct(busy, 50), "p95": pct(busy, 95),
                                  "max": round(max(busy), 1), "n": len(busy)},
                    "statuses": statuses, "upload_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95),
                                                        "max": round(max(lat), 1)},
                    "wall_s": round(wall, 2),
                    "cpu_pct": round(100 * (proc_cpu_s(proc.pid) - cpu0) / wall, 1),
                    "rss_mb": rss_mb(proc.pid)})
                print(f"round {i + 1}: health p95 {rounds[-1]['health_ms']['p95']} ms, "
                      f"statuses {statuses}, uploads p50 {rounds[-1]['upload_ms']['p50']} ms",
                      file=sys.stderr)
            await asyncio.sleep(2.0)
            rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(20)
    p95s = [r["health_ms"]["p95"] for r in rounds]
    five = sum(v for r in rounds for k, v in r["statuses"].items() if k.startswith("5"))
    return {"bench": "transcribe_load", "uploads": args.uploads, "rounds": rounds,
            "idle_health_ms": {"p50": pct(idle, 50), "p95": pct(idle, 95)},
            "health_p95_ms_median": round(statistics.median(p95s), 1),
            "health_p95_vs_idle": round(statistics.median(p95s) / (pct(idle, 95) or 1), 1),
            "responses_5xx": five, "rss_mb": {"before": rss0, "after": rss_after},
            "loadavg": os.getloadavg(),
            "targets": {"health_p95_ms": 50, "responses_5xx": 0},
            "verdict": "PASS" if statistics.median(p95s) < 50 and five == 0 else "FAIL"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uploads", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--state-dir", default="/tmp/voice-agent-bench-state")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results"
                    / "transcribe_load.json")
    args = ap.parse_args()
    clips = [p.read_bytes() for p in sorted(SPEECH.glob("*.wav"))]
    if not clips:
        raise SystemExit(f"no speech in {SPEECH}")
    port = free_port()
    env = {**os.environ, "VOICE_AGENT__API__PORT": str(port), "VOICE_AGENT__LOG_LEVEL":
           "warning", "VOICE_AGENT__STATE_DIR": str(Path(args.state_dir).resolve())}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--source", "stdin"],
                            stdin=subprocess.PIPE, env=env, cwd=REPO)
    report = asyncio.run(run(args, proc, f"http://127.0.0.1:{port}", clips))
    write_report(args.out, report)
    print(f"health p95 under {args.uploads} concurrent uploads: median "
          f"{report['health_p95_ms_median']} ms (idle p95 {report['idle_health_ms']['p95']} "
          f"ms); 5xx: {report['responses_5xx']}; RSS {report['rss_mb']} -> {report['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
