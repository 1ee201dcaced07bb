"""A session's emotional summary (pure): distribution, stability, valence, dominant emotion.

Over the utterances of a session (a PTT hold, a /ws/asr connection, a vad-mode window):
  * `distribution`: the share of utterances per final label (every canonical label, sums to 1);
  * `stability`: 1 - label changes / (utterances - 1); 1.0 when the label never changed
    (and for 0 or 1 utterance);
  * `valence`: 0 (negative) .. 100 (positive): 50 * (1 + mean expected valence), where an
    utterance's expected valence is its probability-weighted label valence (labels.VALENCE);
    50 for an empty session;
  * `dominant`: the most frequent label; a tie goes to the larger summed confidence, then to
    label order. None for an empty session.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.emotion.labels import LABELS, expected_valence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """What a summary needs of one utterance's result."""

    label: str
    confidence: float
    probabilities: Mapping[str, float]


@dataclass(frozen=True)
class SessionSummary:
    """The fields of an `emotion.session` event."""

    utterances: int
    distribution: dict[str, float]
    dominant: str | None
    stability: float
    valence: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form (rounded)."""
        return {
            "utterances": self.utterances,
            "distribution": {k: round(v, 4) for k, v in self.distribution.items()},
            "dominant": self.dominant,
            "stability": round(self.stability, 4),
            "valence": round(self.valence, 2),
        }


def summarize(results: Iterable[Any]) -> SessionSummary:
    """Summary of results in utterance order (anything with label, confidence, probabilities)."""
    obs = [Observation(r.label, float(r.confidence), dict(r.probabilities)) for r in results]
    n = len(obs)
    counts = dict.fromkeys(LABELS, 0)
    mass = dict.fromkeys(LABELS, 0.0)
    for o in obs:
        if o.label in counts:
            counts[o.label] += 1
            mass[o.label] += o.confidence
    distribution = {k: (c / n if n else 0.0) for k, c in counts.items()}
    dominant = None
    if n:
        dominant = max(LABELS, key=lambda k: (counts[k], mass[k], -LABELS.index(k)))
    changes = sum(a.label != b.label for a, b in itertools.pairwise(obs))
    stability = 1.0 - changes / (n - 1) if n > 1 else 1.0
    mean_v = sum(expected_valence(o.probabilities) for o in obs) / n if n else 0.0
    return SessionSummary(n, distribution, dominant, stability, 50.0 * (1.0 + mean_v))


class SessionTracker:
    """Collects results per session id (thread-safe); `close` returns and forgets a session."""

    def __init__(self, max_sessions: int = 1000) -> None:
        self._sessions: dict[str, list[Observation]] = {}
        self._lock = threading.Lock()
        self.max_sessions = max_sessions

    def add(self, session_id: str, result: Any) -> None:
        """Record one utterance's result."""
        o = Observation(result.label, float(result.confidence), dict(result.probabilities))
        with self._lock:
            if session_id not in self._sessions and len(self._sessions) >= self.max_sessions:
                # bounded: the oldest session (insertion order) goes first
                dropped = next(iter(self._sessions))
                del self._sessions[dropped]
                log.warning("emotion session tracker full: dropped session %s", dropped)
            self._sessions.setdefault(session_id, []).append(o)

    def summary(self, session_id: str) -> SessionSummary | None:
        """The summary so far, or None for an unknown session."""
        with self._lock:
            obs = self._sessions.get(session_id)
            obs = list(obs) if obs is not None else None
        return summarize(obs) if obs is not None else None

    def close(self, session_id: str) -> SessionSummary | None:
        """The final summary, and the session forgotten (None when it had no utterance)."""
        with self._lock:
            obs = self._sessions.pop(session_id, None)
        return summarize(obs) if obs is not None else None

    def sessions(self) -> list[str]:
        """Open session ids."""
        with self._lock:
            return list(self._sessions)
