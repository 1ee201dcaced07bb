"""Benchmark the container image: build time (cold and cached), size, start -> health ok.

Usage: sudo python bench/container.py [--runs 5] [--cold] [--out bench/results/container.json]

The image is built from a clone of HEAD (the container recipe taken from the working tree
where HEAD lacks it) with container/build.sh, as tests/test_container.py does:
- `build_cached_s`: a rebuild with the layer cache (nothing changed: what every rebuild costs
  at least); with `--cold`, also `build_cold_s`: `--no-cache` (every layer, the torch install
  and the model conversion included; the Debian base image is not remade).
- `size_mb`: the image as buildah reports it.
Then `--runs` times, each in a fresh container (`buildah run --isolation chroot`):
- `health_s`: spawn -> the first /api/health with status ok (models loaded, API bound);
- `first_transcribe_ms`: the first POST /api/asr/transcribe of a 3.5 s shared recording;
- baseline, same run: `voice-agent --version` in a fresh container (buildah's start, the
  interpreter and the CLI import), so that the ratio says how much of the start is ours.
Medians are reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402
from tests import buildah  # noqa: E402
from tests.mosquitto import free_port  # noqa: E402

TAG = "localhost/voice-agent:bench"
AUDIO = REPO.parent / "shared" / "data" / "asr-en" / "cards-005.wav"


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def one_start(work: Path, i: int) -> dict[str, float]:
    """One fresh container: spawn -> health serving, then the first transcription."""
    data = work / f"data-{i}"
    data.mkdir()
    os.chown(data, 1000, 1000)  # the image's user
    port = free_port()
    ctr = buildah.Container(TAG)
    try:
        t0 = time.monotonic()
        running = ctr.start(["/usr/bin/tini", "-s", "--", "/opt/voice-agent/entrypoint.sh"],
                            work / f"run-{i}.log", env={"VOICE_AGENT__API__PORT": str(port)},
                            volumes=[f"{data}:/data"])
        try:
            buildah.wait_health(port, running, within=120)
            health = time.monotonic() - t0
            t1 = time.monotonic()
            status, body = buildah.post_file(f"http://127.0.0.1:{port}/api/asr/transcribe",
                                             AUDIO)
            first = (time.monotonic() - t1) * 1000
            if status != 200:
                raise SystemExit(f"transcribe failed: {status} {body}")
        finally:
            running.stop()
        t2 = time.monotonic()
        r = ctr.run(["voice-agent", "--version"])
        version = time.monotonic() - t2
        if r.returncode != 0:
            raise SystemExit(f"voice-agent --version failed: {r.stderr}")
    finally:
        ctr.remove()
    return {"health_s": health, "first_transcribe_ms": first, "version_s": version}


def main() -> int:
    """Build, measure, print, write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cold", action="store_true", help="also time a --no-cache build")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "container.json")
    args = p.parse_args()
    if reason := buildah.missing_requirements():
        raise SystemExit(f"cannot benchmark: {reason}")
    if not AUDIO.is_file():
        raise SystemExit(f"shared recording not found: {AUDIO}")

    with tempfile.TemporaryDirectory(prefix="bench-container-") as tmp:
        work = Path(tmp)
        clone = work / "voice-agent"
        added = buildah.clone_head(clone)
        report: dict[str, Any] = {"machine": platform.machine(), "runs": args.runs,
                                  "recipe_from_worktree": added}
        if args.cold:
            report["build_cold_s"] = round(
                buildah.build(clone, TAG, work / "cold.log", ["--no-cache"]), 1)
        else:
            buildah.build(clone, TAG, work / "warm.log")  # so the next one is all cache hits
        report["build_cached_s"] = round(buildah.build(clone, TAG, work / "cached.log"), 1)
        report["size_mb"] = round(buildah.image_size(TAG) / 1e6, 1)
        runs = [one_start(work, i) for i in range(args.runs)]

    for key in ("health_s", "first_transcribe_ms", "version_s"):
        report[key] = _median([r[key] for r in runs])
        report[f"{key}_all"] = [round(r[key], 3) for r in runs]
    report["health_vs_version"] = round(report["health_s"] / report["version_s"], 2)
    if "build_cold_s" in report:
        print(f"build, cold (--no-cache): {report['build_cold_s']:.0f} s")
    print(f"build, cached:            {report['build_cached_s']:.1f} s")
    print(f"image size:               {report['size_mb']:.0f} MB")
    print(f"start -> health ok:       {report['health_s']:.2f} s (median of {args.runs}; "
          f"baseline `voice-agent --version` {report['version_s']:.2f} s, "
          f"{report['health_vs_version']}x)")
    print(f"first transcription:      {report['first_transcribe_ms']:.0f} ms (3.5 s of speech)")
    write_report(args.out, report)
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
