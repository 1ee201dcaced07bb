"""Voiceprint store: every operation and bad input, file modes, model changes, SIGKILL safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from agent.errors import SpeakerError
from agent.speaker.embedder import Embedding
from agent.speaker.scoring import centroid
from agent.speaker.store import DB_NAME, VoiceprintStore

REPO = Path(__file__).resolve().parents[1]
DIM = 256
MODEL = "ge2e-resemblyzer"


def vec(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    """A random unit vector (random voices are near-orthogonal in 256-d)."""
    v = rng.normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def emb(v: np.ndarray, model: str = MODEL, speech_s: float = 9.0) -> Embedding:
    return Embedding(v, model, speech_s + 1.0, speech_s)


@pytest.fixture()
def store(tmp_path: Path) -> VoiceprintStore:
    s = VoiceprintStore(tmp_path / "state", threshold=0.76)
    yield s
    s.close()


def snapshot(s: VoiceprintStore) -> list[tuple]:
    """Everything in the database, to prove an operation left it untouched."""
    db = sqlite3.connect(s.path)
    try:
        return (db.execute("SELECT * FROM speakers ORDER BY id").fetchall()
                + db.execute("SELECT * FROM samples ORDER BY id").fetchall())
    finally:
        db.close()


def test_file_is_private_and_wal(store: VoiceprintStore) -> None:
    rng = np.random.default_rng(0)
    store.register("Alice", [emb(vec(rng))])
    assert store.path.name == DB_NAME
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    for p in store.path.parent.iterdir():
        if p.name.startswith(DB_NAME):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert (store.path.parent / f"{DB_NAME}-wal").exists()
    # embeddings only: no column can hold audio, and a sample is exactly one float32 vector
    db = sqlite3.connect(store.path)
    blob, dim = db.execute("SELECT embedding, dim FROM samples").fetchone()
    assert len(blob) == 4 * dim == 4 * DIM


def test_register_get_list_update_delete(store: VoiceprintStore) -> None:
    rng = np.random.default_rng(1)
    a = store.register("Alice", [emb(vec(rng)), emb(vec(rng), speech_s=4.0)],
                       user_id="u-1", email="alice@example.org", metadata={"room": "kitchen"})
    assert a.samples == 2 and a.models == {MODEL: (2, 13.0)}
    assert a.quality(MODEL).ok and a.quality("other").samples == 0
    b = store.register("Bob", [emb(vec(rng), speech_s=3.0)])
    assert not b.quality(MODEL).ok and "add samples" in (b.quality(MODEL).warning or "")
    assert [s.name for s in store.list_speakers()] == ["Alice", "Bob"]
    assert store.get(a.id) == a
    assert store.find("alice").id == a.id  # names are case-insensitive
    assert store.count() == 2

    time.sleep(0.01)
    b2 = store.add_sample(b.id, emb(vec(rng), speech_s=6.0))
    assert b2.samples == 2 and b2.quality(MODEL).ok and b2.updated > b.updated

    a2 = store.update(a.id, name="Alicia", metadata={"room": "office"})
    assert (a2.name, a2.metadata, a2.email, a2.user_id) == (
        "Alicia", {"room": "office"}, "alice@example.org", "u-1")
    a3 = store.update(a.id, clear=["email", "user_id"])
    assert a3.email is None and a3.user_id is None and a3.name == "Alicia"

    gone = store.delete(b.id)
    assert gone.id == b.id
    with pytest.raises(SpeakerError) as e:
        store.get(b.id)
    assert e.value.code == "not_found" and e.value.status == 404
    # the samples went with the speaker
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM samples WHERE speaker_id = ?", (b.id,)).fetchone() \
        == (0,)
    assert store.integrity_check() == []


def test_identify_and_verify(store: VoiceprintStore) -> None:
    rng = np.random.default_rng(2)
    voices = {name: vec(rng) for name in ("Ann", "Ben", "Cat", "Dan")}
    ids = {}
    for name, v in voices.items():
        # three noisy samples around each voice: the voiceprint is their centroid
        samples = [v + 0.3 * vec(rng) for _ in range(3)]
        ids[name] = store.register(name, [emb(s) for s in samples]).id
    probe = voices["Cat"] + 0.3 * vec(rng)
    top = store.identify(probe, MODEL, top_k=3)
    assert len(top) == 3 and top[0].name == "Cat" and top[0].is_match
    assert [m.score for m in top] == sorted((m.score for m in top), reverse=True)
    assert not top[1].is_match  # a random other voice scores near 0
    want = float(centroid(store.samples(ids["Cat"], MODEL)) @ (probe / np.linalg.norm(probe)))
    assert top[0].score == pytest.approx(want, abs=1e-5)
    assert len(store.identify(probe, MODEL, top_k=100)) == 4
    assert store.identify(vec(rng), MODEL)[0].is_match is False
    v = store.verify(ids["Cat"], probe, MODEL)
    assert v.is_match and v.score == pytest.approx(top[0].score, abs=1e-6)
    assert not store.verify(ids["Ann"], probe, MODEL).is_match
    assert store.verify(ids["Ann"], probe, MODEL, threshold=-1.0).is_match
    assert store.identify(probe, "some-other-model") == []


def test_model_change_lists_reenrolment(store: VoiceprintStore) -> None:
    rng = np.random.default_rng(3)
    a = store.register("Ann", [emb(vec(rng))])
    b = store.register("Ben", [emb(vec(rng))])
    new = "speaker-campplus-zh-en"
    assert [s.name for s in store.needs_reenrolment(new)] == ["Ann", "Ben"]
    store.add_sample(a.id, emb(vec(rng, 192), model=new))
    assert [s.id for s in store.needs_reenrolment(new)] == [b.id]
    assert store.needs_reenrolment(MODEL) == []
    # vectors of the new model are only compared with that model's voiceprints
    probe = vec(rng, 192)
    assert [m.speaker_id for m in store.identify(probe, new, top_k=5)] == [a.id]
    with pytest.raises(SpeakerError) as e:
        store.verify(b.id, probe, new)
    assert e.value.code == "needs_reenrolment" and e.value.status == 409
    with pytest.raises(SpeakerError) as e:
        store.identify(vec(rng, 192), MODEL)  # wrong dimension for this model
    assert e.value.code == "bad_embedding"


def test_bad_input_leaves_store_untouched(store: VoiceprintStore) -> None:
    rng = np.random.default_rng(4)
    a = store.register("Ann", [emb(vec(rng))], user_id="u-1")
    bad_calls = [
        ("name_taken", lambda: store.register("ANN", [emb(vec(rng))])),
        ("user_id_taken", lambda: store.register("Zed", [emb(vec(rng))], user_id="u-1")),
        ("bad_request", lambda: store.register("", [emb(vec(rng))])),
        ("bad_request", lambda: store.register("   ", [emb(vec(rng))])),
        ("bad_request", lambda: store.register("x" * 101, [emb(vec(rng))])),
        ("bad_request", lambda: store.register("Tab\tName", [emb(vec(rng))])),
        ("bad_request", lambda: store.register("Zed", [])),
        ("bad_request", lambda: store.register("Zed", [emb(vec(rng))], email="not-an-email")),
        ("bad_request", lambda: store.register("Zed", [emb(vec(rng))],
                                               metadata={"x": object()})),
        ("bad_request", lambda: store.register("Zed", [emb(vec(rng))], metadata=[1, 2])),
        ("bad_request", lambda: store.register("Zed", [emb(vec(rng))],
                                               metadata={"x": "y" * 20000})),
        # a bad second sample must undo the speaker row written before it
        ("bad_embedding", lambda: store.register("Zed", [emb(vec(rng)),
                                                         emb(np.full(DIM, np.nan))])),
        ("bad_embedding", lambda: store.register("Zed", [emb(np.zeros(DIM, np.float32))])),
        ("bad_embedding", lambda: store.register("Zed", [emb(vec(rng, 128))])),
        ("bad_embedding", lambda: store.register("Zed", [emb(np.ones((2, DIM)))])),
        ("bad_embedding", lambda: store.add_sample(a.id, emb(np.arange(DIM)))),  # ints
        ("not_found", lambda: store.add_sample("0" * 32, emb(vec(rng)))),
        ("not_found", lambda: store.add_sample("../../etc", emb(vec(rng)))),
        ("not_found", lambda: store.update("f" * 32, name="X")),
        ("not_found", lambda: store.delete("f" * 32)),
        ("bad_request", lambda: store.update(a.id, name="")),
        ("bad_request", lambda: store.update(a.id, clear=["name"])),
        ("bad_request", lambda: store.identify(vec(rng), MODEL, top_k=0)),
        ("bad_request", lambda: store.identify(vec(rng), MODEL, top_k=101)),
    ]
    b = store.register("Ben", [emb(vec(rng))])
    before = snapshot(store)
    bad_calls.append(("name_taken", lambda: store.update(b.id, name="ann")))
    bad_calls.append(("user_id_taken", lambda: store.update(b.id, user_id="u-1")))
    for code, call in bad_calls:
        with pytest.raises(SpeakerError) as e:
            call()
        assert e.value.code == code, (code, e.value)
        assert e.value.message
        assert snapshot(store) == before, code
    assert store.integrity_check() == []


def test_second_process_sees_changes(store: VoiceprintStore) -> None:
    rng = np.random.default_rng(5)
    v = vec(rng)
    other = VoiceprintStore(store.dir, threshold=0.76)
    try:
        assert other.identify(v, MODEL) == []  # caches "no voiceprints"
        a = store.register("Ann", [emb(v)])
        assert other.identify(v, MODEL)[0].speaker_id == a.id
        store.delete(a.id)
        assert other.identify(v, MODEL) == []
    finally:
        other.close()


def test_identify_scales(store: VoiceprintStore) -> None:
    """10 000 voiceprints: the right one still comes first (and is cached as one matrix)."""
    rng = np.random.default_rng(6)
    m = rng.normal(size=(10_000, DIM)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    with store._tx() as c:  # bulk insert: 10 000 registrations one by one take minutes
        for i, v in enumerate(m):
            sid = f"{i:032x}"
            c.execute("INSERT INTO speakers VALUES (?, ?, NULL, NULL, '{}', 0, 0)",
                      (sid, f"s{i}"))
            c.execute("INSERT INTO samples (speaker_id, model_id, dim, embedding, speech_s, "
                      "created) VALUES (?, ?, ?, ?, 9, 0)", (sid, MODEL, DIM, v.tobytes()))
    probe = m[1234] + 0.2 * vec(rng)
    top = store.identify(probe, MODEL, top_k=5)
    assert top[0].speaker_id == f"{1234:032x}" and top[0].is_match
    assert not top[1].is_match
    assert store.count() == 10_000


CHILD = textwrap.dedent("""
    import sys, numpy as np
    from agent.speaker.embedder import Embedding
    from agent.speaker.store import VoiceprintStore
    s = VoiceprintStore(sys.argv[1], threshold=0.76)
    rng = np.random.default_rng(int(sys.argv[2]))
    i = 0
    while True:
        vs = rng.normal(size=(3, 256)).astype(np.float32)
        s.register(f"speaker-{sys.argv[2]}-{i}",
                   [Embedding(v / np.linalg.norm(v), "ge2e-resemblyzer", 5.0, 4.0) for v in vs],
                   metadata={"i": i})
        print(i, flush=True)
        i += 1
""")


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_sigkill_during_registrations(tmp_path: Path, seed: int) -> None:
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(state), str(seed)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    done = -1
    want = 15 + seed % 7  # kill at a different point of the burst each time
    while done < want:
        line = proc.stdout.readline()
        assert line, "child died before the kill"
        done = int(line)
    time.sleep((seed % 3) * 0.003)  # land inside a transaction some of the time
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    s = VoiceprintStore(state, threshold=0.76)
    try:
        assert s.integrity_check() == []
        speakers = s.list_speakers()
        # every registration that returned is there; none is half-written
        assert len(speakers) >= done + 1
        assert all(sp.samples == 3 and sp.models == {MODEL: (3, 12.0)} for sp in speakers)
        names = {sp.name for sp in speakers}
        assert {f"speaker-{seed}-{i}" for i in range(done + 1)} <= names
        db = sqlite3.connect(s.path)
        orphans = db.execute("SELECT COUNT(*) FROM samples WHERE speaker_id NOT IN "
                             "(SELECT id FROM speakers)").fetchone()[0]
        assert orphans == 0
        # and the store works on after the crash
        rng = np.random.default_rng(seed)
        s.register("after-crash", [emb(vec(rng))])
    finally:
        s.close()
