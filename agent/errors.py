"""One error class per pipeline stage, each carrying a stable machine-readable code."""

from __future__ import annotations


class AgentError(Exception):
    """Base error: `stage` and `code` travel into `error` events unchanged."""

    stage = "agent"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.stage}/{self.code}: {self.message}"


class ConfigError(AgentError):
    """The configuration is invalid."""

    stage = "config"


class AudioSourceError(AgentError):
    """An audio source cannot be opened or read."""

    stage = "audio"


class VadError(AgentError):
    """A VAD backend failed to load or run."""

    stage = "vad"


class GateError(AgentError):
    """A push-to-talk command was refused."""

    stage = "gate"


class AnalyserError(AgentError):
    """An utterance analyser (ASR, speaker, emotion) failed."""

    stage = "analyser"


class ModelError(AgentError):
    """A model is missing, corrupt or cannot be loaded."""

    stage = "model"
