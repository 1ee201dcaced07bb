"""Validated configuration: pydantic models, YAML loading, env overrides, readable errors."""

from __future__ import annotations

import os
import re
import socket
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.constants import CAPTURE_RATES, PIPELINE_RATE
from agent.errors import ConfigError

ENV_PREFIX = "VOICE_AGENT__"
_ORIGIN = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?/?$")


def _default_device_id() -> str:
    """Hostname slug: safe in MQTT topics and URLs."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().lower()).strip("-")
    return slug or "voice-agent"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AudioConfig(_Model):
    """Where audio comes from and how it is chunked."""

    source: Literal["mic", "file", "stdin"] = "mic"
    device: int | str | None = None
    sample_rate: int | None = None
    channels: int | None = Field(default=None, ge=1, le=32)
    block_ms: Literal[10, 20, 30] = 30
    file: Path | None = None
    realtime: bool = True
    stdin_rate: int = PIPELINE_RATE
    queue_chunks: int = Field(default=200, ge=4, le=100_000)
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    stall_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("sample_rate", "stdin_rate")
    @classmethod
    def _rate(cls, v: int | None) -> int | None:
        if v is not None and v not in CAPTURE_RATES:
            raise ValueError("must be one of " + ", ".join(map(str, CAPTURE_RATES)))
        return v


class WebrtcVadConfig(_Model):
    """Google WebRTC VAD (GMM): tiny and fast, weaker in noise."""

    backend: Literal["webrtc"] = "webrtc"
    aggressiveness: int = Field(default=2, ge=0, le=3)
    frame_ms: Literal[10, 20, 30] = 30


class SileroVadConfig(_Model):
    """Silero VAD (small neural net, ONNX): robust in noise."""

    backend: Literal["silero"] = "silero"
    threshold: float = Field(default=0.5, gt=0, lt=1)
    model: Path | None = None


VadConfig = Annotated[WebrtcVadConfig | SileroVadConfig, Field(discriminator="backend")]


class SegmenterConfig(_Model):
    """How VAD decisions become utterances."""

    min_speech_ms: int = Field(default=120, ge=0, le=5000)
    min_silence_ms: int = Field(default=700, ge=0, le=10_000)
    max_utterance_s: float = Field(default=20.0, gt=0.5, le=300)
    pre_roll_ms: int = Field(default=150, ge=0, le=2000)
    post_roll_ms: int = Field(default=100, ge=0, le=2000)


class _AsrCommon(_Model):
    enabled: bool = True
    # A model id from models_onnx/manifest.yaml (`voice-agent models list`) ...
    model: str = "whisper-tiny.en-int8"
    # ... or a directory holding the model files (e.g. an official sherpa-onnx release).
    model_dir: Path | None = None
    quantized: bool = True  # prefer *.int8.onnx files when both are present
    threads: int = Field(default=2, ge=1, le=64)


class SherpaOfflineAsrConfig(_AsrCommon):
    """Non-streaming models (Whisper, SenseVoice, paraformer) with re-decoded partials."""

    backend: Literal["sherpa-offline"] = "sherpa-offline"
    model_type: Literal["whisper", "sense_voice", "paraformer"] = "whisper"
    language: str = "en"  # whisper: en, zh, de, ...; "" lets a multilingual model detect it
    tail_paddings: int = Field(default=-1, ge=-1, le=3000)  # whisper: frames; -1 = sherpa's
    partials: bool = True
    partial_interval_ms: int = Field(default=400, ge=50, le=10_000)
    partial_min_audio_ms: int = Field(default=300, ge=0, le=10_000)
    # Close sub-segments at the speaker's pauses and decode them while speech goes on, so a
    # long sentence's final costs only its tail; false: decode the whole utterance at the end.
    segments: bool = True
    segment_pause_ms: int = Field(default=150, ge=90, le=5000)
    segment_min_s: float = Field(default=0.8, ge=0.5, le=28)


class SherpaOnlineAsrConfig(_AsrCommon):
    """True streaming models (transducer, paraformer, zipformer2-CTC)."""

    backend: Literal["sherpa-online"] = "sherpa-online"
    model: str = "streaming-zipformer-bilingual-zh-en"
    model_type: Literal["transducer", "paraformer", "zipformer2_ctc"] = "transducer"
    decoding_method: Literal["greedy_search", "modified_beam_search"] = "greedy_search"


AsrConfig = Annotated[SherpaOfflineAsrConfig | SherpaOnlineAsrConfig,
                      Field(discriminator="backend")]


class GateConfig(_Model):
    """Push-to-talk gate: which audio is speech for the agent."""

    mode: Literal["ptt", "ptt_toggle", "vad"] = "ptt"
    max_hold_s: float = Field(default=60.0, gt=0, le=3600)


class EventsConfig(_Model):
    """Event bus limits."""

    queue_size: int = Field(default=1000, ge=10, le=1_000_000)


class MqttConfig(_Model):
    """MQTT front-end: events out, commands in, availability, Home Assistant discovery."""

    enabled: bool = False
    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    client_id: str | None = None  # None: voice-agent-<device_id>
    topic_prefix: str | None = None  # None: voice-agent/<device_id>
    tls: bool = False  # TLS with the system CAs; implied by ca_file
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False  # skip the host name check (lab brokers only)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    event_qos: Literal[0, 1, 2] = 1
    partial_qos: Literal[0, 1, 2] = 0
    outbox_size: int = Field(default=10_000, ge=10, le=1_000_000)
    outbox_persist: bool = True
    reconnect_initial_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    shutdown_flush_s: float = Field(default=5.0, ge=0, le=300)
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    # "5" tells retained commands (and their clearing) from live ones whenever they arrive;
    # "3.1.1" only those replayed at subscribe. "5" falls back to 3.1.1 by itself.
    protocol: Literal["3.1.1", "5"] = "5"
    configuration_url: str | None = None  # in HA's device page; None: the kiosk URL
    support_url: str | None = None  # None: the project's home page

    @field_validator("topic_prefix", "discovery_prefix")
    @classmethod
    def _topic_prefix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip("/")
        if not v or any(c in v for c in "+#\0") or "//" in v:
            raise ValueError("must be a non-empty MQTT topic without wildcards (+ #)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the client certificate)")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


class ApiConfig(_Model):
    """Local HTTP + WebSocket API and the kiosk page."""

    enabled: bool = True  # on loopback by default: the kiosk is how a new user sees the daemon
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)  # 0: any free port (logged)
    key: SecretStr | None = None
    max_body_mb: float = Field(default=20.0, gt=0, le=1024)
    max_audio_s: float = Field(default=300.0, gt=0, le=3600)
    # Decoding work one upload may cause: input samples (frames x channels) before resampling.
    max_decode_samples: int = Field(default=300 * 48_000 * 2, ge=16_000, le=2**34)
    # bench/ws_asr.py (2 cores): stop -> final p95 holds at ~3.3x one stream up to 8 streams
    # (partials shed), then collapses (9.8x at 16): more are refused, not all slowed.
    max_asr_sessions: int = Field(default=8, ge=0, le=1024)
    asr_partials: bool = True
    asr_partial_interval_ms: int = Field(default=400, ge=50, le=10_000)
    asr_final_from_partial: bool = True
    asr_max_utterance_s: float = Field(default=30.0, ge=1, le=300)
    ws_queue_size: int = Field(default=256, ge=8, le=100_000)
    ws_send_timeout_s: float = Field(default=5.0, gt=0, le=600)
    ws_heartbeat_s: float = Field(default=20.0, gt=0, le=3600)
    kiosk: bool = True
    # Host names the API answers to besides loopback names and IP literals (DNS rebinding);
    # e.g. ["kiosk.local", "*.home.arpa"]; "*" = any.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Other sites' origins allowed to call the API from a browser (CORS), e.g.
    # ["https://dash.example:3000"]; the daemon's own pages need nothing here.
    cors_origins: list[str] = Field(default_factory=list)
    # Open connections at most (kept under the open-file limit); past it the oldest idle one
    # is closed, else the newcomer gets 503.
    max_connections: int = Field(default=256, ge=8, le=65_536)
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)  # headers, and keep-alive idle
    body_timeout_s: float = Field(default=60.0, gt=0, le=3600)  # the whole body, else 408

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if not _ORIGIN.match(o)]
        if bad:
            raise ValueError(f"not an origin (scheme://host[:port], no path): {bad}")
        return [o.lower().rstrip("/") for o in v]

    @field_validator("key")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            # An empty key would look like auth is on while it checks nothing.
            raise ValueError("empty key: use null to turn authentication off")
        return v


class DashscopeConfig(_Model):
    """Alibaba DashScope: the cloud LLM and TTS for replies."""

    api_key: SecretStr | None = None  # secret: VOICE_AGENT__DASHSCOPE__API_KEY (or the
    # DASHSCOPE_API_KEY variable the SDK uses)
    base_url: str | None = None  # HTTP API; null = https://dashscope.aliyuncs.com/api/v1
    ws_url: str | None = None  # TTS WebSocket; null = wss://dashscope.aliyuncs.com/api-ws/v1/inference
    retries: int = Field(default=2, ge=0, le=10)  # before any text/audio: 429, 5xx, unreachable
    backoff_initial_s: float = Field(default=0.25, gt=0, le=30)
    backoff_max_s: float = Field(default=2.0, gt=0, le=120)


class LlmConfig(_Model):
    """The reply's language model."""

    model: str = "qwen-turbo"
    system_prompt: str = ("You are a concise voice assistant for a home or office. Answer in "
                          "one or two short sentences, in the language you are spoken to.")
    first_text_timeout_s: float = Field(default=8.0, gt=0, le=120)
    idle_timeout_s: float = Field(default=10.0, gt=0, le=300)
    parameters: dict[str, Any] = Field(default_factory=dict)  # passed through (temperature...)


