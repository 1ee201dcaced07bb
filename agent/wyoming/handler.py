"""One Wyoming client connection: events in, STT/TTS through the application, events out.

Every problem with what a client sends is an `error` event (`code`, `text`) and the
connection goes on: an unknown event type, audio before `audio-start`, an absurd audio format,
an event too large. Audio that follows a refused `audio-start` is dropped quietly until its
`audio-stop` (one error per stream, not one per chunk). A client that goes away mid-stream
takes its transcription or synthesis with it: the recognition stream is abandoned, nothing
more is decoded for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Protocol

from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, SelectProgram
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from agent.asr.schedule import StreamParams
from agent.config import Config, SherpaOfflineAsrConfig
from agent.errors import AgentError, AsrError
from agent.wyoming.errors import WyomingError
from agent.wyoming.framing import Refused, read_event
from agent.wyoming.info import ASR_PROGRAM, TTS_PROGRAM, asr_languages, build_info
from agent.wyoming.pcm import PcmFormat
from agent.wyoming.stt import Transcription
from agent.wyoming.tts import StreamingSynthesis, check_format, select_voice, speak

if TYPE_CHECKING:
    from agent.app.core import App
    from agent.wyoming.config import WyomingConfig
    from agent.wyoming.tts import Voice

log = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 10.0  # a client that reads nothing for this long is dropped


class Host(Protocol):
    """What a connection needs of the server that accepted it (the WyomingService)."""

    app: App
    wcfg: WyomingConfig
    voices: list[Voice]

    def admit(self, handler: WyomingHandler) -> bool:
        """Count a new client in; False when all slots are taken."""
        ...

    def leave(self, handler: WyomingHandler) -> None:
        """The client is gone."""
        ...


def stream_params(cfg: Config, streaming: bool) -> StreamParams:
    """Recognition settings: the live ASR's, partials only when transcripts stream."""
    a = cfg.asr
    if not isinstance(a, SherpaOfflineAsrConfig):
        return StreamParams(partials=streaming)
    return StreamParams(partials=streaming and a.partials,
                        interval_s=a.partial_interval_ms / 1000,
                        min_audio_s=a.partial_min_audio_ms / 1000, segments=a.segments,
                        pause_s=a.segment_pause_ms / 1000, min_segment_s=a.segment_min_s)


def _lang(code: str) -> str:
    return code.replace("-", "_").split("_")[0].lower()


