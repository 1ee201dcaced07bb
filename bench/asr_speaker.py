"""`python bench/asr.py --speaker-compare N`: the ASR final's latency with the speaker analyser
off and on, and when each utterance's speaker is known.

The shared asr-en clips are streamed in real time through the real daemon (bench/asr.py's
workers, one process per run), N times each with speaker recognition off and on, alternating
(off first, then on first, so that drift in the machine's load falls on both), in ptt and in
vad mode; emotion is off in both so that only the speaker analyser differs. Reported per
mode, pooled over runs: release (ptt) or VAD end (vad) -> asr.final p50/p95, the final's own
decode time, and what it waited beyond it; with the speaker on, `speaker.identified` after
the utterance's end and after its final (negative: before the final). Ratios on/off are
of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.asr import (  # noqa: E402
    build_stream,
    fmt,
    load_clips,
    machine_info,
    pct,
    run_worker,
)
from bench.report import write_report  # noqa: E402

MODES = ("ptt", "vad")
OUT = REPO / "bench" / "results" / "asr_speaker.json"


def summary(mode: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled latencies of one (mode, speaker on/off) configuration."""
    key = "release_to_final_ms" if mode == "ptt" else "eos_to_final_ms"
    clips = [c for r in rs for c in r["per_clip"] if key in c]
    lat = [c[key] for c in clips]
    dec = [c["decode_ms"] for c in clips if "decode_ms" in c]
    beyond = [c[key] - c["decode_ms"] for c in clips if "decode_ms" in c]
    after_end = [x for r in rs for x in r.get("speaker_after_end_ms", [])]
    after_final = [x for r in rs for x in r.get("speaker_after_final_ms", [])]
    return {"runs": len(rs), "finals": len(lat), "latency": key,
            "final_p50_ms": pct(lat, 50), "final_p95_ms": pct(lat, 95),
            "decode_p50_ms": pct(dec, 50), "beyond_decode_p50_ms": pct(beyond, 50),
            "beyond_decode_p95_ms": pct(beyond, 95),
            "per_run_p50_ms": [r[f"{key.removesuffix('_ms')}_p50_ms"] for r in rs],
            "speaker_model": rs[0]["speaker_model"],
            "speaker_events": [r["speaker_events"] for r in rs],
            "utterances": [r["utterances"] for r in rs],
            "speaker_after_end_p50_ms": pct(after_end, 50),
            "speaker_after_end_p95_ms": pct(after_end, 95),
            "speaker_after_final_p50_ms": pct(after_final, 50),
            "speaker_after_final_p95_ms": pct(after_final, 95),
            "speaker_before_final": sum(x <= 0 for x in after_final),
            "wer": [r["wer"] for r in rs], "cpu_pct": [r["cpu_pct"] for r in rs],
            "others_cpu_pct": [r["others_cpu_pct"] for r in rs]}


def speaker_compare(model: str, args: argparse.Namespace) -> int:
    """Run the comparison, print it, write the JSON report."""
    n = args.speaker_compare
    clips = load_clips(args.quick)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, s): [] for m in MODES
                                                          for s in ("off", "on")}
    t_start, load0 = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="asr-speaker-bench-") as tmp:
        stream = Path(tmp) / "joined.wav"
        build_stream(clips, stream)
        audio_s = json.loads(stream.with_suffix(".json").read_text())["audio_s"]
        for i in range(n):
            for mode in MODES:
                for spk in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    print(f"{mode} {model} speaker {spk} ({i + 1}/{n}) ...", file=sys.stderr)
                    runs[(mode, spk)].append(run_worker(model, mode, stream, audio_s,
                                                        emotion="off", speaker=spk))
    res = {mode: {spk: summary(mode, runs[(mode, spk)]) for spk in ("off", "on")}
           for mode in MODES}

    def ratio(mode: str, key: str) -> float | None:
        a, b = res[mode]["on"][key], res[mode]["off"][key]
        return round(a / b, 3) if a and b else None

    on_vs_off = {mode: {k: ratio(mode, k) for k in ("final_p50_ms", "final_p95_ms",
                                                    "decode_p50_ms", "beyond_decode_p50_ms")}
                 for mode in MODES}
    report = {"bench": "asr_speaker", "model": model, "clips": len(clips), "quick": args.quick,
              "rounds": n, "stream_s": audio_s, "machine": machine_info(),
              "loadavg_start": load0, "loadavg_end": os.getloadavg(), "results": res,
              "on_vs_off": on_vs_off, "bench_wall_s": round(time.monotonic() - t_start, 1),
              "notes": "finals pooled over runs; ptt: release -> asr.final, vad: VAD end -> "
                       "asr.final; on_vs_off = speaker on / off, measured alternately in this "
                       "run; emotion off in both"}
    out = args.out if args.out != REPO / "bench" / "results" / "asr.json" else OUT
    write_report(out, report)
    print(f"ASR final latency, {model}, {len(clips)} clips x {n} runs per configuration "
          "(ms, p50/p95 pooled over finals)")
    for mode in MODES:
        for spk in ("off", "on"):
            r = res[mode][spk]
            line = (f"  {mode} speaker {spk:3s} final {fmt(r['final_p50_ms'])}/"
                    f"{fmt(r['final_p95_ms'])}  decode p50 {fmt(r['decode_p50_ms'])}  beyond "
                    f"decode {fmt(r['beyond_decode_p50_ms'], '.1f')}/"
                    f"{fmt(r['beyond_decode_p95_ms'], '.1f')}  others CPU % "
                    f"{r['others_cpu_pct']}")
            if spk == "on":
                line += (f"\n      speaker events {r['speaker_events']} for utterances "
                         f"{r['utterances']}; after the utterance's end "
                         f"{fmt(r['speaker_after_end_p50_ms'])}/"
                         f"{fmt(r['speaker_after_end_p95_ms'])}, after its final "
                         f"{fmt(r['speaker_after_final_p50_ms'])}/"
                         f"{fmt(r['speaker_after_final_p95_ms'])} "
                         f"({r['speaker_before_final']} before the final)")
            print(line)
        print(f"  {mode} on / off: " + ", ".join(f"{k} {fmt(v, '.3f')}x"
                                                for k, v in on_vs_off[mode].items()))
    print(f"wrote {out}")
    return 0