class CosyVoiceConfig(_Model):
    """DashScope CosyVoice streaming TTS."""

    model: str = "cosyvoice-v2"
    voice: str = "longxiaochun_v2"
    sample_rate: Literal[8000, 16000, 22050, 24000, 44100, 48000] = 16000
    volume: int = Field(default=50, ge=0, le=100)
    speech_rate: float = Field(default=1.0, ge=0.5, le=2.0)
    pitch_rate: float = Field(default=1.0, ge=0.5, le=2.0)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    first_audio_timeout_s: float = Field(default=8.0, gt=0, le=120)
    idle_timeout_s: float = Field(default=10.0, gt=0, le=300)


class PiperConfig(_Model):
    """The local Piper voice (works with no cloud at all)."""

    model: str = "piper-joe-us"
    length_scale: float | None = Field(default=None, gt=0.1, le=5)  # null: the voice's own
    volume: float = Field(default=1.0, gt=0, le=4)


class ReplyConfig(_Model):
    """Spoken replies: LLM text -> sentence chunks -> TTS -> speaker and kiosks."""

    enabled: bool = False  # a final transcript triggers a reply (needs a DashScope key)
    tts: Literal["cosyvoice", "piper"] = "cosyvoice"  # piper: local voice, no cloud
    offline_text: str = "Sorry, I can't reach the cloud right now."
    chunk_min_weight: int = Field(default=8, ge=1, le=200)
    chunk_max_weight: int = Field(default=160, ge=20, le=2000)
    history_turns: int = Field(default=6, ge=0, le=100)
    history_idle_s: float = Field(default=300.0, gt=0)
    conversation: Literal["device", "speaker"] = "device"  # whose history a reply continues
    # half: while the daemon speaks, the VAD ignores the microphone (PTT still barges in);
    # full: needs an echo-cancelled source (PulseAudio/PipeWire module-echo-cancel).
    duplex: Literal["half", "full"] = "half"
    # Half duplex: the mic stays muted this long after the speaker's last sample (echo).
    echo_tail_ms: int = Field(default=300, ge=0, le=3000)
    llm: LlmConfig = LlmConfig()
    cosyvoice: CosyVoiceConfig = CosyVoiceConfig()
    piper: PiperConfig = PiperConfig()


