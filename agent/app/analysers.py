"""The analyser registry: name -> build(config, runner) -> Analyser, or None when it is off.

A new analyser is enabled by config alone: its factory reads its own config section and
returns nothing when that section says it is disabled. A factory that raises an AgentError
(a model that is missing or will not load) is reported; the daemon goes on without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.analysis import Analyser, Runner
from agent.config import Config, SherpaOfflineAsrConfig
from agent.errors import AgentError

log = logging.getLogger(__name__)

Factory = Callable[[Config, Runner], Analyser | None]
ANALYSERS: dict[str, Factory] = {}


def analyser(name: str) -> Callable[[Factory], Factory]:
    """Register an analyser factory under `name`."""
    def deco(fn: Factory) -> Factory:
        ANALYSERS[name] = fn
        return fn
    return deco


def build_analysers(cfg: Config, runner: Runner,
                    report: Callable[[str, AgentError], None]) -> dict[str, Analyser]:
    """Every enabled analyser (blocking: models load here); failures are reported by analyser
    name, and skipped."""
    out: dict[str, Analyser] = {}
    for name, factory in ANALYSERS.items():
        try:
            a = factory(cfg, runner)
        except AgentError as e:
            # That analysis is lost, but capture, gate, VAD and the other analysers go on.
            report(name, e)
            continue
        if a is not None:
            out[name] = a
    return out


@analyser("asr")
def _asr(cfg: Config, runner: Runner) -> Analyser | None:
    if not cfg.asr.enabled:
        return None
    from agent.asr.analyser import AsrAnalyser
    from agent.asr.schedule import StreamParams
    from agent.asr.sherpa import make_engine

    engine = make_engine(cfg.asr, cfg.runtime)
    a = cfg.asr
    if isinstance(a, SherpaOfflineAsrConfig):
        params = StreamParams(partials=a.partials, interval_s=a.partial_interval_ms / 1000,
                              min_audio_s=a.partial_min_audio_ms / 1000, segments=a.segments,
                              pause_s=a.segment_pause_ms / 1000, min_segment_s=a.segment_min_s)
    else:
        params = StreamParams()
    return AsrAnalyser(engine, runner, params)


@analyser("emotion")
def _emotion(cfg: Config, runner: Runner) -> Analyser | None:
    e = cfg.emotion
    if not e.enabled:
        return None
    from agent.app.emotion_sessions import EmotionSessions
    from agent.emotion.analyser import SPEECH_ONSET_S, EmotionAnalyser, load_ensemble

    ensemble = load_ensemble(e.models, threads=e.threads, min_audio_s=e.min_audio_s)
    sessions = EmotionSessions(cfg.gate.mode, e.session_window_s, e.max_sessions)
    # Live utterances start at the VAD onset minus the pre-roll; the model's training clips
    # have speech from SPEECH_ONSET_S in (agent/emotion/analyser.py).
    lead_s = max(0.0, SPEECH_ONSET_S - cfg.segmenter.pre_roll_ms / 1000)
    # With ASR on, emotion waits for the final before asking for a worker: never ahead of it.
    return EmotionAnalyser(ensemble, runner, sessions=sessions, lead_s=lead_s,
                           min_audio_s=e.min_audio_s,
                           yield_to="asr" if cfg.asr.enabled else None)


@analyser("speaker")
def _speaker(cfg: Config, runner: Runner) -> Analyser | None:
    if not cfg.speaker.enabled:
        return None
    from agent.speaker.analyser import load_speaker_analyser

    # With ASR on, the speaker waits for the final before asking for a worker: run beside a
    # final decode on 2 cores, its ~30 ms call made PTT finals 1.4x slower at p50
    # (`bench/asr.py --speaker-compare N` measures the final's latency with it on and off).
    return load_speaker_analyser(cfg.speaker, cfg.state_dir, runner,
                                 yield_to="asr" if cfg.asr.enabled else None)
