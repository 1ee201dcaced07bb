"""Voiceprint store: SQLite (WAL) of speakers and their sample embeddings, never audio.

``<state_dir>/speakers.db`` (mode 0600; SQLite gives its -wal/-shm files the same mode). A
speaker has an id, a unique name, optional user_id (unique too), email and JSON metadata, and
one or more samples: an embedding BLOB (float32), the model id that made it, the seconds of
speech behind it. Registration writes the speaker and its samples in one transaction, so a
crash leaves a speaker either complete or absent. Identification compares only samples of
the querying model: after a model change, `needs_reenrolment` lists who has no voiceprint for
the new model instead of comparing incompatible vectors.

The API is synchronous and thread-safe (one connection behind a lock); call it from a worker
thread. Voiceprints (centroids, see `scoring`) are cached per model and rebuilt when this
or another process commits a change (``PRAGMA data_version``).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import SpeakerError
from agent.speaker.embedder import Embedding
from agent.speaker.scoring import MIN_ENROL_SPEECH_S, EnrolmentQuality, normalize
from agent.speaker.validate import (
    MAX_ID_FIELD,
    MAX_NAME,
    check_email,
    check_id,
    check_metadata,
    check_text,
    check_vector,
)

log = logging.getLogger(__name__)

DB_NAME = "speakers.db"
SCHEMA_VERSION = 1
MAX_TOP_K = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS speakers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL COLLATE NOCASE UNIQUE,
    user_id TEXT UNIQUE,
    email TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    speaker_id TEXT NOT NULL REFERENCES speakers(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL,
    dim INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    speech_s REAL NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_model ON samples(model_id, speaker_id);
"""