class PlaybackConfig(_Model):
    """The local speaker for replies (sounddevice output, resampled with soxr)."""

    enabled: bool = True
    device: int | str | None = None  # index or name substring; null = system default
    sample_rate: int | None = None  # null: the device default
    block_ms: int = Field(default=10, ge=2, le=100)
    latency_s: float = Field(default=0.03, gt=0, le=1)
    buffer_s: float = Field(default=2.0, gt=0.1, le=60)


class EmotionConfig(_Model):
    """Speech emotion on every utterance."""

    enabled: bool = True
    models: list[str] = Field(default_factory=lambda: ["ser-ravdess-cnn-int8"], min_length=1)
    threads: int = Field(default=1, ge=1, le=16)  # ONNX intra-op threads per call
    min_audio_s: float = Field(default=0.25, ge=0.05, le=5)  # shorter: too_short
    session_window_s: float = Field(default=300.0, gt=0)  # vad mode: a summary per window
    max_sessions: int = Field(default=1000, ge=1, le=1_000_000)
    sense_voice_from_asr: bool = True  # SenseVoice's own emotion tag joins the ensemble


class SpeakerConfig(_Model):
    """Speaker recognition: voiceprints, the speaker of every utterance, diarization."""

    enabled: bool = True
    model: str = "ge2e-resemblyzer"  # a manifest id; its backend (ge2e, sherpa-speaker) follows
    threshold: float | None = Field(default=None, ge=-1, le=1)  # cosine; null: the model's own
    min_speech_s: float = Field(default=0.5, ge=0.1, le=10)  # less: too_short
    max_audio_s: float = Field(default=30.0, gt=1, le=600)
    min_enrol_speech_s: float = Field(default=8.0, ge=0, le=120)  # a voiceprint with less: warned
    top_k: int = Field(default=3, ge=1, le=100)
    threads: int = Field(default=1, ge=1, le=16)
    diarize_threshold: float = Field(default=0.55, ge=-1, le=1)
    diarize_hop_s: float = Field(default=0.4, gt=0.05, le=5)
    # Only these speakers may trigger commands and replies (names or ids); [] with
    # `gate_actions` on means any enrolled speaker.
    gate_actions: bool = False
    allowed: list[str] = Field(default_factory=list)


