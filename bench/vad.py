"""Benchmark the VAD backends on the shared English speech: real-time factor and frames/s.

Usage: python bench/vad.py [--repeat 5] [--out bench/results/vad.json]
Each backend decides every frame of every ../shared/data/asr-en clip, `--repeat` times; we
report the median run. webrtc is the baseline the others are compared against.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.config import SileroVadConfig, WebrtcVadConfig  # noqa: E402
from agent.vad.base import Vad  # noqa: E402
from agent.vad.factory import make_vad  # noqa: E402
from bench.report import write_report  # noqa: E402

SPEECH = REPO.parent / "shared" / "data" / "asr-en"


def load_speech() -> list[np.ndarray]:
    """Every shared English clip as 16 kHz int16."""
    clips = []
    for p in sorted(SPEECH.glob("*.wav")):
        x, sr = sf.read(p, dtype="int16")
        assert sr == 16000, p
        clips.append(x)
    if not clips:
        raise SystemExit(f"no speech found in {SPEECH}")
    return clips


def run_once(vad: Vad, clips: list[np.ndarray]) -> tuple[float, int, int]:
    """Seconds spent, frames decided, speech frames."""
    n = vad.frame_samples
    frames = [c[i * n:(i + 1) * n] for c in clips for i in range(len(c) // n)]
    vad.reset()
    t0 = time.perf_counter()
    decisions = vad.process(frames)
    return time.perf_counter() - t0, len(frames), sum(decisions)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vad.json")
    args = ap.parse_args()
    clips = load_speech()
    audio_s = sum(len(c) for c in clips) / 16000
    backends = {"webrtc": WebrtcVadConfig(), "silero": SileroVadConfig()}
    results = {}
    for name, cfg in backends.items():
        vad = make_vad(cfg)
        run_once(vad, clips)  # warm-up (allocations, ONNX graph init)
        runs = [run_once(vad, clips) for _ in range(args.repeat)]
        secs = statistics.median(r[0] for r in runs)
        frames, speech = runs[0][1], runs[0][2]
        results[name] = {
            "frame_ms": vad.frame_ms,
            "frames": frames,
            "speech_fraction": round(speech / frames, 3),
            "median_s": round(secs, 5),
            "rtf": round(secs / audio_s, 6),
            "x_realtime": round(audio_s / secs, 1),
            "frames_per_s": round(frames / secs),
            "us_per_frame": round(1e6 * secs / frames, 2),
        }
    base = results["webrtc"]["rtf"]
    for r in results.values():
        r["rtf_vs_webrtc"] = round(r["rtf"] / base, 2)
    report = {
        "bench": "vad", "audio_s": round(audio_s, 2), "clips": len(clips),
        "repeat": args.repeat, "machine": platform.machine(), "python": platform.python_version(),
        "cpus": __import__("os").cpu_count(), "results": results,
    }
    print(f"VAD on {len(clips)} clips, {audio_s:.1f} s of speech, median of {args.repeat} runs")
    print(f"{'backend':8s} {'frame':>6s} {'RTF':>10s} {'x realtime':>11s} {'frames/s':>10s} "
          f"{'us/frame':>9s} {'vs webrtc':>10s}")
    for name, r in results.items():
        print(f"{name:8s} {r['frame_ms']:5.0f}ms {r['rtf']:10.6f} {r['x_realtime']:11.0f} "
              f"{r['frames_per_s']:10d} {r['us_per_frame']:9.1f} {r['rtf_vs_webrtc']:9.1f}x")
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
