"""The emotion analyser: one `emotion.detected` per utterance, computed once its audio ended.

The utterance's audio is collected as it arrives and classified at its end, in a decode
worker at `Priority.ANALYSIS`: never on the event loop, and after any ASR final waiting for
a worker (finals are `Priority.FINAL`). Utterances too short, silent, or that no model could
tag publish nothing (logged at debug): a missing `emotion.detected` means "no opinion", not an
error. Either way the utterance's `results["emotion"]` (the event, or None) is set for other
analysers, and `result_event("emotion")` fires.

The default model (a CNN over 3 s of MFCCs, flattened into its classifier) is sensitive to
where speech sits in its window: it learned RAVDESS clips, whose speech starts about 1 s in,
and sees a 3 s window from 0.5 s. A live utterance starts at the VAD onset minus the
pre-roll, so the analyser puts `lead_s` of silence before it (the factory: 1 s minus the
pre-roll). Measured on the 60 shared clips joined and cut by the live VAD: 30 % correct with
no lead, 60-63 % with 0.7-0.85 s (see the report); uploads are classified as they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import numpy as np

from agent.analysis import Analyser, Priority, Runner, Utterance
from agent.bus import Publisher
from agent.constants import PIPELINE_RATE
from agent.emotion.classifier import (
    MIN_AUDIO_S,
    EmotionClassifier,
    OnnxEmotionClassifier,
    check_audio,
)
from agent.emotion.ensemble import EnsembleClassifier, EnsembleResult
from agent.emotion.sense_voice import SenseVoiceEmotionClassifier
from agent.errors import EmotionError, ModelError
from agent.events import EmotionDetected

log = logging.getLogger(__name__)

#: EmotionError codes that mean "nothing to say about this utterance", not a failure.
NO_OPINION = frozenset({"too_short", "silent", "empty_audio", "undetermined", "no_result"})
#: How long emotion waits for the final it yields to (a final that failed never comes; past
#: it, the runner's priorities still put queued finals first).
YIELD_TIMEOUT_S = 2.0
#: Where speech starts in the default model's training clips (RAVDESS), seconds.
SPEECH_ONSET_S = 1.0


class SessionHook(Protocol):
    """Where the analyser reports utterances, for per-session summaries."""

    def begin(self, session_id: str | None, pub: Publisher) -> None:
        """An utterance of `session_id` is being analysed."""
        ...

    def done(self, session_id: str | None, event: EmotionDetected | None) -> None:
        """That utterance's result (None: no opinion, or abandoned)."""
        ...

    async def aclose(self) -> None:
        """The daemon stops: summarise what is open."""
        ...


def classify_pcm(classifier: EnsembleClassifier, parts: list[np.ndarray], lead_s: float = 0.0,
                 min_audio_s: float = MIN_AUDIO_S) -> EnsembleResult:
    """int16 pipeline chunks -> the ensemble's result (runs in a decode worker).

    The utterance itself must pass `check_audio` (long enough, not silent); then `lead_s` of
    silence goes before it, so that its speech starts where it does in the model's training
    clips, and the result is the ensemble's on that.
    """
    pcm = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    x = check_audio(pcm, PIPELINE_RATE, min_audio_s)
    if lead_s > 0:
        x = np.concatenate([np.zeros(int(lead_s * PIPELINE_RATE), np.float32), x])
    return classifier.classify(x)


