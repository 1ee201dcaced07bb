"""Validation of what callers hand the voiceprint store: text fields, metadata, embeddings.

Every refusal is a SpeakerError with a stable code (`bad_request`, `bad_embedding`,
`not_found`), raised before anything is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.errors import SpeakerError
from agent.speaker.scoring import normalize

MAX_NAME = 100
MAX_ID_FIELD = 128
MAX_METADATA_BYTES = 16384
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}$")
_SPEAKER_ID = re.compile(r"^[0-9a-f]{32}$")


def check_text(value: str | None, what: str, limit: int, *, required: bool = False) -> str | None:
    """Strip and bound a text field; None stays None unless required."""
    if value is None:
        if required:
            raise SpeakerError("bad_request", f"{what} is required")
        return None
    if not isinstance(value, str):
        raise SpeakerError("bad_request", f"{what} must be a string")
    v = value.strip()
    if required and not v:
        raise SpeakerError("bad_request", f"{what} must not be empty")
    if len(v) > limit:
        raise SpeakerError("bad_request", f"{what} is longer than {limit} characters")
    if any(ord(c) < 32 for c in v):
        raise SpeakerError("bad_request", f"{what} contains control characters")
    return v or None


def check_email(email: str | None) -> str | None:
    """A plausible address (one @, no spaces) or None."""
    v = check_text(email, "email", 254)
    if v is not None and not _EMAIL.match(v):
        raise SpeakerError("bad_request", f"email {v!r} is not an address")
    return v


def check_metadata(metadata: Mapping[str, Any] | None) -> str:
    """Metadata as a JSON object of at most MAX_METADATA_BYTES."""
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise SpeakerError("bad_request", "metadata must be a JSON object")
    try:
        text = json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise SpeakerError("bad_request", f"metadata is not JSON-serialisable: {e}") from e
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise SpeakerError("bad_request", f"metadata is over {MAX_METADATA_BYTES} bytes")
    return text


def check_vector(vec: np.ndarray) -> np.ndarray:
    """A finite, non-zero 1-D embedding, normalised to float32."""
    v = np.asarray(vec)
    if v.ndim != 1 or not 8 <= len(v) <= 8192 or not np.issubdtype(v.dtype, np.floating):
        raise SpeakerError("bad_embedding", f"embedding must be a 1-D float vector, got "
                                            f"{v.dtype} {v.shape}")
    if not np.isfinite(v).all() or not np.any(v):
        raise SpeakerError("bad_embedding", "embedding is zero or not finite")
    return normalize(v.astype(np.float32))


def check_id(speaker_id: str) -> str:
    """A well-formed speaker id (32 hex digits)."""
    if not isinstance(speaker_id, str) or not _SPEAKER_ID.match(speaker_id):
        raise SpeakerError("not_found", f"no speaker {speaker_id!r}", status=404)
    return speaker_id
