"""Counters and latency histograms for `/metrics` (Prometheus text format) and `/api/stats`."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from agent.bus import Subscription
from agent.events import AsrFinal, BaseEvent, UtteranceEnded

Labels = tuple[tuple[str, str], ...]
# Seconds: from a 5 ms decode of a short partial to a 30 s upload.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
RECENT = 1000  # samples kept per series for the percentiles of /api/stats

#: Pipeline and API stages whose latency is a histogram (label `stage`).
STAGES = {
    "asr_decode": "daemon utterance: final decode",
    "asr_eos_to_final": "daemon utterance: end of speech (or PTT release) -> asr.final",
    "ws_asr_final": "/ws/asr: stop received -> final result sent",
    "ws_asr_decode": "/ws/asr: final decode",
    "ws_asr_partial_decode": "/ws/asr: partial decode",
    "transcribe_audio_decode": "/api/asr/transcribe: upload -> 16 kHz samples",
    "transcribe_decode": "/api/asr/transcribe: recognition",
    "transcribe_total": "/api/asr/transcribe: whole request",
    "emotion_compute": "emotion/analyze: model time",
    "speaker_diarize": "/api/speakers/diarize: diarization",
    "ws_verify_window": "/ws/speakers/verify: one window scored",
    "reply_first_text": "reply: final/request -> first LLM text",
    "reply_first_audio": "reply: final/request -> first audio sample on the outputs",
}


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metric:
    """One metric family: a name, help text, type and labelled samples."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text

    def samples(self) -> Iterable[str]:
        """Exposition lines of the samples."""
        return ()

    def render(self) -> list[str]:
        """HELP, TYPE and sample lines."""
        return [f"# HELP {self.name} {_esc(self.help)}", f"# TYPE {self.name} {self.kind}",
                *self.samples()]


class Counter(Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` to the series of `labels`."""
        k = _key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount

    def get(self, **labels: str) -> float:
        """Current value of one series."""
        return self.values.get(_key(labels), 0.0)

    def total(self) -> float:
        """Sum over every series."""
        return sum(self.values.values())

    def samples(self) -> Iterable[str]:
        """One line per series."""
        for k, v in sorted(self.values.items()):
            yield f"{self.name}{_fmt_labels(k)} {_num(v)}"


class GaugeFunc(Metric):
    """A value read at scrape time from a callback: `{labels: value}`."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str,
                 read: Callable[[], dict[Labels, float]], kind: str = "gauge") -> None:
        super().__init__(name, help_text)
        self.read = read
        self.kind = kind

    def samples(self) -> Iterable[str]:
        """One line per series the callback returns."""
        for k, v in sorted(self.read().items()):
            yield f"{self.name}{_fmt_labels(k)} {_num(v)}"


class Histogram(Metric):
    """Cumulative buckets, sum and count per label set; recent samples for percentiles."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        super().__init__(name, help_text)
        self.buckets = buckets
        self.series: dict[Labels, tuple[list[int], list[float], deque[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        """Record one observation."""
        k = _key(labels)
        if k not in self.series:
            self.series[k] = ([0] * len(self.buckets), [0.0, 0.0], deque(maxlen=RECENT))
        counts, sum_count, recent = self.series[k]
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
        sum_count[0] += value
        sum_count[1] += 1
        recent.append(value)

    def summary(self, **labels: str) -> dict[str, Any]:
        """count, mean, p50, p95, max (in the unit observed) of the recent samples."""
        s = self.series.get(_key(labels))
        if s is None or not s[2]:
            return {"count": 0, "mean": None, "p50": None, "p95": None, "max": None}
        recent = np.fromiter(s[2], dtype=np.float64)
        return {"count": int(s[1][1]), "mean": round(float(s[1][0] / s[1][1]), 4),
                "p50": round(float(np.percentile(recent, 50)), 4),
                "p95": round(float(np.percentile(recent, 95)), 4),
                "max": round(float(recent.max()), 4)}

    def samples(self) -> Iterable[str]:
        """_bucket lines (cumulative, +Inf last), then _sum and _count."""
        for k, (counts, sum_count, _) in sorted(self.series.items()):
            for b, c in zip(self.buckets, counts, strict=True):
                yield f"{self.name}_bucket{_fmt_labels(k, (('le', _num(b)),))} {c}"
            yield f"{self.name}_bucket{_fmt_labels(k, (('le', '+Inf'),))} {int(sum_count[1])}"
            yield f"{self.name}_sum{_fmt_labels(k)} {_num(round(sum_count[0], 6))}"
            yield f"{self.name}_count{_fmt_labels(k)} {int(sum_count[1])}"


class Registry:
    """The metric families of one API, rendered in registration order."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: Metric) -> Any:
        """Register and return `metric`."""
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        lines: list[str] = []
        for m in self.metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


class ApiMetrics:
    """Everything `/metrics` and `/api/stats` report, fed by the bus and the API handlers."""

    def __init__(self, prefix: str = "voice_agent") -> None:
        self.registry = Registry()
        r, p = self.registry, prefix
        self.events: Counter = r.add(Counter(f"{p}_events_total", "Events published, by type"))
        self.utterances: Counter = r.add(Counter(f"{p}_utterances_total",
                                                 "Utterances ended, by reason"))
        self.utterance_s: Histogram = r.add(Histogram(
            f"{p}_utterance_duration_seconds", "Utterance audio duration", DURATION_BUCKETS))
        self.latency: Histogram = r.add(Histogram(
            f"{p}_stage_latency_seconds",
            "Latency per stage: " + "; ".join(f"{k} = {v}" for k, v in STAGES.items()),
            LATENCY_BUCKETS))
        self.http: Counter = r.add(Counter(f"{p}_http_requests_total",
                                           "HTTP requests, by route, method and status"))
        self.http_s: Histogram = r.add(Histogram(
            f"{p}_http_request_duration_seconds", "HTTP request handling time, by route",
            LATENCY_BUCKETS))
        self.ws_dropped: Counter = r.add(Counter(
            f"{p}_ws_clients_dropped_total", "WebSocket clients dropped, by endpoint and reason"))
        self.ws_rejected: Counter = r.add(Counter(
            f"{p}_ws_asr_rejected_total", "/ws/asr connections refused, by reason"))
        self.ws_results: Counter = r.add(Counter(
            f"{p}_ws_asr_results_total", "/ws/asr results sent, by mode"))

    def gauge(self, name: str, help_text: str, read: Callable[[], dict[Labels, float]],
              kind: str = "gauge") -> None:
        """Register a value read at scrape time (connections, queue drops, uptime)."""
        self.registry.add(GaugeFunc(name, help_text, read, kind))

    def apply(self, ev: BaseEvent) -> None:
        """Count one bus event; finals and utterance ends also feed the histograms."""
        self.events.inc(type=ev.type)
        if isinstance(ev, UtteranceEnded):
            self.utterances.inc(reason=ev.reason)
            self.utterance_s.observe(ev.duration_s)
        elif isinstance(ev, AsrFinal):
            self.latency.observe(ev.decode_ms / 1000, stage="asr_decode")
            self.latency.observe(ev.eos_to_final_ms / 1000, stage="asr_eos_to_final")

    async def follow(self, sub: Subscription) -> None:
        """Apply every event until the bus closes."""
        async for ev in sub:
            self.apply(ev)

    def stage_ms(self, stage: str) -> dict[str, Any]:
        """Latency summary of one stage in milliseconds."""
        s = self.latency.summary(stage=stage)
        return {k: (round(v * 1000, 1) if isinstance(v, float) and k != "count" else v)
                for k, v in s.items()}
