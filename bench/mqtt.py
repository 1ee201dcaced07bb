"""Benchmark the MQTT front-end on a local mosquitto: events/s sustained, latency p50/p95.

Usage: python bench/mqtt.py [--events 20000] [--rate 100] [--seconds 10] [--repeat 3]
                            [--out bench/results/mqtt.json]
A private broker is started (Debian `mosquitto`); the daemon runs in this process with its
real MQTT service, the subscriber in another process (paho), so the three do not share an
event loop. Throughput: `--events` asr.final events (QoS 1), emitted as fast as the service
takes them (the outbox kept below 2000 so nothing is dropped), until the subscriber has the
last one. Latency: event created (its `mono`) -> subscriber received (CLOCK_MONOTONIC is
system-wide), at `--rate` events/s for `--seconds`, for finals (QoS 1) and partials (QoS 0).
Each case runs with the outbox journal on disk (the default) and in memory only; medians of
`--repeat` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.config import load_config  # noqa: E402
from agent.daemon import Daemon  # noqa: E402
from agent.events import AsrFinal, AsrPartial  # noqa: E402
from agent.mqtt.service import MqttService  # noqa: E402
from bench.report import write_report  # noqa: E402
from tests.mosquitto import Mosquitto  # noqa: E402
from tests.sources import SilentSource  # noqa: E402

DEVICE = "bench"
TOPIC = f"voice-agent/{DEVICE}/event/#"
TEXT = "Eight of spades, four of clubs, seven of hearts, and the queen of diamonds."
WATERMARK = 2000


def subscriber_main(port: int, count: int, out: Path) -> int:
    """Child process: receive `count` messages, then write [recv_mono, event_mono] pairs."""
    import paho.mqtt.client as mqtt

    got: list[tuple[float, bytes]] = []
    done = False

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        nonlocal done
        got.append((time.monotonic(), m.payload))
        done = len(got) >= count

    def on_connect(c: Any, *_: Any) -> None:
        c.subscribe(TOPIC, qos=1)

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.on_message = on_message
    c.on_connect = on_connect
    c.on_subscribe = lambda *_: print("ready", flush=True)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 300
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    c.loop_stop()
    pairs = [(t, json.loads(p)["mono"]) for t, p in got]
    out.write_text(json.dumps(pairs))
    return 0 if done else 1


def start_subscriber(port: int, count: int, out: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, __file__, "--subscriber", str(port), str(count),
                          str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise SystemExit("subscriber did not start")
    return p


def finish_subscriber(p: subprocess.Popen[str], out: Path) -> list[tuple[float, float]]:
    if p.wait(timeout=300) != 0:
        raise SystemExit("subscriber did not receive every event")
    pairs: list[tuple[float, float]] = [tuple(x) for x in json.loads(out.read_text())]
    return pairs


async def with_daemon(port: int, state_dir: Path, persist: bool, body: Any) -> Any:
    """Run `body(daemon, service)` against a connected in-process daemon."""
    env = {"VOICE_AGENT__DEVICE_ID": DEVICE, "VOICE_AGENT__STATE_DIR": str(state_dir),
           "VOICE_AGENT__ASR__ENABLED": "false", "VOICE_AGENT__MQTT__ENABLED": "true",
           "VOICE_AGENT__MQTT__HOST": "127.0.0.1", "VOICE_AGENT__MQTT__PORT": str(port),
           "VOICE_AGENT__MQTT__DISCOVERY": "false",
           "VOICE_AGENT__MQTT__OUTBOX_PERSIST": "true" if persist else "false"}
    d = Daemon(load_config(None, env=env), source=SilentSource())
    svc = next(s for s in d.services if isinstance(s, MqttService))
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(svc.connected.wait(), 10)
    try:
        return await body(d, svc)
    finally:
        d.shutdown()
        await task


def final(d: Daemon, i: int) -> None:
    d.pub.emit(AsrFinal, utterance_id=f"u{i}", session_id="s", text=TEXT, language="en",
               model="whisper-tiny.en-int8", audio_s=3.2, decode_ms=231.0,
               eos_to_final_ms=236.0, partials=4)


def partial(d: Daemon, i: int) -> None:
    d.pub.emit(AsrPartial, utterance_id=f"u{i // 10}", session_id="s", text=TEXT[:40],
               seq=i % 10 + 1)


async def throughput(port: int, state_dir: Path, persist: bool, n: int, tmp: Path) -> float:
    """Events/s from the first emit until the subscriber has the last of `n` finals."""
    out = tmp / "sub.json"
    sub = start_subscriber(port, n, out)

    async def body(d: Daemon, svc: MqttService) -> float:
        t0 = time.monotonic()
        for i in range(n):
            final(d, i)
            if i % 100 == 99:
                # Yield so the service drains the bus; hold back while the outbox is deep.
                await asyncio.sleep(0)
                while len(svc.outbox) > WATERMARK:  # noqa: ASYNC110 (bench back-pressure)
                    await asyncio.sleep(0.001)
        pairs = await asyncio.to_thread(finish_subscriber, sub, out)
        assert svc.outbox.dropped_total == 0 and svc.sub.dropped == 0
        return n / (max(t for t, _ in pairs) - t0)

    rate: float = await with_daemon(port, state_dir, persist, body)
    return rate


async def latency(port: int, state_dir: Path, persist: bool, kind: str, rate: float,
                  seconds: float, tmp: Path) -> dict[str, float]:
    """Created -> received latency at a steady `rate`."""
    n = int(rate * seconds)
    out = tmp / "sub.json"
    sub = start_subscriber(port, n, out)
    emit = final if kind == "final" else partial

    async def body(d: Daemon, svc: MqttService) -> dict[str, float]:
        t0 = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            emit(d, i)
        pairs = await asyncio.to_thread(finish_subscriber, sub, out)
        ms = sorted((t - mono) * 1000 for t, mono in pairs)
        return {"p50_ms": ms[len(ms) // 2], "p95_ms": ms[int(len(ms) * 0.95)], "max_ms": ms[-1],
                "n": len(ms)}

    result: dict[str, float] = await with_daemon(port, state_dir, persist, body)
    return result


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Mosquitto(persistence=False) as broker, \
            tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for persist in (True, False):
            label = "journal" if persist else "memory"
            rates = [await throughput(broker.port, tmp / label, persist, args.events, tmp)
                     for _ in range(args.repeat)]
            lat = {kind: median_of([await latency(broker.port, tmp / label, persist, kind,
                                                  args.rate, args.seconds, tmp)
                                    for _ in range(args.repeat)])
                   for kind in ("final", "partial")}
            results[label] = {"events_per_s": round(statistics.median(rates)),
                              "events_per_s_runs": [round(r) for r in rates],
                              "latency_final_qos1": lat["final"],
                              "latency_partial_qos0": lat["partial"]}
            print(f"outbox {label:7s}: {results[label]['events_per_s']:6d} events/s sustained "
                  f"(QoS 1 finals; runs {results[label]['events_per_s_runs']}); latency at "
                  f"{args.rate:g}/s: final p50 {lat['final']['p50_ms']:.2f} ms, p95 "
                  f"{lat['final']['p95_ms']:.2f} ms; partial p50 "
                  f"{lat['partial']['p50_ms']:.2f} ms, p95 {lat['partial']['p95_ms']:.2f} ms",
                  flush=True)
    return results


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--subscriber":
        return subscriber_main(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mqtt.json")
    args = ap.parse_args()
    results = asyncio.run(bench(args))
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                         f"python {platform.python_version()}",
              "broker": "mosquitto (local, private)", "events": args.events,
              "rate": args.rate, "seconds": args.seconds, "repeat": args.repeat,
              "results": results}
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
