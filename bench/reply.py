"""Benchmark the reply path: a final transcript -> the first audio sample of the spoken reply.

Usage: python bench/reply.py [--runs 30] [--first-token-s 0.2] [--first-audio-s 0.15]
           [--token-interval-s 0.02] [--out bench/results/reply.json]

The fake DashScope (tests/dashscope_fake.py) runs in its own process with fixed latencies:
first token after `--first-token-s`, then a token every `--token-interval-s`, first audio
`--first-audio-s` after the first text reaches the TTS. It timestamps what it receives and
sends (time.monotonic is one clock for both processes), so each run splits into what the
fake imposed (the baseline: LLM request -> the token that completes the first sentence, plus
first text -> first audio at the TTS) and what we added (trigger -> LLM request, that token ->
the text on the TTS socket, first audio frame -> the output).

Two paths, alternating run by run so both see the same machine:
- `session`: a bare ReplySession (the client layer alone), trigger = the call;
- `daemon`: a real daemon (App, reply service, API) with `reply.enabled`; the trigger is an
  `asr.final` published on its bus, exactly as the ASR analyser publishes it, and the first
  sample is timed where the outputs receive it and where a kiosk on `/ws/tts` receives it.
Medians and p95 after one warm-up each; the target is <= 30 ms added by the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.api.server import ApiService  # noqa: E402
from agent.app.reply import ReplyService, replies_of  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.daemon import Daemon  # noqa: E402
from agent.events import AsrFinal  # noqa: E402
from agent.reply.cosyvoice import CosyVoiceTts  # noqa: E402
from agent.reply.llm import DashscopeLlm  # noqa: E402
from agent.reply.session import ReplySession  # noqa: E402
from bench.report import write_report  # noqa: E402
from tests.sources import SilentSource  # noqa: E402

TARGET_ADDED_MS = 30.0


class FirstSample:
    """The player's place in the chain: notes when the first audio of a reply arrives."""

    name = "player"

    def __init__(self) -> None:
        self.t_first: float | None = None

    async def begin(self, reply_id: str, sample_rate: int) -> None:
        self.t_first = None

    async def write(self, pcm: bytes) -> None:
        if self.t_first is None:
            self.t_first = time.monotonic()

    async def end(self) -> None:
        pass

    def abort(self) -> None:
        pass


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def split(trigger: float, t_out: float, llm: dict[str, Any], tts: dict[str, Any]
          ) -> dict[str, float]:
    """One run's latency, split into the fake's share and ours (ms)."""
    t_text, first_chunk = tts["texts"][0]
    full = "".join(llm["tokens"])
    end = full.find(first_chunk) + len(first_chunk)
    lengths = itertools.accumulate(len(tok) for tok in llm["tokens"])
    k = next(i for i, upto in enumerate(lengths) if upto >= end)
    t_complete = llm["t_tokens"][k]
    ms = {
        "trigger_to_llm_request": llm["t_received"] - trigger,
        "fake_llm_to_first_sentence": t_complete - llm["t_received"],
        "sentence_to_tts_socket": t_text - t_complete,
        "fake_tts_first_audio": tts["t_first_audio"] - t_text,
        "tts_audio_to_output": t_out - tts["t_first_audio"],
        "total": t_out - trigger,
    }
    ms = {k: v * 1000 for k, v in ms.items()}
    ms["baseline"] = ms["fake_llm_to_first_sentence"] + ms["fake_tts_first_audio"]
    ms["added"] = ms["total"] - ms["baseline"]
    return ms


