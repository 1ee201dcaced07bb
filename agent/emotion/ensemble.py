"""Several emotion models on one clip: per-model results, one final label, a consensus flag.

The final distribution is the plain mean of the models' canonical-label probabilities (every
model weighs the same; a label a model cannot output counts as 0 for it); the final label is
its argmax and the confidence its value there. The best model is the one most confident in
its own label, preferring calibrated models (a SenseVoice tag is always "100 % sure").
`models_consensus` is True when every model chose the same label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.emotion.classifier import EmotionClassifier, EmotionResult, result_from_probabilities
from agent.emotion.labels import LABELS
from agent.errors import EmotionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleResult:
    """The final result plus each model's."""

    final: EmotionResult
    models: tuple[EmotionResult, ...]
    best_model: str
    models_consensus: bool

    def event_fields(self) -> dict[str, Any]:
        """The fields of an `emotion.detected` event (label ... compute_ms)."""
        return {
            "label": self.final.label,
            "confidence": round(self.final.confidence, 4),
            "probabilities": {k: round(v, 4) for k, v in self.final.probabilities.items()},
            "model": self.final.model_id,
            "models": [m.to_dict() for m in self.models] if len(self.models) > 1 else [],
            "best_model": self.best_model if len(self.models) > 1 else None,
            "models_consensus": self.models_consensus if len(self.models) > 1 else None,
            "compute_ms": round(self.final.compute_ms, 2),
        }


def combine(results: Sequence[EmotionResult]) -> EnsembleResult:
    """Average the models' probabilities (see the module docstring)."""
    if not results:
        raise EmotionError("no_result", "no emotion model gave a result", status=422)
    if len(results) == 1:
        r = results[0]
        return EnsembleResult(r, (r,), r.model_id, True)
    mean = {label: float(np.mean([r.probabilities.get(label, 0.0) for r in results]))
            for label in LABELS}
    final = result_from_probabilities(
        mean, "+".join(r.model_id for r in results),
        compute_ms=sum(r.compute_ms for r in results),
        calibrated=all(r.calibrated for r in results))
    best = max(results, key=lambda r: (r.calibrated, r.confidence))
    consensus = len({r.label for r in results}) == 1
    return EnsembleResult(final, tuple(results), best.model_id, consensus)


class EnsembleClassifier:
    """Runs each classifier in turn (in the calling thread) and combines their results.

    A model that tags no emotion (`undetermined`) is left out; any other EmotionError (bad
    audio) is the caller's, raised at once.
    """

    def __init__(self, classifiers: Sequence[EmotionClassifier]) -> None:
        if not classifiers:
            raise ValueError("an ensemble needs at least one classifier")
        self.classifiers = list(classifiers)

    @property
    def model_ids(self) -> list[str]:
        """The member models' ids, in order."""
        return [c.model_id for c in self.classifiers]

    def classify(self, audio: np.ndarray) -> EnsembleResult:
        """Every model on `audio`, combined."""
        t0 = time.perf_counter()
        results = []
        for c in self.classifiers:
            try:
                results.append(c.classify(audio))
            except EmotionError as e:
                if e.code != "undetermined":
                    raise
                log.debug("%s: %s", c.model_id, e.message)
        out = combine(results)
        log.debug("ensemble of %d in %.1f ms", len(results), (time.perf_counter() - t0) * 1e3)
        return out
