"""Execution providers: asking for a GPU where there is none warns once and runs on CPU.

Real onnxruntime sessions (Silero VAD) and a real sherpa-onnx recognizer (Whisper int8) are
built with what `select()` returns, and decode real speech.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import providers
from agent.errors import ModelError
from tests.conftest import ASR_EN
from tests.mosquitto import free_port

EXE = Path(sys.executable).parent / "voice-agent"


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    """Each test starts with no recorded providers and no warnings given."""
    providers.forget()
    providers._warned.clear()
    providers._last.clear()
    yield
    providers.forget()


def _no_gpu() -> None:
    if providers.probe_onnxruntime("cuda") is None:
        pytest.skip("CUDA works on this machine: the fallback cannot be tested here")


def _model(model_id: str) -> Path:
    from agent import models

    try:
        return Path(models.path(model_id))
    except Exception as e:
        pytest.skip(f"{model_id} not installed: {e}")


def _clip() -> tuple[np.ndarray, int]:
    clip = ASR_EN / "cards-005.wav"
    if not clip.exists():
        pytest.skip(f"shared speech not found at {clip}")
    x, sr = sf.read(clip, dtype="float32")
    return x, sr


def test_cuda_without_a_gpu_warns_once_and_runs_silero_on_cpu(
        caplog: pytest.LogCaptureFixture) -> None:
    """One warning naming the reason; the session really runs, on CPU, and says so."""
    _no_gpu()
    import onnxruntime as ort

    with caplog.at_level(logging.WARNING, logger="agent.providers"):
        sel = providers.select("cuda")
        again = providers.select("cuda")
    warnings = [r.message for r in caplog.records if r.name == "agent.providers"]
    assert len(warnings) == 1 and "cuda" in warnings[0] and "running on cpu" in warnings[0]
    assert sel == again and sel.provider == "cpu" and sel.fallback and sel.reason
    assert sel.ort_providers() == ["CPUExecutionProvider"] and sel.sherpa == "cpu"
    sess = ort.InferenceSession(str(_model("silero-vad") / "silero_vad.onnx"),
                                providers=sel.ort_providers())
    assert providers.record_session("vad", sess) == "cpu"
    audio, _ = _clip()
    state = np.zeros((2, 1, 128), np.float32)
    probs = []
    for i in range(0, len(audio) - 512, 512):
        frame = np.concatenate([np.zeros(64, np.float32), audio[i:i + 512]])[None]
        out, state = sess.run(None, {"input": frame, "state": state, "sr": np.array(16000)})
        probs.append(float(out[0][0]))
    assert max(probs) > 0.5 and min(probs) < 0.5  # speech and silence both found
    assert providers.in_use() == {"vad": "cpu"} and providers.summary() == "cpu"


def test_sherpa_whisper_on_the_selected_provider_transcribes(
        caplog: pytest.LogCaptureFixture) -> None:
    """sherpa-onnx from PyPI has no CUDA: `cuda` becomes `cpu`, and Whisper still works."""
    import sherpa_onnx

    if providers.probe_sherpa("cuda") is None:
        pytest.skip("sherpa-onnx runs on CUDA here")
    with caplog.at_level(logging.WARNING, logger="agent.providers"):
        sel = providers.select("cuda", engine="sherpa")
    assert sel.sherpa == "cpu" and "sherpa-onnx" in (sel.reason or "")
    assert any("sherpa" in r.message for r in caplog.records)
    d = _model("whisper-tiny.en-int8")
    rec = sherpa_onnx.OfflineRecognizer.from_whisper(
        encoder=str(d / "tiny.en-encoder.int8.onnx"),
        decoder=str(d / "tiny.en-decoder.int8.onnx"), tokens=str(d / "tiny.en-tokens.txt"),
        language="en", task="transcribe", num_threads=1, provider=sel.sherpa)
    audio, sr = _clip()
    stream = rec.create_stream()
    stream.accept_waveform(sr, audio)
    rec.decode_stream(stream)
    assert "spades" in stream.result.text.lower()
    providers.record("asr", sel.sherpa)
    assert providers.in_use() == {"asr": "cpu"}
    assert 'voice_agent_execution_provider{component="asr",provider="cpu"} 1' in (
        providers.prometheus_lines())


def test_strict_refuses_instead_of_falling_back() -> None:
    """runtime.strict: a typed error with a stable code, nothing silently on CPU."""
    _no_gpu()
    with pytest.raises(ModelError) as e:
        providers.select("cuda", strict=True)
    assert e.value.code == "provider_unavailable" and "cuda" in e.value.message
    with pytest.raises(ModelError) as e:
        providers.select("tensorrt", strict=True)
    assert e.value.code == "provider_unavailable"


def test_tensorrt_falls_back_through_cuda_to_cpu() -> None:
    """Both reasons are given; the providers list is CPU only."""
    _no_gpu()
    sel = providers.select("tensorrt", trt_cache_dir=Path("/var/lib/voice-agent/trt"))
    assert sel.provider == "cpu" and sel.requested == "tensorrt"
    assert "Tensorrt" in (sel.reason or "") and "CUDA" in (sel.reason or "")


def test_gpu_provider_lists_put_cpu_last_and_cache_tensorrt_engines() -> None:
    """What a GPU machine would pass to onnxruntime (no GPU needed to build the list)."""
    trt = providers.Selection("tensorrt", "tensorrt", "onnxruntime", device_id=1,
                              trt_cache_dir=Path("/var/lib/voice-agent/trt"))
    names = [p[0] if isinstance(p, tuple) else p for p in trt.ort_providers()]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                     "CPUExecutionProvider"]
    opts = dict(trt.ort_providers()[0][1])  # type: ignore[arg-type]
    assert opts["trt_engine_cache_path"] == "/var/lib/voice-agent/trt"
    assert opts["device_id"] == "1" and trt.sherpa == "trt"


def test_unknown_provider_is_a_clear_error() -> None:
    """A typo is not silently CPU."""
    with pytest.raises(ModelError) as e:
        providers.select("gpu")
    assert e.value.code == "bad_provider" and e.value.status == 400


def test_probe_model_is_a_valid_onnx_graph() -> None:
    """The hand-built probe model loads and computes Identity."""
    import onnxruntime as ort

    sess = ort.InferenceSession(providers.probe_model(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.array([4.25], np.float32)})
    assert y.tolist() == [4.25]
    assert providers.probe_onnxruntime("cpu") is None


def test_summary_reports_mixed_and_the_last_selection() -> None:
    """Nothing loaded: the provider last selected; two different ones: `mixed`."""
    assert providers.summary() == "cpu"
    providers.record("asr", "cuda")
    providers.record("vad", "cpu")
    assert providers.summary() == "mixed"
    providers.forget(["asr"])
    assert providers.in_use() == {"vad": "cpu"}


@pytest.mark.slow
def test_daemon_asked_for_cuda_reports_cpu_in_health(tmp_path: Path) -> None:
    """`voice-agent run` with runtime.provider cuda: the warning, and health says cpu."""
    _no_gpu()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT")}
    env.update(VOICE_AGENT__RUNTIME__PROVIDER="cuda", VOICE_AGENT__API__ENABLED="true",
               VOICE_AGENT__API__PORT=str(port), VOICE_AGENT__STATE_DIR=str(tmp_path))
    proc = subprocess.Popen([str(EXE), "run", "--source", "stdin"], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    health: dict[str, object] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not health.get("ready"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health",
                                            timeout=2) as r:
                    health = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert health.get("provider") == "cpu", health
    assert err.count("runtime.provider cuda is unavailable") >= 1, err[-2000:]
