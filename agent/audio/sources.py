"""Building the configured audio source, and `--source` parsing."""

from __future__ import annotations

from pathlib import Path

from agent.audio.base import AudioSource, ErrorCallback
from agent.config import AudioConfig
from agent.errors import AudioSourceError


def parse_source_spec(spec: str | None, cfg: AudioConfig) -> AudioConfig:
    """`mic`, `mic:NAME_OR_INDEX`, `file:PATH`, `stdin`, `-` -> updated audio config."""
    if spec is None:
        return cfg
    kind, _, arg = spec.partition(":")
    if spec == "-" or kind == "stdin":
        return cfg.model_copy(update={"source": "stdin"})
    if kind == "mic":
        dev: int | str | None = cfg.device
        if arg:
            dev = int(arg) if arg.isdigit() else arg
        return cfg.model_copy(update={"source": "mic", "device": dev})
    if kind == "file" and arg:
        return cfg.model_copy(update={"source": "file", "file": Path(arg)})
    raise AudioSourceError(
        "bad_source", f"--source {spec!r}: expected mic, mic:DEVICE, file:PATH or stdin"
    )


def make_source(cfg: AudioConfig, on_error: ErrorCallback | None = None) -> AudioSource:
    """Build the configured source (imports device libraries only when needed)."""
    if cfg.source == "file":
        from agent.audio.file import FileSource

        if cfg.file is None:
            raise AudioSourceError("bad_source", "audio.source is file but audio.file is unset")
        return FileSource(cfg.file, cfg.block_ms, realtime=cfg.realtime, on_error=on_error)
    if cfg.source == "stdin":
        from agent.audio.stdin import StdinSource

        return StdinSource(cfg.block_ms, rate=cfg.stdin_rate, on_error=on_error)
    from agent.audio.mic import MicSource

    return MicSource(cfg, on_error=on_error)