@dataclass(frozen=True)
class Speaker:
    """One enrolled speaker and a summary of its samples."""

    id: str
    name: str
    user_id: str | None
    email: str | None
    metadata: dict[str, Any]
    created: float
    updated: float
    samples: int = 0
    #: model id -> (samples, seconds of speech)
    models: dict[str, tuple[int, float]] = field(default_factory=dict)

    def quality(self, model_id: str) -> EnrolmentQuality:
        """Enrolment quality of this speaker's voiceprint for `model_id`."""
        n, s = self.models.get(model_id, (0, 0.0))
        return EnrolmentQuality(speech_s=s, samples=n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (no embeddings)."""
        return {
            "id": self.id, "name": self.name, "user_id": self.user_id, "email": self.email,
            "metadata": self.metadata, "created": self.created, "updated": self.updated,
            "samples": self.samples,
            "models": {m: {"samples": n, "speech_s": round(s, 2)}
                       for m, (n, s) in self.models.items()},
        }


@dataclass(frozen=True)
class Match:
    """One identification candidate."""

    speaker_id: str
    name: str
    score: float
    is_match: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"speaker_id": self.speaker_id, "name": self.name,
                "score": round(self.score, 4), "is_match": self.is_match}


@dataclass
class _Prints:
    """Cached voiceprints of one model: speaker ids, names, (n, dim) centroid matrix."""

    ids: list[str]
    names: list[str]
    matrix: np.ndarray


class VoiceprintStore:
    """Speakers and sample embeddings in SQLite; every method is synchronous."""

    def __init__(self, state_dir: Path | str, *, threshold: float,
                 min_enrol_speech_s: float = MIN_ENROL_SPEECH_S) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.dir / DB_NAME
        self.threshold = threshold
        self.min_enrol_speech_s = min_enrol_speech_s
        # Create the file 0600 before SQLite opens it: SQLite copies the database file's mode
        # onto the -wal and -shm files it creates next to it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        self._lock = threading.RLock()
        self._cache: dict[str, _Prints] = {}
        self._data_version = -1
        self._db = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a registration that returned survives power loss, not only a process crash
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._tx() as c:
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                c.execute(stmt)
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                      (str(SCHEMA_VERSION),))

    # ---------------------------------------------------------------------------- plumbing

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the lock; rolled back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._cache.clear()

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> VoiceprintStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def integrity_check(self) -> list[str]:
        """SQLite's integrity and foreign-key checks: empty when the file is consistent."""
        with self._lock:
            rows = [r[0] for r in self._db.execute("PRAGMA integrity_check")]
            bad = [f"foreign key: {r}" for r in self._db.execute("PRAGMA foreign_key_check")]
        return ([] if rows == ["ok"] else rows) + bad

    def _speaker(self, c: sqlite3.Connection, speaker_id: str) -> Speaker:
        """Load one speaker with its sample summary, or not_found."""
        row = c.execute("SELECT id, name, user_id, email, metadata, created, updated "
                        "FROM speakers WHERE id = ?", (check_id(speaker_id),)).fetchone()
        if row is None:
            raise SpeakerError("not_found", f"no speaker {speaker_id!r}", status=404)
        models = {m: (n, s) for m, n, s in c.execute(
            "SELECT model_id, COUNT(*), SUM(speech_s) FROM samples WHERE speaker_id = ? "
            "GROUP BY model_id", (speaker_id,))}
        return Speaker(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6],
                       samples=sum(n for n, _ in models.values()), models=models)

    def _insert_sample(self, c: sqlite3.Connection, speaker_id: str, emb: Embedding,
                       now: float) -> None:
        """Add one sample row; all samples of a model must share its dimension."""
        vec = check_vector(emb.vector)
        if not isinstance(emb.model_id, str) or not emb.model_id:
            raise SpeakerError("bad_embedding", "embedding has no model id")
        row = c.execute("SELECT dim FROM samples WHERE model_id = ? LIMIT 1",
                        (emb.model_id,)).fetchone()
        if row is not None and row[0] != len(vec):
            raise SpeakerError("bad_embedding", f"{emb.model_id} embeddings are {row[0]}-d, "
                                                f"got {len(vec)}")
        c.execute("INSERT INTO samples (speaker_id, model_id, dim, embedding, speech_s, created)"
                  " VALUES (?, ?, ?, ?, ?, ?)",
                  (speaker_id, emb.model_id, len(vec), vec.tobytes(), float(emb.speech_s), now))

    def _warn_quality(self, sp: Speaker, model_id: str) -> None:
        q = sp.quality(model_id)
        if q.speech_s < self.min_enrol_speech_s:
            log.warning("speaker %s (%s): %s", sp.name, sp.id, q.warning)

    # ---------------------------------------------------------------------------- writes

    def register(self, name: str, samples: Sequence[Embedding], *, user_id: str | None = None,
                 email: str | None = None, metadata: Mapping[str, Any] | None = None) -> Speaker:
        """Create a speaker with its first sample(s), atomically; name_taken if it exists."""
        nm = check_text(name, "name", MAX_NAME, required=True)
        uid = check_text(user_id, "user_id", MAX_ID_FIELD)
        em = check_email(email)
        meta = check_metadata(metadata)
        if not samples:
            raise SpeakerError("bad_request", "registration needs at least one sample")
        sid = uuid.uuid4().hex
        now = time.time()
        try:
            with self._tx() as c:
                c.execute("INSERT INTO speakers VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (sid, nm, uid, em, meta, now, now))
                for emb in samples:
                    self._insert_sample(c, sid, emb, now)
                sp = self._speaker(c, sid)
        except sqlite3.IntegrityError as e:
            raise self._conflict(e, nm, uid) from e
        self._warn_quality(sp, samples[0].model_id)
        return sp

    @staticmethod
    def _conflict(e: sqlite3.IntegrityError, name: str | None, uid: str | None) -> SpeakerError:
        """A UNIQUE violation as a 409 with the field that clashed."""
        msg = str(e)
        if "user_id" in msg:
            return SpeakerError("user_id_taken", f"user_id {uid!r} is already enrolled",
                                status=409)
        return SpeakerError("name_taken", f"a speaker named {name!r} already exists", status=409)

    def add_sample(self, speaker_id: str, sample: Embedding) -> Speaker:
        """Add one sample embedding to an existing speaker."""
        with self._tx() as c:
            self._speaker(c, speaker_id)
            now = time.time()
            self._insert_sample(c, speaker_id, sample, now)
            c.execute("UPDATE speakers SET updated = ? WHERE id = ?", (now, speaker_id))
            sp = self._speaker(c, speaker_id)
        self._warn_quality(sp, sample.model_id)
        return sp

    def update(self, speaker_id: str, *, name: str | None = None,
               user_id: str | None = None, email: str | None = None,
               metadata: Mapping[str, Any] | None = None,
               clear: Sequence[str] = ()) -> Speaker:
        """Rename / change fields; fields in `clear` (user_id, email, metadata) are emptied."""
        bad = set(clear) - {"user_id", "email", "metadata"}
        if bad:
            raise SpeakerError("bad_request", f"cannot clear {', '.join(sorted(bad))}")
        sets: dict[str, Any] = {}
        if name is not None:
            sets["name"] = check_text(name, "name", MAX_NAME, required=True)
        if user_id is not None:
            sets["user_id"] = check_text(user_id, "user_id", MAX_ID_FIELD)
        if email is not None:
            sets["email"] = check_email(email)
        if metadata is not None:
            sets["metadata"] = check_metadata(metadata)
        for f in clear:
            sets[f] = "{}" if f == "metadata" else None
        try:
            with self._tx() as c:
                self._speaker(c, speaker_id)
                if sets:
                    sets["updated"] = time.time()
                    cols = ", ".join(f"{k} = ?" for k in sets)
                    c.execute(f"UPDATE speakers SET {cols} WHERE id = ?",
                              (*sets.values(), speaker_id))
                return self._speaker(c, speaker_id)
        except sqlite3.IntegrityError as e:
            raise self._conflict(e, sets.get("name"), sets.get("user_id")) from e

    def delete(self, speaker_id: str) -> Speaker:
        """Delete a speaker and all its samples; returns what was deleted."""
        with self._tx() as c:
            sp = self._speaker(c, speaker_id)
            c.execute("DELETE FROM speakers WHERE id = ?", (speaker_id,))
        return sp

    # ---------------------------------------------------------------------------- reads

    def get(self, speaker_id: str) -> Speaker:
        """One speaker by id (not_found, 404, otherwise)."""
        with self._lock:
            return self._speaker(self._db, speaker_id)

    def find(self, name: str) -> Speaker:
        """One speaker by name (case-insensitive)."""
        nm = check_text(name, "name", MAX_NAME, required=True)
        with self._lock:
            row = self._db.execute("SELECT id FROM speakers WHERE name = ?", (nm,)).fetchone()
            if row is None:
                raise SpeakerError("not_found", f"no speaker named {nm!r}", status=404)
            return self._speaker(self._db, row[0])

    def list_speakers(self) -> list[Speaker]:
        """Every speaker, by name."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM speakers ORDER BY name")]
            return [self._speaker(self._db, i) for i in ids]

    def count(self) -> int:
        """Number of speakers."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM speakers").fetchone()[0])

    def needs_reenrolment(self, model_id: str) -> list[Speaker]:
        """Speakers without any sample of `model_id` (enrolled with another model)."""
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM speakers WHERE id NOT IN "
                "(SELECT speaker_id FROM samples WHERE model_id = ?) ORDER BY name",
                (model_id,))]
            return [self._speaker(self._db, i) for i in ids]

    def samples(self, speaker_id: str, model_id: str) -> np.ndarray:
        """(n, dim) sample embeddings of one speaker for one model."""
        with self._lock:
            self._speaker(self._db, speaker_id)
            rows = self._db.execute("SELECT embedding FROM samples WHERE speaker_id = ? AND "
                                    "model_id = ? ORDER BY id", (speaker_id, model_id)).fetchall()
        return np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows]) if rows \
            else np.zeros((0, 0), dtype=np.float32)

    def _prints(self, model_id: str) -> _Prints:
        """Centroid voiceprints of every speaker with `model_id` samples (cached)."""
        with self._lock:
            version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
            if version != self._data_version:  # another connection committed
                self._cache.clear()
                self._data_version = version
            hit = self._cache.get(model_id)
            if hit is not None:
                return hit
            rows = self._db.execute(
                "SELECT s.id, s.name, x.embedding FROM samples x JOIN speakers s "
                "ON s.id = x.speaker_id WHERE x.model_id = ? ORDER BY s.id, x.id", (model_id,))
            ids: list[str] = []
            names: list[str] = []
            sums: list[np.ndarray] = []
            for sid, name, blob in rows:
                v = np.frombuffer(blob, dtype=np.float32)
                if ids and ids[-1] == sid:
                    sums[-1] = sums[-1] + v
                else:
                    ids.append(sid)
                    names.append(name)
                    sums.append(v.copy())
            matrix = normalize(np.stack(sums)) if sums else np.zeros((0, 0), np.float32)
            prints = _Prints(ids, names, matrix)
            self._cache[model_id] = prints
            return prints

    def identify(self, vector: np.ndarray, model_id: str, *, top_k: int = 1,
                 threshold: float | None = None) -> list[Match]:
        """Best `top_k` speakers for an utterance embedding, best first (may be empty)."""
        if not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise SpeakerError("bad_request", f"top_k must be 1-{MAX_TOP_K}")
        v = check_vector(vector)
        thr = self.threshold if threshold is None else threshold
        p = self._prints(model_id)
        if not p.ids:
            return []
        if p.matrix.shape[1] != len(v):
            raise SpeakerError("bad_embedding", f"{model_id} voiceprints are "
                                                f"{p.matrix.shape[1]}-d, got {len(v)}")
        # einsum keeps this in one thread: BLAS threads cost ~8 ms to wake after idle, while
        # 10 000 x 256 takes ~1 ms here
        scores = np.einsum("ij,j->i", p.matrix, v)
        k = min(top_k, len(scores))
        idx = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        return [Match(p.ids[i], p.names[i], float(scores[i]), bool(scores[i] >= thr))
                for i in idx]

    def verify(self, speaker_id: str, vector: np.ndarray, model_id: str, *,
               threshold: float | None = None) -> Match:
        """1:1: the utterance embedding against one speaker's voiceprint."""
        v = check_vector(vector)
        sp = self.get(speaker_id)
        thr = self.threshold if threshold is None else threshold
        p = self._prints(model_id)
        if speaker_id not in p.ids:
            raise SpeakerError("needs_reenrolment", f"speaker {sp.name!r} has no voiceprint "
                               f"for model {model_id}; enrol again", status=409)
        row = p.matrix[p.ids.index(speaker_id)]
        if len(row) != len(v):
            raise SpeakerError("bad_embedding", f"{model_id} voiceprints are {len(row)}-d, "
                                                f"got {len(v)}")
        score = float(np.dot(row, v))
        return Match(sp.id, sp.name, score, score >= thr)
