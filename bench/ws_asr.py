"""Benchmark /ws/asr under load: N clients stream shared speech in real time to one daemon.

Usage: python bench/ws_asr.py [--clients 1,4,8,16,24,32] [--utterances 3] [--min-total 12]
                              [--variants default,no-reuse,no-partials] [--target-ms 500]
                              [--out bench/results/ws_asr.json]
Each variant is the real `voice-agent run` (whisper-tiny.en-int8, 2 ASR threads, 2 final-decode
workers) in its own process, so its CPU use is its own; api.max_asr_sessions is raised past
the largest N. Variants: `default` (partials, and a partial that heard all the speech is the
final), `no-reuse` (every final a full decode), `no-partials`. For each N, every client opens
one /ws/asr session after a random 0-2 s stagger, and for each of its utterances sends
`start`, a shared clip in 100 ms binary frames paced at real time, 0.3 s of silence (the user
lets go of the button a moment after speaking), `stop`, and waits for the final. Latency is
stop sent -> final received, at the client. The variants run one after another at each N
(the machine's noise hits them alike); N = 1 is each variant's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.asr.wer import wer  # noqa: E402
from bench.report import write_report  # noqa: E402

SPEECH = REPO.parent / "shared" / "data" / "asr-en"
FRAME_S = 0.1
RELEASE_S = 0.3  # silence after the speech, before stop
STAGGER_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def load_clips() -> list[dict[str, Any]]:
    """Every shared clip as 16 kHz s16le bytes, with its reference."""
    tsv = SPEECH / "transcripts.tsv"
    if not tsv.exists():
        raise SystemExit(f"no speech found in {SPEECH}")
    with tsv.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    clips = []
    for row in rows:
        x, sr = sf.read(SPEECH / row["file"], dtype="int16")
        assert sr == 16000 and x.ndim == 1, row["file"]
        x = np.concatenate([x, np.zeros(int(RELEASE_S * sr), np.int16)])
        clips.append({"file": row["file"], "ref": row["reference"], "pcm": x.astype("<i2")})
    return clips


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def spawn_daemon(port: int, max_sessions: int, partials: bool,
                 from_partial: bool) -> subprocess.Popen[bytes]:
    """`voice-agent run` with the API on `port`."""
    env = {**os.environ, "VOICE_AGENT__API__ENABLED": "true",
           "VOICE_AGENT__API__PORT": str(port),
           "VOICE_AGENT__API__MAX_ASR_SESSIONS": str(max_sessions),
           "VOICE_AGENT__API__ASR_PARTIALS": "true" if partials else "false",
           "VOICE_AGENT__API__ASR_FINAL_FROM_PARTIAL": "true" if from_partial else "false",
           "VOICE_AGENT__LOG_LEVEL": "warning"}
    # stdin source with nothing written: the daemon's own capture stays idle.
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "--source", "stdin"],
                            stdin=subprocess.PIPE, env=env, cwd=REPO)


async def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until /api/health says ok with an ASR model loaded."""
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited with {proc.returncode}")
            try:
                async with http.get(f"http://127.0.0.1:{port}/api/health") as r:
                    body = await r.json()
                    if body["status"] == "ok" and body["models"]["asr"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise SystemExit("daemon did not become ready in 60 s")


async def client(url: str, idx: int, clips: list[dict[str, Any]], utterances: int,
                 seed: int, out: list[dict[str, Any]]) -> None:
    """One kiosk: a /ws/asr session, `utterances` clips streamed in real time."""
    rnd = random.Random(seed * 1000 + idx)
    await asyncio.sleep(rnd.uniform(0, STAGGER_S))
    n = int(16000 * FRAME_S)
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        first = await ws.receive_json(timeout=30)
        if first.get("type") == "error":
            out.append({"client": idx, "error": first["code"]})
            return
        for u in range(utterances):
            clip = clips[(idx * 3 + u) % len(clips)]
            pcm = clip["pcm"]
            await ws.send_json({"type": "control", "command": "start"})
            t0 = time.monotonic()
            for i, at in enumerate(range(0, len(pcm), n)):
                await ws.send_bytes(pcm[at:at + n].tobytes())
                # Real time from the utterance's start, so slow sends do not drift.
                await asyncio.sleep(max(0.0, t0 + (i + 1) * FRAME_S - time.monotonic()))
            await ws.send_json({"type": "control", "command": "stop"})
            t_stop = time.monotonic()
            partials = 0
            while True:
                msg = await ws.receive_json(timeout=60)
                if msg.get("type") == "result" and msg["mode"] == "partial":
                    partials += 1
                elif msg.get("type") == "result" and msg["mode"] == "final":
                    break
                elif msg.get("type") == "error":
                    raise RuntimeError(f"client {idx}: {msg}")
            out.append({"client": idx, "file": clip["file"], "ref": clip["ref"],
                        "text": msg["text"], "latency_ms": 1000 * (time.monotonic() - t_stop),
                        "server_ms": msg["latency_ms"], "decode_ms": msg["processing_time_ms"],
                        "partials": partials, "audio_s": msg["audio_s"],
                        "from_partial": msg.get("from_partial", False)})
            await asyncio.sleep(rnd.uniform(0.2, 1.0))


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def run_level(port: int, pid: int, n: int, clips: list[dict[str, Any]], utterances: int,
                    seed: int) -> dict[str, Any]:
    """N concurrent clients; latency percentiles, CPU, accuracy."""
    url = f"http://127.0.0.1:{port}/ws/asr"
    out: list[dict[str, Any]] = []
    cpu0, me0, t0 = proc_cpu_s(pid), self_cpu_s(), time.monotonic()
    await asyncio.gather(*(client(url, i, clips, utterances, seed, out) for i in range(n)))
    wall = time.monotonic() - t0
    cpu = proc_cpu_s(pid) - cpu0
    me = self_cpu_s() - me0
    done = [r for r in out if "error" not in r]
    lat = [r["latency_ms"] for r in done]
    return {
        "clients": n, "utterances": len(done), "rejected": len(out) - len(done),
        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "max_ms": pct(lat, 100),
        "server_p50_ms": pct([r["server_ms"] for r in done], 50),
        "decode_p50_ms": pct([r["decode_ms"] for r in done], 50),
        "partials_per_utt": round(sum(r["partials"] for r in done) / max(len(done), 1), 2),
        "from_partial_pct": round(100 * sum(r["from_partial"] for r in done)
                                  / max(len(done), 1), 1),
        "wer": round(wer([r["ref"] for r in done], [r["text"] for r in done]), 4),
        "wall_s": round(wall, 1),
        "audio_s": round(sum(r["audio_s"] for r in done), 1),
        "server_cpu_pct": round(100 * cpu / wall, 1),  # 100 = one core busy
        "client_cpu_pct": round(100 * me / wall, 1),
    }


VARIANTS = {
    # The shipped defaults.
    "default": {"partials": True, "final_from_partial": True},
    # Every final is a full decode (partials still stream).
    "no-reuse": {"partials": True, "final_from_partial": False},
    # No partials at all: the cost of the final decode alone.
    "no-partials": {"partials": False, "final_from_partial": False},
}


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


async def main_async(args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    """Every level with every variant, one daemon per variant, interleaved (same noise)."""
    clips = load_clips()
    levels = [int(v) for v in args.clients.split(",")]
    daemons: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    try:
        for name in variants:
            port = free_port()
            v = VARIANTS[name]
            daemons[name] = (port, spawn_daemon(port, max(levels) + 1, v["partials"],
                                                v["final_from_partial"]))
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for port, proc in daemons.values():
            await wait_ready(port, proc)
            # Warm-up: first decodes allocate; not counted.
            await run_level(port, proc.pid, 1, clips, 1, seed=999)
        for n in levels:
            for name, (port, proc) in daemons.items():
                # At least --min-total utterances per level: percentiles need samples.
                per_client = max(args.utterances, -(-args.min_total // n))
                r = await run_level(port, proc.pid, n, clips, per_client, seed=n)
                results[name].append(r)
                print(f"  N={n:2d} {name:12s} p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, "
                      f"server CPU {r['server_cpu_pct']} %", flush=True)
    finally:
        for _, proc in daemons.values():
            stop_daemon(proc)
    return {"variants": {name: {"config": VARIANTS[name], "levels": results[name]}
                         for name in variants}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,4,8,16,24,32")
    ap.add_argument("--utterances", type=int, default=3, help="per client and level")
    ap.add_argument("--min-total", type=int, default=12,
                    help="utterances per level at least (small N: more per client)")
    ap.add_argument("--variants", default="default,no-reuse,no-partials",
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--target-ms", type=float, default=500.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ws_asr.json")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(sorted(unknown))}")
    print(f"/ws/asr load: clients {args.clients}, {args.utterances} utterances each, "
          f"variants {', '.join(variants)}, {os.cpu_count()} CPUs")
    report = asyncio.run(main_async(args, variants))
    for name, rep in report["variants"].items():
        levels = rep["levels"]
        base = levels[0]["p95_ms"] or 1.0
        for r in levels:
            r["p95_vs_n1"] = round((r["p95_ms"] or 0) / base, 2)
        ok = [r["clients"] for r in levels if r["p95_ms"] is not None
              and r["p95_ms"] <= args.target_ms and not r["rejected"]]
        rep["largest_n_within_target"] = max(ok) if ok else None
        print(f"\n{name} ({', '.join(f'{k}={v}' for k, v in rep['config'].items())})")
        print(f"{'N':>3s} {'utts':>5s} {'p50 ms':>7s} {'p95 ms':>7s} {'max ms':>7s} "
              f"{'p95/N1':>7s} {'reused':>7s} {'partials':>8s} {'WER':>6s} "
              f"{'server CPU':>10s} {'client CPU':>10s}")
        for r in levels:
            print(f"{r['clients']:3d} {r['utterances']:5d} {r['p50_ms']:7.0f} "
                  f"{r['p95_ms']:7.0f} {r['max_ms']:7.0f} {r['p95_vs_n1']:6.1f}x "
                  f"{r['from_partial_pct']:6.0f}% {r['partials_per_utt']:8.1f} "
                  f"{r['wer']:6.3f} {r['server_cpu_pct']:9.0f}% {r['client_cpu_pct']:9.0f}%")
        print(f"largest N with p95 <= {args.target_ms:.0f} ms: "
              f"{rep['largest_n_within_target']}")
    report.update({
        "bench": "ws_asr", "model": "whisper-tiny.en-int8",
        "utterances_per_client": args.utterances, "target_p95_ms": args.target_ms,
        "machine": platform.machine(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "loadavg_after": os.getloadavg(),
    })
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