class EmotionAnalyser(Analyser):
    """Classifies each utterance's emotion (one model or an ensemble) and publishes it."""

    name = "emotion"

    def __init__(self, classifier: EnsembleClassifier, runner: Runner, *,
                 sessions: SessionHook | None = None, lead_s: float = 0.0,
                 min_audio_s: float = MIN_AUDIO_S, yield_to: str | None = None,
                 yield_timeout_s: float = YIELD_TIMEOUT_S) -> None:
        """`lead_s`: silence put before each live utterance (see `classify_pcm`);
        `yield_to`: an analyser (e.g. "asr") whose result this one waits for, at most
        `yield_timeout_s`, before it asks for a worker, so that it never competes with it."""
        self.classifier = classifier
        self.runner = runner
        self.sessions = sessions
        self.lead_s = lead_s
        self.min_audio_s = min_audio_s
        self.yield_to = yield_to
        self.yield_timeout_s = yield_timeout_s
        self.published = 0
        self.skipped = 0

    @property
    def model_id(self) -> str | None:
        """The model, or the ensemble's models joined by '+'."""
        return "+".join(self.classifier.model_ids)

    async def analyse(self, utt: Utterance, audio: AsyncIterator[np.ndarray],
                      pub: Publisher) -> None:
        """Collect the utterance, classify it at its end, publish `emotion.detected`."""
        if self.sessions is not None:
            self.sessions.begin(utt.session_id, pub)
        event: EmotionDetected | None = None
        try:
            parts = [chunk async for chunk in audio]
            if utt.aborted or not parts:
                return
            if self.yield_to is not None:
                # Let the final go first even with every worker free: it is what a user waits on.
                try:
                    await asyncio.wait_for(utt.result_event(self.yield_to).wait(),
                                           self.yield_timeout_s)
                except TimeoutError:
                    pass
            event = await self._publish(pub, utt.session_id, utt.id, classify_pcm,
                                        self.classifier, parts, self.lead_s, self.min_audio_s)
        finally:
            utt.results["emotion"] = event
            utt.result_event("emotion").set()
            if self.sessions is not None:
                self.sessions.done(utt.session_id, event)

    async def classify_clip(self, audio: np.ndarray, pub: Publisher, session_id: str | None,
                            utterance_id: str | None) -> EmotionDetected | None:
        """One utterance that did not come through the pipeline (a /ws/asr stream's)."""
        if self.sessions is not None:
            self.sessions.begin(session_id, pub)
        event: EmotionDetected | None = None
        try:
            event = await self._publish(pub, session_id, utterance_id,
                                        self.classifier.classify, audio)
            return event
        finally:
            if self.sessions is not None:
                self.sessions.done(session_id, event)

    async def _publish(self, pub: Publisher, session_id: str | None,
                       utterance_id: str | None, fn: Callable[..., EnsembleResult],
                       *args: Any) -> EmotionDetected | None:
        try:
            result = await self.runner.run(fn, *args, priority=Priority.ANALYSIS,
                                           kind="emotion")
        except EmotionError as e:
            if e.code not in NO_OPINION:
                raise
            self.skipped += 1
            log.debug("no emotion for utterance %s: %s", utterance_id, e.message)
            return None
        self.published += 1
        return pub.emit(EmotionDetected, session_id=session_id, utterance_id=utterance_id,
                        **result.event_fields())

    async def close(self) -> None:
        """Publish the open sessions' summaries."""
        if self.sessions is not None:
            await self.sessions.aclose()


def load_classifier(model_id: str, *, threads: int = 1, min_audio_s: float = 0.25
                    ) -> EmotionClassifier:
    """An installed emotion model by manifest id: an ONNX classifier, or SenseVoice's tags.

    ModelError `not_installed` (with the install command), `unknown_model`, or `wrong_task`
    for a model that gives no emotion (e.g. a Whisper ASR model).
    """
    from agent import models

    entry = models.load_manifest().get(model_id)
    if entry.task == "emotion":
        return OnnxEmotionClassifier.from_installed(model_id, threads=threads,
                                                    min_audio_s=min_audio_s)
    if entry.model_type == "sense_voice":
        files = models.model_files(model_id)
        clf = SenseVoiceEmotionClassifier.from_files(str(files["model"]), str(files["tokens"]),
                                                     model_id=model_id, threads=threads)
        clf.min_audio_s = min_audio_s
        return clf
    raise ModelError("wrong_task", f"{model_id} is a model for {entry.task}, not emotion; "
                     "emotion.models takes emotion models (voice-agent models list) or "
                     "SenseVoice")


def load_ensemble(model_ids: list[str], *, threads: int = 1, min_audio_s: float = 0.25
                  ) -> EnsembleClassifier:
    """Every configured model (each id once), as one ensemble (blocking: models load)."""
    return EnsembleClassifier([load_classifier(m, threads=threads, min_audio_s=min_audio_s)
                               for m in dict.fromkeys(model_ids)])