class WyomingHandler(AsyncEventHandler):
    """The protocol state of one client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 service: Host) -> None:
        super().__init__(reader, writer)
        self.service = service
        self.app = service.app
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._write_lock = asyncio.Lock()
        self.request: Transcribe | None = None
        self.stt: Transcription | None = None
        self.tts: StreamingSynthesis | None = None
        self._dropping = False  # audio of a refused stream, until its audio-stop
        self._orphan_said = False  # "audio before audio-start" said once per burst
        self.transcripts = 0
        self.errors = 0

    # -- the connection ---------------------------------------------------------------------

    async def run(self) -> None:
        """Read events (with limits) until the client leaves or the stream cannot go on."""
        self._is_running = True
        try:
            if not self.service.admit(self):
                await self.error(WyomingError("too_many_clients", f"all "
                                 f"{self.service.wcfg.max_clients} Wyoming connections are in "
                                 "use (wyoming.max_clients); try again later"))
                return
            while self._is_running:
                try:
                    event = await read_event(self.reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if event is None:
                    break
                if isinstance(event, Refused):
                    await self.error(WyomingError(event.code, event.message))
                    if event.fatal:
                        break
                    continue
                if not await self.handle_event(event):
                    break
        finally:
            await self.disconnect()
            self.writer.close()
            self.service.leave(self)

    async def write_event(self, event: Event) -> None:
        """Send one event, in order; a client that stops reading is cut off."""
        if self.writer.is_closing():
            raise ConnectionResetError("client gone")
        async with self._write_lock:
            try:
                await asyncio.wait_for(super().write_event(event), WRITE_TIMEOUT_S)
            except TimeoutError:
                log.warning("Wyoming client %s: a write blocked %g s: dropping it", self.peer,
                            WRITE_TIMEOUT_S)
                await self.stop()
                raise ConnectionResetError("slow client") from None

    async def error(self, err: AgentError) -> None:
        """An `error` event; the connection stays."""
        self.errors += 1
        log.info("Wyoming client %s: %s", self.peer, err)
        with contextlib.suppress(ConnectionError):
            await self.write_event(Error(text=err.message, code=err.code).event())

    async def disconnect(self) -> None:
        """The client left (or we hang up): free whatever it was doing."""
        if self.stt is not None:
            self.stt.abandon()
            self.stt = None
        if self.tts is not None:
            self.tts.abandon()
            self.tts = None

    # -- events -----------------------------------------------------------------------------

    async def handle_event(self, event: Event) -> bool:
        """Dispatch one event; AgentErrors become `error` events and the connection goes on."""
        try:
            await self._dispatch(event)
        except ConnectionError:
            return False
        except AgentError as e:
            await self.error(e)
        except (KeyError, TypeError, ValueError) as e:  # a field missing or of the wrong type
            await self.error(WyomingError("bad_event", f"{event.type}: malformed data ({e!r})"))
        except Exception as e:
            log.exception("Wyoming client %s: %s failed", self.peer, event.type)
            await self.error(WyomingError("internal", f"{event.type} failed: {e}", status=500))
        return True

    async def _dispatch(self, event: Event) -> None:
        kind = event.type
        if Describe.is_type(kind):
            await self.write_event(self.info().event())
        elif Ping.is_type(kind):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        elif SelectProgram.is_type(kind):
            name = SelectProgram.from_event(event).name
            if name not in (ASR_PROGRAM, TTS_PROGRAM):
                raise WyomingError("unknown_program", f"no program {str(name)[:80]!r}; programs:"
                                   f" {ASR_PROGRAM}, {TTS_PROGRAM}", status=404)
        elif Transcribe.is_type(kind):
            self.transcribe(Transcribe.from_event(event))
        elif AudioStart.is_type(kind):
            await self.audio_start(event.data)
        elif AudioChunk.is_type(kind):
            self.audio_chunk(event)
        elif AudioStop.is_type(kind):
            await self.audio_stop()
        elif Synthesize.is_type(kind):
            await self.synthesize(Synthesize.from_event(event))
        elif SynthesizeStart.is_type(kind):
            self.synthesize_start(SynthesizeStart.from_event(event))
        elif SynthesizeChunk.is_type(kind):
            if self.tts is None:
                raise WyomingError("not_started", "synthesize-chunk before synthesize-start")
            self.tts.push(SynthesizeChunk.from_event(event).text)
        elif SynthesizeStop.is_type(kind):
            if self.tts is None:
                raise WyomingError("not_started", "synthesize-stop before synthesize-start")
            tts, self.tts = self.tts, None
            await tts.stop()
        else:
            raise WyomingError("unknown_event", f"unknown event type {kind[:64]!r}", status=404)

    def info(self) -> Any:
        """The `info` for what is loaded now."""
        return build_info(self.app.asr_engine, self.service.voices,
                          streaming=self.service.wcfg.streaming)

    # -- speech to text ---------------------------------------------------------------------

    def transcribe(self, req: Transcribe) -> None:
        """Remember the request for the audio that follows."""
        if self.stt is not None:
            raise WyomingError("busy", "a transcription is in progress: send audio-stop first",
                               status=409)
        self.request = req

    def _check_request(self, req: Transcribe | None) -> str | None:
        engine = self.app.asr_engine
        if engine is None:
            raise AsrError("asr_unavailable", "no ASR model is loaded (asr.enabled is false, "
                           "or the model failed to load)")
        if req is None:
            return None
        if req.name not in (None, ASR_PROGRAM, engine.model_id):
            raise WyomingError("unknown_model", f"no ASR model {req.name[:80]!r}; this server "
                               f"has {engine.model_id}", status=404)
        langs = asr_languages(engine)
        if req.language and langs and _lang(req.language) not in {_lang(x) for x in langs}:
            raise WyomingError("unsupported_language", f"{engine.model_id} does not recognise "
                               f"{req.language[:20]!r} (it knows {', '.join(langs)})")
        return _lang(req.language) if req.language else None

    async def audio_start(self, data: dict[str, Any]) -> None:
        """Begin a transcription in the announced format."""
        self._orphan_said = False
        if self.stt is not None:
            raise WyomingError("already_started", "audio-start while a transcription is in "
                               "progress: send audio-stop first", status=409)
        req, self.request = self.request, None
        try:
            fmt = PcmFormat.parse(data, "audio-start")
            language = self._check_request(req)
        except AgentError:
            self._dropping = True  # its chunks and stop are answered by this one error
            raise
        engine = self.app.asr_engine
        assert engine is not None
        w = self.service.wcfg
        self._dropping = False
        self.stt = Transcription(self.app, engine, stream_params(self.app.cfg, w.streaming), fmt,
                                 self.write_event, streaming=w.streaming,
                                 max_audio_s=w.max_audio_s, language=language)
        await self.stt.begin()

    def audio_chunk(self, event: Event) -> None:
        """Feed one chunk (its own format, if it changed)."""
        if self.stt is None:
            if self._dropping or self._orphan_said:
                return
            self._orphan_said = True
            raise WyomingError("not_started", "audio-chunk before audio-start: send "
                               "(transcribe,) audio-start, audio-chunk..., audio-stop")
        fmt = PcmFormat.parse(event.data, "audio-chunk") if "rate" in event.data else None
        self.stt.feed(event.payload or b"", fmt)

    async def audio_stop(self) -> None:
        """The end of the audio: the transcript."""
        self._orphan_said = False
        if self.stt is None:
            if self._dropping:
                self._dropping = False
                return
            raise WyomingError("not_started", "audio-stop before audio-start")
        stt = self.stt
        try:
            await stt.finish()
            self.transcripts += 1
        except BaseException:
            stt.abandon()  # nothing of it may go on decoding
            raise
        finally:
            self.stt = None

    # -- text to speech ---------------------------------------------------------------------

    async def synthesize(self, req: Synthesize) -> None:
        """The whole text in one audio stream (ignored inside a streaming request)."""
        if self.tts is not None:
            return  # the copy a streaming client sends for servers that cannot stream
        check_format(req.text_format)
        if not req.text.strip():
            raise WyomingError("empty_text", "nothing to say: the text is empty")
        voice = select_voice(self.service.voices, req.voice)
        await speak(voice, [req.text], self.write_event)

    def synthesize_start(self, req: SynthesizeStart) -> None:
        """Begin a streaming synthesis."""
        if self.tts is not None:
            raise WyomingError("already_started", "synthesize-start while a synthesis is in "
                               "progress: send synthesize-stop first", status=409)
        check_format(req.text_format)
        voice = select_voice(self.service.voices, req.voice)
        self.tts = StreamingSynthesis(voice, self.write_event, self.error)
