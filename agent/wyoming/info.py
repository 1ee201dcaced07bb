"""`describe` -> `info`: what this daemon offers over Wyoming, from what is loaded right now.

An `asr` program with the loaded model and its languages, a `tts` program with the voices;
never a `satellite` (Home Assistant then treats the port as a satellite and loads no STT or
TTS for it). Built from memory only, well inside HA's 1 s describe timeout.
"""

from __future__ import annotations

import contextlib
import functools

from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    Info,
    TtsProgram,
    TtsVoice,
)

from agent import __version__
from agent.asr.base import AsrEngine
from agent.wyoming.tts import Voice

ASR_PROGRAM = "voice-agent"
TTS_PROGRAM = "voice-agent-piper"


def _home() -> str:
    """The package's home page, when its metadata names one (else empty: no guessed URL)."""
    with contextlib.suppress(Exception):
        from importlib.metadata import metadata

        for entry in metadata("voice-agent").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() == "homepage":
                return url.strip()
    return ""


_US = Attribution(name="voice-agent", url=_home())


@functools.cache
def manifest_languages(model_id: str) -> tuple[str, ...]:
    """The manifest's languages of `model_id` (parsing the manifest: call it off the loop once,
    as the service does at start; cached afterwards)."""
    with contextlib.suppress(Exception):
        from agent import models

        return tuple(models.load_manifest().get(model_id).languages)
    return ()


def asr_languages(engine: AsrEngine) -> list[str]:
    """The languages the loaded model recognises (the manifest's, else the configured one)."""
    if engine.languages:
        return list(engine.languages)
    langs = manifest_languages(engine.model_id)
    if langs:
        return list(langs)
    return [engine.language] if engine.language else []


def build_info(engine: AsrEngine | None, voices: list[Voice], *, streaming: bool) -> Info:
    """The `info` event's content."""
    asr: list[AsrProgram] = []
    if engine is not None:
        asr.append(AsrProgram(
            name=ASR_PROGRAM, description="voice-agent local speech recognition (sherpa-onnx)",
            attribution=_US, installed=True, version=__version__,
            supports_transcript_streaming=streaming,
            # Home Assistant's VAD decides when the command ends, as for faster-whisper.
            requires_external_vad=True,
            models=[AsrModel(name=engine.model_id, description=engine.model_id,
                             attribution=_US, installed=True, version=None,
                             languages=asr_languages(engine))]))
    tts: list[TtsProgram] = []
    if voices:
        tts.append(TtsProgram(
            name=TTS_PROGRAM, description="voice-agent text to speech (local Piper voice)",
            attribution=_US, installed=True, version=__version__,
            supports_synthesize_streaming=True,
            voices=[TtsVoice(name=v.name, description=v.description,
                             attribution=Attribution(name=v.attribution[0], url=v.attribution[1]),
                             installed=True, version=v.version, languages=v.languages)
                    for v in voices]))
    return Info(asr=asr, tts=tts)
