"""One error class per stage, each carrying a stable machine-readable code.

Every front-end renders an `AgentError` the same way: `code` and `message` as they are, and
`status` (an HTTP status) for the surfaces that need one. `retry_after_s` tells a client
refused for load or rate when to come back.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base error: `stage` and `code` travel into `error` events and replies unchanged."""

    stage = "agent"
    #: HTTP status of this class of error unless the instance says otherwise.
    default_status = 500

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else self.default_status
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.stage}/{self.code}: {self.message}"


class ConfigError(AgentError):
    """The configuration is invalid."""

    stage = "config"
    default_status = 400


class AudioSourceError(AgentError):
    """An audio source cannot be opened or read."""

    stage = "audio"
    default_status = 400


class AudioDecodeError(AudioSourceError):
    """Uploaded audio cannot be decoded, is empty, or is too long."""

    stage = "audio"
    default_status = 400


class VadError(AgentError):
    """A VAD backend failed to load or run."""

    stage = "vad"


class GateError(AgentError):
    """A push-to-talk command was refused."""

    stage = "gate"
    default_status = 409


class AnalyserError(AgentError):
    """An utterance analyser (ASR, speaker, emotion) failed."""

    stage = "analyser"


class AsrError(AgentError):
    """Speech recognition is unavailable or failed."""

    stage = "asr"
    default_status = 503


class SpeakerError(AgentError):
    """Speaker recognition refused a request or failed (bad enrolment audio, no such voice)."""

    stage = "speaker"
    default_status = 400


class EmotionError(AgentError):
    """Speech emotion recognition refused a request or failed."""

    stage = "emotion"
    default_status = 400


class ReplyError(AgentError):
    """A reply (LLM text, TTS audio, playback) could not be produced."""

    stage = "reply"
    default_status = 502


class CloudError(ReplyError):
    """The cloud service (DashScope) is unreachable, refused us, or answered garbage."""

    stage = "cloud"
    default_status = 502


class ModelError(AgentError):
    """A model is missing, corrupt or cannot be loaded."""

    stage = "model"
    default_status = 503


class CommandError(AgentError):
    """A command was refused before it ran: unknown name, bad payload, rate or load limits."""

    stage = "command"
    default_status = 400
