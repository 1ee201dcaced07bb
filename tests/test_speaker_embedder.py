"""Speaker embedders on real speech: GE2E (numpy front end + ONNX), sherpa-onnx loader, bad input.

The GE2E tests need `voice-agent models install ge2e-resemblyzer` and ../shared. The sherpa
loader is tested with small generated ONNX models carrying the metadata sherpa-onnx reads,
because the official 3D-Speaker/WeSpeaker files cannot be downloaded here.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import models
from agent.errors import ModelError, SpeakerError
from agent.models.installer import conversion_python
from agent.speaker import frontend
from agent.speaker.embedder import (
    Ge2eEmbedder,
    SherpaEmbedder,
    check_sherpa_model,
    make_embedder,
)
from agent.speaker.scoring import DEFAULT_THRESHOLD, centroid

from .conftest import SHARED, need_shared

SPEAKERS_EN = SHARED / "data" / "speakers-en"
MODEL_ID = "ge2e-resemblyzer"
REPO = Path(__file__).resolve().parents[1]


def conversion_env() -> dict[str, str]:
    """Our environment with the checkout importable (the conversion venv need not install us)."""
    return dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def ge2e() -> Ge2eEmbedder:
    need_shared()
    try:
        return Ge2eEmbedder(models.path(MODEL_ID))
    except ModelError as e:
        pytest.skip(f"speaker model {MODEL_ID} not installed ({e.message})")


def clips(speaker: str) -> list[np.ndarray]:
    return [sf.read(p, dtype="float32")[0] for p in sorted((SPEAKERS_EN / speaker).glob("*.flac"))]


def speakers() -> list[str]:
    return sorted(p.name for p in SPEAKERS_EN.iterdir() if p.is_dir())


def test_embedding_shape_norm_determinism(ge2e: Ge2eEmbedder) -> None:
    x = clips("1688")[0]
    r = ge2e.extract(x)
    assert r.vector.shape == (256,) and r.vector.dtype == np.float32
    assert np.linalg.norm(r.vector) == pytest.approx(1.0, abs=1e-5)
    assert (r.vector >= 0).all()  # GE2E: ReLU'd before the norm
    assert r.model_id == MODEL_ID and r.audio_s == pytest.approx(len(x) / 16000)
    assert 0.5 < r.speech_s < r.audio_s  # silences were trimmed
    assert np.array_equal(ge2e.embed(x), r.vector)
    # thread-safe: concurrent calls give the same vectors as sequential ones
    xs = [c for s in ("1688", "1998") for c in clips(s)[:3]]
    seq = [ge2e.embed(c) for c in xs]
    with ThreadPoolExecutor(4) as ex:
        par = list(ex.map(ge2e.embed, xs))
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(seq, par, strict=True))


def test_identifies_every_shared_speaker(ge2e: Ge2eEmbedder) -> None:
    """3 enrolment clips per speaker; every other clip is closest to its own speaker.

    Six clips of each of the ten speakers, at most 8 s each, keep it quick; bench/speaker.py
    runs all clips and pairs."""
    embs = {s: [ge2e.embed(c[:8 * 16000]) for c in clips(s)[:6]] for s in speakers()}
    prints = {s: centroid(v[:3]) for s, v in embs.items()}
    names = list(prints)
    matrix = np.stack([prints[s] for s in names])
    target, impostor = [], []
    for s, vs in embs.items():
        for v in vs[3:]:
            scores = matrix @ v
            assert names[int(np.argmax(scores))] == s
            for name, sc in zip(names, scores, strict=True):
                (target if name == s else impostor).append(sc)
    # at the shipped threshold: no impostor accepted, (almost) every target accepted
    assert max(impostor) < DEFAULT_THRESHOLD
    assert np.mean(np.array(target) < DEFAULT_THRESHOLD) <= 0.05


def test_bad_audio(ge2e: Ge2eEmbedder) -> None:
    x = clips("1688")[0]
    cases = {
        "too_short": [x[:int(0.3 * 16000)], np.zeros(0, np.float32)],
        "too_long": [np.tile(x, 4)[:31 * 16000]],
        "silent": [np.zeros(16000 * 2, np.float32), np.full(16000, 1e-5, np.float32)],
        "bad_audio": [np.full(16000, np.nan, np.float32),
                      np.concatenate([x[:16000], [np.inf]]).astype(np.float32),
                      (x * 32767).astype(np.int16),  # PCM, not float
                      (x * 32767).astype(np.float32),  # PCM scale passed as float
                      np.stack([x, x], axis=1),  # stereo
                      np.frombuffer(b"RIFF\x00\x01garbage" * 4000, dtype=np.uint8),
                      [0.1] * 16000],  # not an array
    }
    for code, inputs in cases.items():
        for a in inputs:
            with pytest.raises(SpeakerError) as e:
                ge2e.extract(a)  # type: ignore[arg-type]
            assert e.value.code == code, (code, e.value)
            assert e.value.status == 400 and e.value.message
    # speech under 0.5 s inside a longer clip: too short, said in seconds of speech
    quiet = np.zeros(16000 * 2, np.float32)
    quiet[8000:8000 + 4000] = x[16000:20000] * 3
    with pytest.raises(SpeakerError) as e:
        ge2e.extract(quiet)
    assert e.value.code in ("too_short", "silent") and "speech" in e.value.message


def test_embed_windows_follow_the_speaker(ge2e: Ge2eEmbedder) -> None:
    a, b = clips("1688")[0], clips("1998")[0]
    x = np.concatenate([a, b])
    starts, vecs = ge2e.embed_windows(x, hop_s=0.5)
    assert vecs.shape == (len(starts), 256)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert starts[0] == 0 and starts[-1] + ge2e.window_s == pytest.approx(len(x) / 16000, abs=0.02)
    va, vb = ge2e.embed(a), ge2e.embed(b)
    inside_a = (starts + ge2e.window_s) < len(a) / 16000 - 0.2
    inside_b = starts > len(a) / 16000 + 0.2
    assert ((vecs[inside_a] @ va) > (vecs[inside_a] @ vb)).mean() > 0.9
    assert ((vecs[inside_b] @ vb) > (vecs[inside_b] @ va)).mean() > 0.9


def test_ge2e_refuses_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        Ge2eEmbedder(tmp_path / "missing.onnx")
    assert e.value.code == "missing_file"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelError) as e:
        Ge2eEmbedder(bad)
    assert e.value.code == "invalid_onnx"
    with pytest.raises(ModelError) as e:
        make_embedder(MODEL_ID, "nope", model_dir=tmp_path)
    assert e.value.code == "bad_backend"


def test_conversion_matches_librosa_and_resemblyzer(ge2e: Ge2eEmbedder) -> None:
    """Run through the conversion python: torch and librosa never enter the test process."""
    py = conversion_python()
    probe = subprocess.run([py, "-c", "import librosa, resemblyzer, torch"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"conversion python {py} lacks librosa/Resemblyzer/torch "
                    f"({probe.stderr.strip().splitlines()[-1:]}); install the convert extra")
    # a few clips suffice (men, women, Mandarin); Resemblyzer's torch pipeline is slow
    wavs = [str(p) for p in sorted(SPEAKERS_EN.glob("*/*-0000.flac"))[:4]]
    wavs += [str(p) for p in sorted((SHARED / "data" / "speakers-zh" / "enroll").glob("*.wav"))
             [::3]]
    for args in (["--check-mel", *wavs],
                 ["--check-resemblyzer", *wavs, "--model", str(ge2e.path)]):
        out = subprocess.run([py, "-W", "ignore", "-m", "conversion.ge2e_to_onnx", *args],
                             capture_output=True, text=True, check=False, cwd=REPO,
                             env=conversion_env(), timeout=600)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert out.returncode == 0 and res["ok"], res
        if "max_rel_err" in res:
            assert res["max_rel_err"] < 1e-5
        else:
            assert res["min_cosine"] > 0.9999 and res["max_trim_diff_samples"] == 0


# ------------------------------------------------------------------------------------------
# sherpa-onnx SpeakerEmbeddingExtractor with generated models
# ------------------------------------------------------------------------------------------

GOOD_META = {"framework": "wespeaker", "sample_rate": "16000", "output_dim": "32",
             "normalize_samples": "0", "language": "English"}


def make_model(path: Path, meta: dict[str, str], *, feat: int = 80, dim: int = 32) -> Path:
    """(N, T, feat) fbank -> mean over time -> projection to `dim`: a tiny embedding model."""
    onnx = pytest.importorskip("onnx", reason="onnx (convert extra) builds the test models")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(feat, dim)).astype(np.float32), "W")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["feats", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "W"], ["embs"])],
        "tiny-speaker",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["N", "T", feat])],
        [helper.make_tensor_value_info("embs", TensorProto.FLOAT, ["N", dim])],
        [w, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def test_sherpa_embedder_loads_and_embeds(tmp_path: Path) -> None:
    need_shared()
    d = tmp_path / "speaker-tiny"
    d.mkdir()
    make_model(d / "tiny.onnx", GOOD_META)
    emb = make_embedder("speaker-tiny", "sherpa-speaker", model_dir=d)
    assert isinstance(emb, SherpaEmbedder) and emb.dim == 32 and emb.model_id == "speaker-tiny"
    a, b = clips("1688")[0], clips("1998")[0]
    ra = emb.extract(a)
    assert ra.vector.shape == (32,) and np.linalg.norm(ra.vector) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(emb.embed(a), ra.vector, atol=1e-6)
    assert not np.allclose(emb.embed(b), ra.vector, atol=1e-3)
    starts, vecs = emb.embed_windows(a, hop_s=1.0)
    assert vecs.shape == (len(starts), 32) and len(starts) >= 2
    # the same validation as every embedder
    with pytest.raises(SpeakerError) as e:
        emb.extract(np.zeros(16000, np.float32))
    assert e.value.code == "silent"


@pytest.mark.parametrize("meta,feat,dim,code", [
    ({}, 80, 32, "bad_metadata"),  # sherpa-onnx segfaults on this one
    ({k: v for k, v in GOOD_META.items() if k != "language"}, 80, 32, "bad_metadata"),
    ({**GOOD_META, "framework": "foo"}, 80, 32, "bad_metadata"),  # and on this one
    ({**GOOD_META, "output_dim": "16"}, 80, 32, "bad_metadata"),  # sherpa trusts the key
    ({**GOOD_META, "output_dim": "x"}, 80, 32, "bad_metadata"),
    (GOOD_META, 40, 32, "bad_model"),  # sherpa computes 80-band fbank
])
def test_sherpa_refuses_models_it_would_crash_on(tmp_path: Path, meta: dict[str, str],
                                                 feat: int, dim: int, code: str) -> None:
    p = make_model(tmp_path / "m.onnx", meta, feat=feat, dim=dim)
    with pytest.raises(ModelError) as e:
        check_sherpa_model(p)
    assert e.value.code == code, e.value
    with pytest.raises(ModelError):
        SherpaEmbedder(p, model_id="m")


def test_sherpa_directory_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        SherpaEmbedder(tmp_path, model_id="empty")
    assert e.value.code == "missing_file"
    (tmp_path / "x.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(ModelError) as e:
        SherpaEmbedder(tmp_path, model_id="bad")
    assert e.value.code == "invalid_onnx"


def test_frontend_windows_cover_the_utterance() -> None:
    """Resemblyzer's slicing rule, checked by its properties rather than by fixed numbers."""
    step = round(16000 / 1.3 / frontend.HOP)
    for n in (800, 16000, 25600, 40000, 48000, 160000, 480000):
        sl = frontend.partial_slices(n)
        assert all(b - a == frontend.PARTIAL_FRAMES for a, b in sl)
        assert [a for a, _ in sl] == list(range(0, step * len(sl), step))
        last = sl[-1][0] * frontend.HOP
        if len(sl) > 1:  # the last kept window is at least 75 % audio ...
            assert (n - last) / (frontend.PARTIAL_FRAMES * frontend.HOP) >= 0.75
        # ... and together they reach the end of the audio
        assert sl[-1][1] * frontend.HOP >= n or (n - (sl[-1][0] + step) * frontend.HOP) / (
            frontend.PARTIAL_FRAMES * frontend.HOP) < 0.75
    mels, sl = frontend.partial_mels(np.random.default_rng(0).normal(0, 0.1, 48000)
                                     .astype(np.float32))
    assert mels.shape == (len(sl), frontend.PARTIAL_FRAMES, frontend.N_MELS)
    assert (mels >= 0).all()  # power, not log
