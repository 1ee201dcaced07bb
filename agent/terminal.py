"""The terminal front-end: a live line per utterance, and push-to-talk on Enter or Space.

Shown only when stdout is a terminal; the keyboard gate only when stdin is one too and is not
the audio source. Commands go through the registry like every other surface's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any, TextIO

from agent.app.commands import CallContext
from agent.app.core import App
from agent.app.service import Service
from agent.errors import AgentError
from agent.events import (
    AsrFinal,
    AsrPartial,
    BaseEvent,
    EmotionDetected,
    SpeakerIdentified,
    StateChanged,
    UtteranceStarted,
)

log = logging.getLogger(__name__)

LINE_EVENTS = ("utterance.started", "asr.partial", "asr.final", "speaker.identified",
               "emotion.detected", "state.changed")
KEYS = (b"\n", b"\r", b" ")


class _Line:
    """What one utterance's line shows."""

    def __init__(self, utterance_id: str | None) -> None:
        self.utterance_id = utterance_id
        self.text = ""
        self.final = False
        self.latency_ms: float | None = None
        self.speaker: str | None = None
        self.emotion: str | None = None

    def render(self, width: int | None) -> str:
        """The line as it stands (cut to `width` from the left, unless None)."""
        tags = []
        if self.speaker:
            tags.append(self.speaker)
        if self.emotion:
            tags.append(self.emotion)
        head = f"[{', '.join(tags)}] " if tags else ""
        if self.final:
            tail = f"  ({self.latency_ms:.0f} ms)" if self.latency_ms is not None else ""
            body = f"> {head}{self.text or '(no words)'}{tail}"
        else:
            body = f"… {head}{self.text}"
        return body if width is None or len(body) <= width else "…" + body[-(width - 1):]


class TerminalService(Service):
    """Renders utterances in place and, in ptt mode, turns Enter/Space into the gate."""

    name = "terminal"

    def __init__(self, app: App, *, live: bool = True, keyboard: bool = True,
                 out: TextIO | None = None, stdin_fd: int | None = None) -> None:
        super().__init__(app)
        self.out = out or sys.stdout
        self.live = live
        self.keyboard = keyboard and app.cfg.gate.mode != "vad"
        self.stdin_fd = stdin_fd if stdin_fd is not None else 0
        self.sub = app.bus.subscribe(app.cfg.events.queue_size, types=LINE_EVENTS,
                                     name="terminal") if live else None
        self.line: _Line | None = None
        self._saved: list[Any] | None = None

    def describe(self) -> str | None:
        """The keyboard hint."""
        if self.keyboard:
            verb = "toggle" if self.app.cfg.gate.mode == "ptt_toggle" else "start"
            return f"press Enter or Space to {verb} talking, again to stop (Ctrl-C quits)"
        return None

    # -- rendering --------------------------------------------------------------------------

    def _width(self) -> int:
        try:
            cols = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError, AttributeError):
            cols = 0
        return max(20, cols - 1) if cols else 100  # a pty may report 0 columns

    def _draw(self) -> None:
        line = self.line
        if line is None:
            return
        width = self._width()
        full = line.render(None)
        if line.final and len(full) > width:
            # A long final is shown whole (it may wrap); the line is done then.
            self.out.write("\r\033[K" + full + "\n")
            self.line = None
        else:
            self.out.write("\r\033[K" + line.render(width))
        self.out.flush()

    def _end_line(self) -> None:
        if self.line is not None:
            self.out.write("\n")
            self.out.flush()
            self.line = None

    def apply(self, ev: BaseEvent) -> None:
        """Update the live line from one event."""
        if isinstance(ev, UtteranceStarted):
            self._end_line()
            self.line = _Line(ev.utterance_id)
            return
        if isinstance(ev, StateChanged):
            return
        line = self.line
        if line is None or ev.utterance_id != line.utterance_id:
            if isinstance(ev, (AsrPartial, AsrFinal)):
                self._end_line()
                line = self.line = _Line(ev.utterance_id)
            else:
                return
        if isinstance(ev, AsrPartial) and not line.final:
            line.text = ev.text
        elif isinstance(ev, AsrFinal):
            line.text, line.final, line.latency_ms = ev.text, True, ev.eos_to_final_ms
        elif isinstance(ev, SpeakerIdentified):
            # With nobody enrolled every line would say "unknown": that says nothing.
            if ev.is_match or ev.reason != "no_voiceprints":
                line.speaker = ev.name if ev.is_match else "unknown"
        elif isinstance(ev, EmotionDetected):
            line.emotion = ev.label
        self._draw()

    # -- keyboard ---------------------------------------------------------------------------

    def _cbreak(self) -> None:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.stdin_fd)
        tty.setcbreak(self.stdin_fd)  # keys arrive at once; Ctrl-C still interrupts

    def _restore(self) -> None:
        if self._saved is not None:
            import termios

            with contextlib.suppress(OSError):
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _on_key(self) -> None:
        try:
            data = os.read(self.stdin_fd, 64)
        except OSError:
            return
        if any(k in data for k in KEYS):
            name = "ptt/stop" if self.app.gate.is_open else "ptt/start"
            asyncio.get_running_loop().create_task(self._command(name))

    async def _command(self, name: str) -> None:
        try:
            await self.app.commands.dispatch(name, {}, CallContext(surface="cli"))
        except AgentError as e:
            self._end_line()
            print(f"{name}: {e.message}", file=self.out, flush=True)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the daemon stops."""
        loop = asyncio.get_running_loop()
        reading = False
        if self.keyboard:
            try:
                self._cbreak()
                loop.add_reader(self.stdin_fd, self._on_key)
                reading = True
            except (OSError, ImportError, NotImplementedError) as e:
                log.warning("keyboard push-to-talk unavailable: %s", e)
        try:
            if self.sub is not None:
                with self.sub:
                    async for ev in self.sub:
                        self.apply(ev)
            else:
                await self.app.stopped.wait()
        finally:
            if reading:
                loop.remove_reader(self.stdin_fd)
            self._restore()
            self._end_line()