class DaemonPath:
    """A running daemon whose replies are triggered by finals on its bus."""

    def __init__(self, urls: dict[str, str]) -> None:
        env = {"API__PORT": "0", "GATE__MODE": "ptt", "ASR__ENABLED": "false",
               "PLAYBACK__ENABLED": "false", "EMOTION__ENABLED": "false",
               "REPLY__ENABLED": "true", "DASHSCOPE__API_KEY": urls["key"],
               "DASHSCOPE__BASE_URL": urls["http"], "DASHSCOPE__WS_URL": urls["ws"]}
        cfg = load_config(None, env={f"VOICE_AGENT__{k}": v for k, v in env.items()})
        self.d = Daemon(cfg, analysers=[], source=SilentSource(30))
        if not any(isinstance(s, ReplyService) for s in self.d.services):
            self.d.services.append(ReplyService(self.d.app))
        self.out = FirstSample()
        replies_of(self.d.app).session.outputs.append(self.out)
        self.sub = self.d.bus.subscribe(10_000, types=["tts.finished", "reply.cancelled"])
        self.t_kiosk: float | None = None
        self.n = 0

    async def start(self) -> None:
        self.task = asyncio.create_task(self.d.run())
        api = next(s for s in self.d.services if isinstance(s, ApiService))
        await asyncio.wait_for(api.bound.wait(), 30)
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"http://127.0.0.1:{api.port}/ws/tts")
        await self.ws.receive_json()
        self.kiosk = asyncio.create_task(self._kiosk())

    async def _kiosk(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY and self.t_kiosk is None:
                self.t_kiosk = time.monotonic()

    async def once(self, prompt: str) -> dict[str, float]:
        """One final -> reply; its trigger time and first-sample times."""
        self.n += 1
        self.t_kiosk = None
        ev = self.d.app.pub.emit(AsrFinal, session_id="bench", utterance_id=f"u{self.n}",
                                 text=prompt, language="en", model="bench", audio_s=1.0,
                                 decode_ms=0.0, eos_to_final_ms=0.0, partials=0)
        async for done in self.sub:
            if done.utterance_id == f"u{self.n}":
                break
        assert done.type == "tts.finished", done
        assert self.out.t_first is not None and self.t_kiosk is not None
        return {"trigger": ev.mono, "t_out": self.out.t_first, "t_kiosk": self.t_kiosk}

    async def stop(self) -> None:
        await self.ws.close()
        await self.http.close()
        self.d.shutdown()
        await self.task
        self.kiosk.cancel()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    fake = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is timed
        [sys.executable, "-m", "tests.dashscope_fake", "--first-token-s", str(args.first_token_s),
         "--token-interval-s", str(args.token_interval_s),
         "--first-audio-s", str(args.first_audio_s)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    runs: dict[str, list[dict[str, Any]]] = {"session": [], "daemon": []}
    try:
        assert fake.stdout is not None
        urls = json.loads(fake.stdout.readline())
        out = FirstSample()
        session = ReplySession(
            lambda cls, **kw: None,
            llm=DashscopeLlm(api_key=urls["key"], base_url=urls["http"]),
            tts=CosyVoiceTts(api_key=urls["key"], ws_url=urls["ws"]), outputs=[out])
        daemon = DaemonPath(urls)
        await daemon.start()
        k = 0  # the k-th reply the fake sees: its LLM and TTS log entries
        for i in range(args.runs + 1):
            prompt = f"Question number {i}: what is the weather like?"
            trigger = time.monotonic()
            res = await session.reply(prompt, trigger_mono=trigger)
            assert res.outcome == "done" and out.t_first is not None, res
            if i:  # run 0 of each path warms its connections up
                runs["session"].append({"trigger": trigger, "t_out": out.t_first, "k": k})
            d = await daemon.once(prompt)
            if i:
                runs["daemon"].append({**d, "k": k + 1})
            k += 2
        async with aiohttp.ClientSession() as http:
            log = await (await http.get(urls["http"].replace("/api/v1", "/_fake/log"))).json()
        await session.aclose()
        await daemon.stop()
    finally:
        fake.terminate()
        fake.wait(timeout=10)
    summary: dict[str, Any] = {}
    for path, rs in runs.items():
        parts = [split(r["trigger"], r["t_out"], log["llm"][r["k"]], log["tts"][r["k"]])
                 for r in rs]
        if path == "daemon":
            for p, r in zip(parts, rs, strict=True):
                p["output_to_kiosk_frame"] = (r["t_kiosk"] - r["t_out"]) * 1000
                p["added_to_kiosk"] = p["added"] + p["output_to_kiosk_frame"]
        summary[path] = {key: {"p50": statistics.median(p[key] for p in parts),
                               "p95": pct([p[key] for p in parts], 95)} for key in parts[0]}
    added = summary["daemon"]["added"]
    return {
        "bench": "reply", "machine": platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "runs": args.runs,
        "fake": {"first_token_s": args.first_token_s, "token_interval_s": args.token_interval_s,
                 "first_audio_s": args.first_audio_s},
        "ms": summary,
        "ratio_daemon_to_session_total_p50": summary["daemon"]["total"]["p50"]
        / summary["session"]["total"]["p50"],
        "target_added_ms": TARGET_ADDED_MS,
        "target_met": added["p50"] <= TARGET_ADDED_MS and added["p95"] <= TARGET_ADDED_MS,
    }


def main() -> int:
    """Run, print the table, write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--first-token-s", type=float, default=0.2)
    ap.add_argument("--token-interval-s", type=float, default=0.02)
    ap.add_argument("--first-audio-s", type=float, default=0.15)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reply.json")
    args = ap.parse_args()
    report = asyncio.run(bench(args))
    ms = report["ms"]
    print(f"{'stage (ms)':<28} {'session p50':>11} {'p95':>8} {'daemon p50':>11} {'p95':>8}")
    for key, v in ms["daemon"].items():
        s = ms["session"].get(key)
        left = f"{s['p50']:11.2f} {s['p95']:8.2f}" if s else f"{'':11} {'':8}"
        print(f"{key:<28} {left} {v['p50']:11.2f} {v['p95']:8.2f}")
    a = ms["daemon"]["added"]
    print(f"daemon / session total (p50): {report['ratio_daemon_to_session_total_p50']:.3f}; "
          f"daemon added p50 {a['p50']:.2f} / p95 {a['p95']:.2f} ms vs target "
          f"{TARGET_ADDED_MS:g} ms: {'met' if report['target_met'] else 'MISSED'}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
