"""The speaker analyser: who spoke each live utterance (`speaker.identified`), live enrolment.

At the utterance's end its audio (the first `max_audio_s`) is embedded and compared with the
store's voiceprints in one decode-worker call at `Priority.ANALYSIS`: never on the event loop,
and behind any ASR final waiting for a worker (finals are `Priority.FINAL`). Every utterance
that was not abandoned gets an event: an utterance with too little speech to tell, or a store
with no voiceprint for this model, is `unknown` (score 0, no candidates). The event (or None
when the analysis failed) is left in `utt.results["speaker"]` and `result_event("speaker")`
fires either way, so the reply's speaker gate never waits for nothing.

A pending `LiveEnrolment` (the `speakers/register` command with `utterances: N`) takes the
embeddings of the next N utterances that have enough speech.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.analysis import Analyser, Priority, Runner, Utterance
from agent.bus import Publisher
from agent.config import SpeakerConfig
from agent.constants import PIPELINE_RATE
from agent.errors import ModelError, SpeakerError
from agent.events import SpeakerIdentified
from agent.speaker.embedder import Embedder, Embedding, make_embedder
from agent.speaker.scoring import model_threshold
from agent.speaker.store import Match, VoiceprintStore

log = logging.getLogger(__name__)

#: SpeakerError codes that mean "cannot tell who this is", not a failure.
CANNOT_TELL = frozenset({"too_short", "silent"})
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Identification:
    """One clip's embedding (None when it had too little speech) and its best candidates."""

    embedding: Embedding | None
    matches: list[Match]
    audio_s: float
    reason: str | None = None  # why there is no embedding: too_short, silent
    compute_ms: float = 0.0  # in the worker: front end, model and store

    @property
    def best(self) -> Match | None:
        """The best candidate when it passed the threshold."""
        return self.matches[0] if self.matches and self.matches[0].is_match else None

    def event_fields(self, model_id: str) -> dict[str, object]:
        """The `speaker.identified` fields (identified, or `unknown`)."""
        best = self.best
        return {"speaker_id": best.speaker_id if best else None,
                "name": best.name if best else UNKNOWN,
                "score": round(self.matches[0].score, 4) if self.matches else 0.0,
                "is_match": best is not None, "model": model_id,
                "candidates": [m.to_dict() for m in self.matches],
                "audio_s": round(self.audio_s, 3), "compute_ms": round(self.compute_ms, 1),
                "reason": self.why_unknown}

    @property
    def why_unknown(self) -> str | None:
        """Why nobody was named: too_short, silent, no_voiceprints, no_match (None: named)."""
        if self.embedding is None:
            return self.reason
        if not self.matches:
            return "no_voiceprints"
        return None if self.best is not None else "no_match"


