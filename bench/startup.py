"""Benchmark start -> READY: how long `voice-agent run` takes to be ready under systemd.

Usage: python bench/startup.py [--runs 5] [--source stdin|mic:missing]
                              [--out bench/results/startup.json]

Each run binds a datagram socket as NOTIFY_SOCKET (as systemd does for Type=notify), starts
`voice-agent run --source stdin` (or `--source mic:missing`) with the default models and the
API on a free port (`VOICE_AGENT__API__PORT=0`, the port read from the log), and times, from
just before the process is spawned:
- `ready`: the READY=1 datagram (models loaded, sockets bound);
- `health`: the first `/api/health` answer with `"ready": true` (the fallback figure while
  the daemon does not send READY yet; labelled as such);
- `stop`: SIGTERM -> exit, and whether STOPPING=1 came.
Baseline, same run: `voice-agent --version` (interpreter + CLI import), so the ratio says how
much of the start is ours. Medians are reported; the target is READY <= 3 s.
"""

from __future__ import annotations

import argparse
import json
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
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_report  # noqa: E402

EXE = Path(sys.executable).parent / "voice-agent"
TARGET_S = 3.0
PORT_LINE = re.compile(r"API listening on http://[^\s:]+:(\d+)/")


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def baseline(runs: int) -> float:
    """Median seconds for `voice-agent --version`."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([str(EXE), "--version"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_run(source: str, timeout_s: float, ready_grace_s: float,
            stop_timeout_s: float) -> dict[str, Any]:
    """Start the daemon once; times in seconds from spawn (None when it never happened)."""
    tmp = Path(tempfile.mkdtemp(prefix="va-startup-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp / "notify.sock"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICE_AGENT", "NOTIFY"))}
    env.update(NOTIFY_SOCKET=str(tmp / "notify.sock"), VOICE_AGENT__API__ENABLED="true",
               VOICE_AGENT__API__PORT="0", VOICE_AGENT__STATE_DIR=str(tmp / "state"))
    port: list[int] = []
    log: list[str] = []
    res: dict[str, Any] = {"ready_s": None, "health_s": None, "stop_s": None,
                           "stopping": False, "status": None}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(EXE), "run", "--source", source], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            text=True)

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip())
            if not port and (m := PORT_LINE.search(line)):
                port.append(int(m.group(1)))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    sock.settimeout(0.02)
    deadline = t0 + timeout_s
    try:
        while time.perf_counter() < deadline and proc.poll() is None:
            try:
                msg = sock.recv(4096).decode()
                if "READY=1" in msg.split("\n") and res["ready_s"] is None:
                    res["ready_s"] = time.perf_counter() - t0
                for line in msg.split("\n"):
                    if line.startswith("STATUS="):
                        res["status"] = line[7:]
            except TimeoutError:
                pass
            if res["health_s"] is None and port:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port[0]}/api/health",
                                                timeout=1) as r:
                        if json.loads(r.read()).get("ready"):
                            res["health_s"] = time.perf_counter() - t0
                except OSError:
                    pass
            if res["health_s"] is not None and (
                    res["ready_s"] is not None
                    or time.perf_counter() - t0 > res["health_s"] + ready_grace_s):
                break
        if proc.poll() is not None:
            res["error"] = f"exited {proc.returncode}: " + " | ".join(log[-5:])
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=stop_timeout_s)
            res["stop_s"] = time.perf_counter() - t1
            res["exit"] = proc.returncode
        except subprocess.TimeoutExpired:
            res["error"] = f"did not stop within {stop_timeout_s:g} s of SIGTERM"
        sock.settimeout(0.2)
        while True:
            try:
                if "STOPPING=1" in sock.recv(4096).decode().split("\n"):
                    res["stopping"] = True
            except TimeoutError:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        reader.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}


def main() -> int:
    """Run the benchmark and write its JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=60.0, help="per run, seconds")
    ap.add_argument("--ready-grace", type=float, default=5.0,
                    help="how long after health is ready to wait for READY=1")
    ap.add_argument("--source", default="stdin",
                    help="stdin (kept open, no audio) or e.g. mic:missing (a mic that is not "
                         "there: the daemon retries and stays up)")
    ap.add_argument("--stop-timeout", type=float, default=30.0,
                    help="SIGTERM -> exit limit, seconds (the unit's TimeoutStopSec=)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    args = ap.parse_args()
    base = baseline(args.runs)
    subprocess.run([str(EXE), "--version"], capture_output=True)  # warm the page cache
    runs = []
    for i in range(args.runs):
        r = one_run(args.source, args.timeout, args.ready_grace, args.stop_timeout)
        runs.append(r)
        print(f"run {i + 1}: READY {r['ready_s']} s, health ready {r['health_s']} s, "
              f"stop {r['stop_s']} s (STOPPING={'yes' if r['stopping'] else 'no'})"
              + (f"  error: {r['error']}" if r.get("error") else ""))
    ready = [r["ready_s"] for r in runs if r["ready_s"] is not None]
    health = [r["health_s"] for r in runs if r["health_s"] is not None]
    stop = [r["stop_s"] for r in runs if r["stop_s"] is not None]
    figure, label = (_median(ready), "READY=1") if ready else (
        _median(health), "health ready (fallback: the daemon sent no READY=1)")
    report = {
        "bench": "startup", "source": args.source, "runs": args.runs, "target_s": TARGET_S,
        "machine": platform.machine(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "baseline_version_s": round(base, 3),
        "median_ready_s": _median(ready), "median_health_s": _median(health),
        "median_stop_s": _median(stop), "figure": label, "figure_s": figure,
        "ratio_vs_baseline": round(figure / base, 1) if figure else None,
        "target_met": figure is not None and figure <= TARGET_S, "results": runs,
    }
    print(f"\nbaseline `voice-agent --version`: {base:.3f} s (median of {args.runs})")
    print(f"start -> READY=1:       {report['median_ready_s']} s"
          + ("" if ready else "  (never sent: READY is not wired into the daemon yet)"))
    print(f"start -> health ready:  {report['median_health_s']} s")
    print(f"SIGTERM -> exit:        {report['median_stop_s']} s")
    print(f"figure ({label}): {figure} s = {report['ratio_vs_baseline']}x baseline; "
          f"target <= {TARGET_S} s {'met' if report['target_met'] else 'MISSED'}")
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
