"""Local ASR on real speech: engine, full daemon (file -> VAD -> ASR -> events), bad models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import models
from agent.asr.base import collapse_loops
from agent.asr.files import check_files, resolve_files
from agent.asr.sherpa import make_engine
from agent.asr.wer import normalize, wer
from agent.config import SherpaOfflineAsrConfig, load_config
from agent.daemon import Daemon
from agent.errors import ModelError
from agent.events import AsrFinal, AsrPartial, BaseEvent, ErrorEvent, UtteranceEnded

from .conftest import ASR_EN, GAP_S, asr_en_rows, need_shared

DEFAULT_MODEL = "whisper-tiny.en-int8"
# Measured 8.7 % with the normalizer in agent.asr.wer; the bound leaves room for noise in
# how VAD cuts the utterances, not for a broken model (which scores > 50 %).
WER_BOUND = 0.15


@pytest.fixture(scope="module")
def model_dir() -> Path:
    need_shared()
    try:
        return models.path(DEFAULT_MODEL)
    except ModelError as e:
        pytest.skip(f"ASR model {DEFAULT_MODEL} not installed ({e.message})")


def test_engine_transcribes_shared_speech(model_dir: Path) -> None:
    engine = make_engine(SherpaOfflineAsrConfig(model=DEFAULT_MODEL))
    rows = asr_en_rows()
    hyps = [engine.transcribe(sf.read(ASR_EN / r["file"], dtype="float32")[0]).text
            for r in rows]
    assert wer([r["reference"] for r in rows], hyps) <= WER_BOUND, hyps
    # Silence and too-short audio give empty text, not hallucinations or errors.
    assert engine.transcribe(np.zeros(800, dtype=np.float32)).text == ""


async def daemon_events(env: dict[str, str]) -> tuple[list[BaseEvent], int]:
    cfg = load_config(None, env=env)
    d = Daemon(cfg)
    sub = d.bus.subscribe(100_000)
    rc = await d.run()
    return [e async for e in sub], rc


async def test_full_daemon_file_vad_asr(model_dir: Path,
                                        joined_recording: tuple[Path, list]) -> None:
    path, spans = joined_recording
    events, rc = await daemon_events({
        "VOICE_AGENT__AUDIO__SOURCE": "file", "VOICE_AGENT__AUDIO__FILE": str(path),
        "VOICE_AGENT__AUDIO__REALTIME": "false", "VOICE_AGENT__GATE__MODE": "vad",
        "VOICE_AGENT__ASR__PARTIALS": "false",
    })
    assert rc == 0
    ended = [e for e in events if isinstance(e, UtteranceEnded)]
    finals = {e.utterance_id: e for e in events if isinstance(e, AsrFinal)}
    assert len(ended) == len(spans) == len(finals)
    # Finals belong to utterances, in the order they were spoken.
    hyps = [finals[e.utterance_id].text for e in ended]
    refs = [r["reference"] for r in asr_en_rows()]
    assert wer(refs, hyps) <= WER_BOUND, hyps
    for e in ended:
        f = finals[e.utterance_id]
        assert f.model == DEFAULT_MODEL and f.language == "en"
        assert abs(f.audio_s - (e.audio_end_s - e.audio_start_s)) < 0.05
        assert f.decode_ms > 0 and f.eos_to_final_ms >= f.decode_ms
        assert f.session_id == e.session_id


async def test_partials_arrive_before_final_in_real_time(model_dir: Path, tmp_path: Path) -> None:
    need_shared()
    rows = [r for r in asr_en_rows() if r["file"].endswith(("0870.wav", "cards-005.wav"))]
    clips = [sf.read(ASR_EN / r["file"], dtype="float32")[0] for r in rows]
    gap = np.zeros(int(GAP_S * 16000), dtype=np.float32)
    path = tmp_path / "two.wav"
    sf.write(path, np.concatenate([gap[:8000], clips[0], gap, clips[1], gap[:8000]]), 16000)
    events, rc = await daemon_events({
        "VOICE_AGENT__AUDIO__SOURCE": "file", "VOICE_AGENT__AUDIO__FILE": str(path),
        "VOICE_AGENT__AUDIO__REALTIME": "true", "VOICE_AGENT__GATE__MODE": "vad",
    })
    assert rc == 0
    finals = [e for e in events if isinstance(e, AsrFinal)]
    assert len(finals) == 2
    for f in finals:
        partials = [e for e in events if isinstance(e, AsrPartial)
                    and e.utterance_id == f.utterance_id]
        assert partials, f"no partial before final {f.text!r}"
        assert [p.seq for p in partials] == list(range(1, len(partials) + 1))
        assert all(p.mono < f.mono for p in partials)
        assert f.partials == len(partials)
        # The last partial already holds most of the final's words.
        last = set(normalize(partials[-1].text))
        assert len(last & set(normalize(f.text))) >= len(normalize(f.text)) // 2
    assert wer([r["reference"] for r in rows], [f.text for f in finals]) <= WER_BOUND


async def test_missing_model_reported_and_daemon_keeps_segmenting(
        joined_recording: tuple[Path, list], tmp_path: Path) -> None:
    path, spans = joined_recording
    events, rc = await daemon_events({
        "VOICE_AGENT__AUDIO__SOURCE": "file", "VOICE_AGENT__AUDIO__FILE": str(path),
        "VOICE_AGENT__AUDIO__REALTIME": "false", "VOICE_AGENT__GATE__MODE": "vad",
        "VOICE_AGENT__ASR__MODEL_DIR": str(tmp_path / "no-model-here"),
    })
    assert rc == 0
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert [(e.stage, e.code) for e in errors] == [("model", "not_installed")]
    assert "no-model-here" in errors[0].message
    assert len([e for e in events if isinstance(e, UtteranceEnded)]) == len(spans)


def test_bad_model_files_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "x-tokens.txt").write_text("a 0\n")
    (tmp_path / "x-encoder.int8.onnx").write_bytes(b"\x08\x07garbage" * 100)
    (tmp_path / "x-decoder.int8.onnx").write_bytes(b"")
    files = resolve_files(tmp_path, "whisper")
    with pytest.raises(ModelError) as e:
        check_files(files, "whisper")
    assert e.value.code == "invalid_onnx" and "encoder" in e.value.message
    with pytest.raises(ModelError) as e:
        resolve_files(tmp_path, "transducer")
    assert e.value.code == "missing_file" and "joiner" in e.value.message


def test_onnx_without_metadata_is_refused_before_sherpa(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="onnx (dev/convert extra) not installed")
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for role in ("encoder", "decoder"):
        onnx.save(model, str(tmp_path / f"m-{role}.onnx"))
    (tmp_path / "m-tokens.txt").write_text("a 0\n")
    cfg = SherpaOfflineAsrConfig(model_dir=tmp_path)
    with pytest.raises(ModelError) as e:
        make_engine(cfg)  # sherpa-onnx itself would exit() the process on these files
    assert e.value.code == "bad_metadata" and "n_text_layer" in e.value.message


@pytest.mark.parametrize("text,want", [
    ("5 5 5 5 5 5 5 5 5", "5 5"),
    ("Eight of spades, four of clubs.", "Eight of spades, four of clubs."),
    ("a b a b a b a b c", "a b a b c"),
    ("no, no, no, no!", "no, no,"),
])
def test_loop_guard(text: str, want: str) -> None:
    assert collapse_loops(text) == want


@pytest.mark.slow
def test_multilingual_model_writes_chinese() -> None:
    need_shared()
    try:
        models.path("whisper-base-int8")
    except ModelError as e:
        pytest.skip(f"whisper-base-int8 not installed ({e.message})")
    engine = make_engine(SherpaOfflineAsrConfig(model="whisper-base-int8", language="zh"))
    clips = sorted((ASR_EN.parent / "zh-en-clips").glob("*.wav"))
    texts = [engine.transcribe(_load16k(p)).text for p in clips]
    han = sum(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts)
    assert han >= len(clips) - 1, texts


def _load16k(p: Path) -> np.ndarray:
    import soxr

    x, sr = sf.read(p, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    return x if sr == 16000 else soxr.resample(x, sr, 16000).astype(np.float32)


