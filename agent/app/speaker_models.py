"""Payloads and results of the speaker commands (`agent/app/speaker.py`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from agent.app.asr import TranscribeRequest
from agent.app.commands import Payload
from agent.speaker.store import Speaker

#: Test clips in one `speakers/verify_batch` request.
MAX_BATCH = 32
#: Live utterances one registration may wait for.
MAX_LIVE_UTTERANCES = 10
SPEAKER_ID = Field(min_length=1, max_length=64, description="the speaker's id (32 hex digits)")
B64 = "base64 of a WAV/FLAC/MP3/OGG (others via ffmpeg) file; a data: URL prefix is allowed"


# ---- payloads ---------------------------------------------------------------------------------


class RegisterRequest(TranscribeRequest):
    """A new speaker, from a recording (a file or base64 `audio`) or the next live utterances."""

    name: str = Field(min_length=1, max_length=100)
    user_id: str | None = Field(default=None, max_length=128)
    email: str | None = Field(default=None, max_length=254)
    metadata: dict[str, Any] | None = Field(default=None, description="a JSON object, <= 16 kB")
    utterances: int | None = Field(
        default=None, ge=1, le=MAX_LIVE_UTTERANCES,
        description="instead of a recording: enrol from the next N live utterances")
    timeout_s: float = Field(default=60.0, gt=0, le=600,
                             description="how long to wait for the live utterances")


class SampleRequest(TranscribeRequest):
    """Another recording of an enrolled speaker."""

    speaker_id: str = SPEAKER_ID


class IdentifyRequest(TranscribeRequest):
    """A recording to identify."""

    top_k: int | None = Field(default=None, ge=1, le=100,
                              description="candidates returned (default speaker.top_k)")


class VerifyRequest(TranscribeRequest):
    """A test recording, against a second recording (`reference`) or an enrolled speaker."""

    reference: str | None = Field(default=None, description=B64)
    speaker_id: str | None = Field(default=None, min_length=1, max_length=64)


class Clip(Payload):
    """One test clip of a batch."""

    audio: str = Field(description=B64)
    name: str | None = Field(default=None, max_length=200, description="echoed back")


class VerifyBatchRequest(Payload):
    """One reference (a recording or an enrolled speaker) against many test clips."""

    reference: str | None = Field(default=None, description=B64)
    speaker_id: str | None = Field(default=None, min_length=1, max_length=64)
    tests: list[Clip] = Field(min_length=1, max_length=MAX_BATCH)


class SpeakerIdRequest(Payload):
    """Which speaker."""

    speaker_id: str = SPEAKER_ID


class UpdateRequest(Payload):
    """Fields to change; `clear` empties user_id, email or metadata."""

    speaker_id: str = SPEAKER_ID
    name: str | None = Field(default=None, min_length=1, max_length=100)
    user_id: str | None = Field(default=None, max_length=128)
    email: str | None = Field(default=None, max_length=254)
    metadata: dict[str, Any] | None = None
    clear: list[Literal["user_id", "email", "metadata"]] = Field(default_factory=list)


class DiarizeRequest(TranscribeRequest):
    """A recording to split into speaker turns."""

    num_speakers: int | None = Field(default=None, ge=1, le=32,
                                     description="when known; otherwise a threshold decides")


# ---- results ----------------------------------------------------------------------------------


class ModelSamples(BaseModel):
    """A speaker's samples of one model."""

    samples: int
    speech_s: float


class SpeakerInfo(BaseModel):
    """An enrolled speaker (never its embeddings)."""

    id: str
    name: str
    user_id: str | None
    email: str | None
    metadata: dict[str, Any]
    created: float
    updated: float
    samples: int
    models: dict[str, ModelSamples]

    @classmethod
    def of(cls, sp: Speaker) -> SpeakerInfo:
        """From the store's record."""
        return cls.model_validate(sp.to_dict())


class Quality(BaseModel):
    """Whether the voiceprint has enough speech to recognise reliably."""

    speech_s: float
    samples: int
    ok: bool
    min_speech_s: float
    warning: str | None


class SampleInfo(BaseModel):
    """What one recording contributed."""

    audio_s: float
    speech_s: float
    utterance_id: str | None = None  # live enrolment: the utterance it came from


class Timings(BaseModel):
    """Where the time went, in ms."""

    upload_ms: float | None = None
    audio_decode_ms: float | None = None
    compute_ms: float
    total_ms: float


class EnrolResult(BaseModel):
    """The speaker after `register` or `add_sample`, with the enrolment-quality verdict."""

    speaker: SpeakerInfo
    model: str
    quality: Quality
    warning: str | None  # = quality.warning: too little speech behind the voiceprint
    added: list[SampleInfo]
    skipped_utterances: int = 0  # live enrolment: utterances with too little speech
    timings: Timings


class Candidate(BaseModel):
    """One identification candidate."""

    speaker_id: str
    name: str
    score: float
    is_match: bool


class IdentifyResult(BaseModel):
    """Who is speaking: the best match, or `unknown`."""

    speaker_id: str | None
    name: str
    score: float
    is_match: bool
    threshold: float
    model: str
    candidates: list[Candidate]
    audio_s: float
    speech_s: float
    timings: Timings


class VerifyResult(BaseModel):
    """1:1 verification."""

    similarity: float
    is_match: bool
    result: Literal["accept", "reject"]
    threshold: float
    model: str
    speaker_id: str | None = None  # when verified against an enrolled speaker
    name: str | None = None
    audio_s: float
    speech_s: float
    reference_speech_s: float | None = None  # when the reference was a recording
    processing_time_ms: float
    timings: Timings


class ClipError(BaseModel):
    """Why one clip failed."""

    code: str
    message: str


class VerifyOutcome(BaseModel):
    """One test clip against the reference."""

    index: int
    name: str | None = None
    ok: bool
    similarity: float | None = None
    is_match: bool | None = None
    speech_s: float | None = None
    error: ClipError | None = None


class VerifyBatchResult(BaseModel):
    """Each test clip's outcome, in order."""

    threshold: float
    model: str
    speaker_id: str | None = None
    name: str | None = None
    reference_speech_s: float | None = None
    results: list[VerifyOutcome]
    accepted: int
    rejected: int
    failed: int
    total_ms: float


class SpeakerList(BaseModel):
    """Every enrolled speaker, by name."""

    speakers: list[SpeakerInfo]
    count: int
    model: str
    needs_reenrolment: list[str]  # ids of speakers without a voiceprint for `model`


class SpeakerResult(BaseModel):
    """One speaker."""

    speaker: SpeakerInfo
    needs_reenrolment: bool


class DeleteResult(BaseModel):
    """What was deleted."""

    ok: bool = True
    deleted: SpeakerInfo


class Reenrolment(BaseModel):
    """Speakers enrolled with another model only: enrol them again for `model`."""

    model: str
    count: int
    speakers: list[SpeakerInfo]


class Turn(BaseModel):
    """One diarized segment."""

    start: float
    end: float
    label: str
    confidence: float
    speaker_id: str | None
    name: str | None


class DiarizedSpeaker(BaseModel):
    """One speaker label: how much it spoke, and the enrolled speaker it matched, if any."""

    label: str
    speech_s: float
    speaker_id: str | None
    name: str | None
    score: float | None


class DiarizeResult(BaseModel):
    """Who spoke when."""

    audio_s: float
    num_speakers: int
    speakers: list[DiarizedSpeaker]
    segments: list[Turn]
    model: str
    truncated: bool = False
    timings: Timings