class WyomingConfig(_Model):
    """Wyoming protocol server for Home Assistant Assist (STT and TTS)."""

    enabled: bool = False
    # Wyoming has no authentication: whoever reaches the port can use STT/TTS. Home Assistant
    # usually runs on another machine, hence all interfaces; 127.0.0.1 keeps it local.
    host: str = "0.0.0.0"
    port: int = Field(default=10300, ge=0, le=65535)  # 0: any free port (logged)
    zeroconf: bool = True  # advertise _wyoming._tcp.local. so Home Assistant finds it
    zeroconf_name: str | None = None  # None: voice-agent-<device_id>
    max_clients: int = Field(default=16, ge=1, le=1024)
    streaming: bool = True  # transcript-start/-chunk/-stop around the transcript
    max_audio_s: float = Field(default=300.0, gt=0, le=3600)  # past it: audio_too_long
    tts: bool = True  # serve the local Piper voice (reply.piper)


class RuntimeConfig(_Model):
    """The decode runner: model calls run in worker threads, never on the event loop."""

    # Model calls in flight at once, daemon-wide (null: one per CPU core).
    decode_workers: int | None = Field(default=None, ge=1, le=64)
    # Upload requests (transcribe, analyze) queued at once; past it: 503 with Retry-After.
    upload_queue: int = Field(default=32, ge=1, le=10_000)
    # Execution provider for every ONNX model: cpu, cuda or tensorrt (NVIDIA GPU, Jetson).
    # Unavailable: one warning, then the next one down (tensorrt -> cuda -> cpu) ...
    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    # ... or, with strict, the model fails to load (model/provider_unavailable).
    strict: bool = False
    gpu_device: int = Field(default=0, ge=0, le=63)
    trt_cache_dir: Path | None = None  # TensorRT engine cache; null: <state_dir>/trt-cache


class RateConfig(_Model):
    """A token bucket: `rate_per_s` on average, bursts of `burst` (0 = unlimited)."""

    rate_per_s: float = Field(default=10.0, ge=0)
    burst: float = Field(default=40.0, ge=1)


class LimitsConfig(_Model):
    """Per-client rate limits on registry commands (every surface)."""

    default: RateConfig = RateConfig()
    # Loopback clients (the kiosk on this machine, local scripts) get this many times more.
    loopback_factor: float = Field(default=10.0, ge=1)
    per_command: dict[str, RateConfig] = Field(
        default_factory=lambda: {"asr/transcribe": RateConfig(rate_per_s=2.0, burst=20)})


