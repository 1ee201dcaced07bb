"""Every capability's commands on one App: `create_app` is how an application is made."""

from __future__ import annotations

from agent.app import asr, emotion, ptt, reply_commands, speaker
from agent.app.core import App
from agent.audio.base import AudioSource
from agent.config import Config

#: Each capability adds its registry entries (and nothing else) to a new App.
CAPABILITIES = (ptt.register, asr.register, emotion.register, reply_commands.register,
                speaker.register)


def create_app(cfg: Config, source: AudioSource | None = None,
               vad_name: str | None = None) -> App:
    """An App with every capability's commands registered."""
    app = App(cfg, source=source, vad_name=vad_name)
    for register in CAPABILITIES:
        register(app)
    return app