@dataclass
class LiveEnrolment:
    """A registration waiting for the embeddings of the next `count` usable utterances."""

    name: str
    count: int
    samples: list[Embedding] = field(default_factory=list)
    utterances: list[str] = field(default_factory=list)
    skipped: int = 0  # utterances with too little speech
    done: asyncio.Future[list[Embedding]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    def offer(self, utterance_id: str, ident: Identification) -> None:
        """One analysed utterance: its embedding counts when there is one."""
        if self.done.done():
            return
        if ident.embedding is None:
            self.skipped += 1
            return
        self.samples.append(ident.embedding)
        self.utterances.append(utterance_id)
        if len(self.samples) >= self.count:
            self.done.set_result(list(self.samples))


class SpeakerAnalyser(Analyser):
    """Identifies the speaker of each utterance against the voiceprint store."""

    name = "speaker"

    def __init__(self, embedder: Embedder, store: VoiceprintStore, runner: Runner, *,
                 top_k: int = 3, max_audio_s: float = 30.0, yield_to: str | None = None,
                 yield_timeout_s: float = 2.0) -> None:
        """`yield_to`: an analyser (e.g. "asr") whose result this one waits for, at most
        `yield_timeout_s`, before it asks for a worker (the factory yields to ASR when it is on)."""
        self.embedder = embedder
        self.store = store
        self.runner = runner
        self.top_k = top_k
        self.max_audio_s = max_audio_s
        self.yield_to = yield_to
        self.yield_timeout_s = yield_timeout_s
        self.enrolment: LiveEnrolment | None = None
        self.published = 0
        self.unknown = 0

    @property
    def model_id(self) -> str | None:
        """The speaker model."""
        return self.embedder.model_id

    # -- synchronous: run these in a worker -------------------------------------------------

    def identify_audio(self, audio: np.ndarray, top_k: int | None = None) -> Identification:
        """Embed 16 kHz float32 audio and rank the voiceprints (SpeakerError on bad audio)."""
        t0 = time.perf_counter()
        emb = self.embedder.extract(audio)
        matches = self.store.identify(emb.vector, emb.model_id, top_k=top_k or self.top_k)
        return Identification(emb, matches, emb.audio_s,
                              compute_ms=1000 * (time.perf_counter() - t0))

    def identify_utterance(self, parts: list[np.ndarray]) -> Identification:
        """int16 pipeline chunks -> identification; too little speech gives `unknown`."""
        pcm = np.concatenate(parts)[:int(self.max_audio_s * PIPELINE_RATE)]
        x = pcm.astype(np.float32) / 32768.0
        t0 = time.perf_counter()
        try:
            return self.identify_audio(x)
        except SpeakerError as e:
            if e.code not in CANNOT_TELL:
                raise
            return Identification(None, [], len(x) / PIPELINE_RATE, reason=e.code,
                                  compute_ms=1000 * (time.perf_counter() - t0))

    # -- the live pipeline ------------------------------------------------------------------

    async def analyse(self, utt: Utterance, audio: AsyncIterator[np.ndarray],
                      pub: Publisher) -> None:
        """Collect the utterance, identify its speaker at its end, publish the event."""
        event: SpeakerIdentified | None = None
        try:
            parts = [chunk async for chunk in audio]
            if utt.aborted or not parts:
                return
            if self.yield_to is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(utt.result_event(self.yield_to).wait(),
                                           self.yield_timeout_s)
            ident = await self.runner.run(self.identify_utterance, parts,
                                          priority=Priority.ANALYSIS, kind="speaker")
            if ident.embedding is None:
                self.unknown += 1
                log.debug("utterance %s: cannot tell the speaker (%s)", utt.id, ident.reason)
            event = pub.emit(SpeakerIdentified, session_id=utt.session_id, utterance_id=utt.id,
                             **ident.event_fields(self.embedder.model_id))
            self.published += 1
            if self.enrolment is not None:
                self.enrolment.offer(utt.id, ident)
        finally:
            utt.results["speaker"] = event
            utt.result_event("speaker").set()

    # -- live enrolment ---------------------------------------------------------------------

    def start_enrolment(self, name: str, count: int) -> LiveEnrolment:
        """Collect the next `count` utterances for `name` (one enrolment at a time: 409)."""
        if self.enrolment is not None and not self.enrolment.done.done():
            raise SpeakerError("enrol_pending", f"a live enrolment for "
                               f"{self.enrolment.name!r} is already waiting for utterances",
                               status=409)
        self.enrolment = LiveEnrolment(name, count)
        return self.enrolment

    def end_enrolment(self, enrolment: LiveEnrolment) -> None:
        """Stop feeding `enrolment` (done, timed out or abandoned by its caller)."""
        if not enrolment.done.done():
            enrolment.done.cancel()
        if self.enrolment is enrolment:
            self.enrolment = None

    async def close(self) -> None:
        """Abandon a pending enrolment; close the store (checkpoints its WAL) off the loop."""
        if self.enrolment is not None:
            self.end_enrolment(self.enrolment)
        await asyncio.to_thread(self.store.close)


def load_embedder(cfg: SpeakerConfig) -> Embedder:
    """The configured speaker model (blocking: it loads); ModelError when missing or wrong."""
    from agent import models

    entry = models.load_manifest().get(cfg.model)
    if entry.task != "speaker":
        raise ModelError("wrong_task", f"{cfg.model} is a {entry.task} model; speaker.model "
                         "takes a speaker model (voice-agent models list)")
    return make_embedder(cfg.model, entry.backend, threads=cfg.threads,
                         min_speech_s=cfg.min_speech_s, max_audio_s=cfg.max_audio_s)


def open_store(cfg: SpeakerConfig, state_dir: Path, model_id: str | None = None
               ) -> VoiceprintStore:
    """The voiceprint store in `state_dir` (SpeakerError `store_unavailable` if it won't open)."""
    try:
        return VoiceprintStore(Path(state_dir).expanduser(),
                               threshold=model_threshold(model_id or cfg.model, cfg.threshold),
                               min_enrol_speech_s=cfg.min_enrol_speech_s)
    except (OSError, sqlite3.Error) as e:
        raise SpeakerError("store_unavailable", f"cannot open the voiceprint store in "
                           f"{state_dir}: {e}", status=503) from e


def load_speaker_analyser(cfg: SpeakerConfig, state_dir: Path, runner: Runner,
                          yield_to: str | None = None) -> SpeakerAnalyser:
    """Model and store for the live pipeline and the speaker commands (blocking); `yield_to`:
    the analyser whose result each utterance's identification waits for."""
    embedder = load_embedder(cfg)
    store = open_store(cfg, state_dir, embedder.model_id)
    stale = store.needs_reenrolment(embedder.model_id)
    if stale:
        log.warning("%d enrolled speaker(s) have no voiceprint for %s and need re-enrolment: "
                    "%s", len(stale), embedder.model_id, ", ".join(s.name for s in stale[:10]))
    return SpeakerAnalyser(embedder, store, runner, top_k=cfg.top_k,
                           max_audio_s=cfg.max_audio_s, yield_to=yield_to)