class Config(_Model):
    """The whole daemon configuration (see agent.yaml for every key, commented)."""

    device_id: str = Field(default_factory=_default_device_id, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    state_dir: Path = Path("~/.local/state/voice-agent")
    audio: AudioConfig = AudioConfig()
    vad: VadConfig = WebrtcVadConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    gate: GateConfig = GateConfig()
    asr: AsrConfig = SherpaOfflineAsrConfig()
    events: EventsConfig = EventsConfig()
    mqtt: MqttConfig = MqttConfig()
    api: ApiConfig = ApiConfig()
    wyoming: WyomingConfig = WyomingConfig()
    speaker: SpeakerConfig = SpeakerConfig()
    emotion: EmotionConfig = EmotionConfig()
    reply: ReplyConfig = ReplyConfig()
    playback: PlaybackConfig = PlaybackConfig()
    dashscope: DashscopeConfig = DashscopeConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_backends(cls, data: Any) -> Any:
        """`vad: {aggressiveness: 1}` means the default backend, as the docs show it."""
        if isinstance(data, dict):
            for key, backend in (("vad", "webrtc"), ("asr", "sherpa-offline")):
                section = data.get(key)
                if isinstance(section, dict) and "backend" not in section:
                    data = {**data, key: {"backend": backend, **section}}
        return data


# Config paths whose values are model ids from models_onnx/manifest.yaml, each with the key
# that overrides the id with a directory (None: no such key). Sections whose `enabled` is
# false are not checked. Sections that take model ids add theirs here.
MODEL_ID_FIELDS: dict[str, str | None] = {"asr.model": "model_dir", "emotion.models": None,
                                          "speaker.model": None, "reply.piper.model": None}
# What an environment variable can hold that YAML would read as "no value".
_NULLISH = frozenset({"~", "null"})


def _types_in(annotation: Any) -> list[Any]:
    """The classes inside a field annotation (through Optional, unions and Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _types_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _types_in(a)]
    return [annotation]


def _secret_paths(model: type[BaseModel] = Config, prefix: str = "") -> frozenset[str]:
    """Dotted paths of every SecretStr field, e.g. `api.key`, `mqtt.password`."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        for t in _types_in(info.annotation):
            if t is SecretStr:
                out.add(prefix + name)
            elif isinstance(t, type) and issubclass(t, BaseModel):
                out |= _secret_paths(t, f"{prefix}{name}.")
    return frozenset(out)


SECRET_PATHS = _secret_paths()


def _env_overrides(env: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    """`VOICE_AGENT__AUDIO__SAMPLE_RATE=48000` -> (["audio", "sample_rate"], 48000, name).

    Values are YAML scalars (numbers and booleans arrive typed), except secrets: those are
    taken as the plain string they are (`123456` is a password, `0123` is not octal), only
    unwrapped when the whole value is quoted (`'...'`, as YAML would have read it).
    """
    out: list[tuple[list[str], Any, str]] = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        if ".".join(path) in SECRET_PATHS:
            quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
            out.append((path, raw[1:-1] if quoted else raw, name))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw
        out.append((path, value, name))
    return out


def _secret_problems(overrides: list[tuple[list[str], Any, str]]
                     ) -> tuple[list[str], list[str]]:
    """An empty secret variable would silently turn its feature's protection off.

    Returns the problems and the variables at fault.
    """
    problems, names = [], []
    for path, value, name in overrides:
        dotted = ".".join(path)
        if dotted in SECRET_PATHS and (value == "" or value.strip().lower() in _NULLISH):
            names.append(name)
            problems.append(f"{dotted}: {name} is set but empty (or null): unset the variable "
                            "to keep the file's value; to turn it off, set it to null in the "
                            "config file")
    return problems, names


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def _loc_to_path(loc: tuple[int | str, ...], data: Any) -> str:
    """Turn a pydantic error location into a YAML path, skipping union tags."""
    parts: list[str] = []
    node = data
    for i, elem in enumerate(loc):
        if isinstance(node, dict) and elem in node:
            parts.append(str(elem))
            node = node[elem]
        elif isinstance(node, list) and isinstance(elem, int) and elem < len(node):
            parts.append(f"[{elem}]")
            node = node[elem]
        elif i < len(loc) - 1 and isinstance(elem, str) and isinstance(node, dict):
            # Discriminated unions insert the tag (e.g. "webrtc") into the location.
            continue
        else:
            parts.append(str(elem))
            node = None
    return ".".join(parts).replace(".[", "[") or "(root)"


def _env_names(path: str, origins: Mapping[str, str]) -> list[str]:
    """The variables that set `path`, something under it, or a section above it."""
    return [name for p, name in origins.items()
            if p == path or p.startswith(path + ".") or path.startswith(p + ".")
            or path.startswith(p + "[")]


def format_errors(exc: ValidationError, data: Any,
                  origins: Mapping[str, str] | None = None) -> list[str]:
    """One line per problem: `yaml.path: reason (got value; set by VOICE_AGENT__...)`.

    `origins` maps dotted paths to the environment variables that set them. A secret's
    value is never shown.
    """
    problems = []
    for err in exc.errors():
        path = _loc_to_path(tuple(err["loc"]), data)
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required"
        inp = err.get("input")
        notes = []
        if err["type"] not in ("missing", "extra_forbidden") and not isinstance(inp, (dict, list)):
            secret = path in SECRET_PATHS or any(path.startswith(p + ".") for p in SECRET_PATHS)
            notes.append("value hidden: a secret" if secret else f"got {inp!r}")
            if secret and err["type"] == "string_type":
                msg += ": quote it in YAML"
        names = _env_names(path, origins or {})
        if names:
            notes.append("set by " + ", ".join(names))
        problems.append(f"{path}: {msg}" + (f" ({'; '.join(notes)})" if notes else ""))
    return problems


def _config_error(problems: list[str], sources: list[str]) -> ConfigError:
    err = ConfigError("invalid", "\n".join(problems))
    err.problems = problems  # type: ignore[attr-defined]
    # What the CLI names in its header: the file, or the variables that are wrong.
    err.source = ", ".join(dict.fromkeys(sources))  # type: ignore[attr-defined]
    return err


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load YAML (or embedded defaults), apply env overrides, validate; raise ConfigError."""
    env = os.environ if env is None else env
    data: Any = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("unreadable", f"{p}: cannot read: {e.strerror or e}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError("yaml", f"{p}: {where}{problem}") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("yaml", f"{p}: top level must be a mapping of sections")
    overrides = _env_overrides(env)
    origins = {".".join(key_path): name for key_path, _, name in overrides}
    problems, sources = _secret_problems(overrides)
    for key_path, value, name in overrides:
        if name not in sources:  # an empty secret is reported once, above
            _apply(data, key_path, value)
    where = str(path) if path is not None else "embedded defaults"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        for line in format_errors(e, data, origins):
            problems.append(line)
            names = _env_names(line.split(":", 1)[0], origins)
            sources += names or [where]
        raise _config_error(problems, sources) from None
    if problems:
        raise _config_error(problems, sources)
    return cfg


def model_id_problems(cfg: Config, known: Collection[str]) -> list[str]:
    """One line per configured model id that the manifest does not know."""
    problems = []
    for dotted, override in MODEL_ID_FIELDS.items():
        *section_path, key = dotted.split(".")
        section: Any = cfg
        for part in section_path:
            section = getattr(section, part, None)
        if section is None or getattr(section, "enabled", True) is False:
            continue
        if override and getattr(section, override, None) is not None:
            continue  # a directory given: the id is only a label
        value = getattr(section, key, None)
        for model_id in ([value] if isinstance(value, str) else list(value or [])):
            if model_id not in known:
                problems.append(f"{dotted}: unknown model id {model_id!r}; known: "
                                f"{', '.join(sorted(known))} (`voice-agent models list`), or "
                                + (f"set {'.'.join(section_path)}.{override} to a directory"
                                   if override else "add it to models_onnx/manifest.yaml"))
    return problems


def check_model_ids(cfg: Config, known: Collection[str]) -> None:
    """ConfigError (`check-config`, `run`) when a configured model id is not in the manifest."""
    problems = model_id_problems(cfg, known)
    if problems:
        raise _config_error(problems, [])
