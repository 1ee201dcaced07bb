"""Emotion model conversion: front end vs librosa, ONNX vs PyTorch, strict checkpoint loading.

Everything that needs torch or librosa runs in the conversion python (a subprocess), so this
test process never imports them. CI needs, in that python: torch, onnx, onnxruntime, librosa.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.models.installer import conversion_python
from tests.conftest import REPO, SHARED

CLIPS = SHARED / "data" / "emotion-en"
CHECKPOINT = SHARED / "models" / "ser-ravdess-cnn" / "parallel_all_you_wantFINAL-429.pkl"


def _need(*modules: str) -> str:
    """The conversion python, or skip (with what is missing) when it lacks a module or data."""
    if not CHECKPOINT.exists() or not any(CLIPS.glob("*.wav")):
        pytest.skip(f"shared emotion data not found at {CLIPS} / {CHECKPOINT}")
    py = conversion_python()
    probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in " \
            f"{list(modules)!r}))"
    if subprocess.run([py, "-c", probe], cwd=REPO).returncode:
        pytest.skip(f"conversion python {py} lacks one of {modules} "
                    "(pip install -e '.[convert]' librosa)")
    return py


def _run(py: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([py, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both precisions converted by the script-recipe command line into fresh folders."""
    py = _need("torch", "onnx", "onnxruntime")
    out = {}
    for precision in ("fp32", "int8"):
        d = tmp_path_factory.mktemp(f"ser-{precision}")
        proc = _run(py, "-m", "conversion.ser_cnn_to_onnx", "--input",
                    f"checkpoint={CHECKPOINT}", "--output-dir", str(d),
                    "--precision", precision)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[precision] = d
    return out


def test_frontend_matches_librosa() -> None:
    """Same 48 kHz samples: within float32 rounding of librosa.feature.mfcc (1e-5 of spread).

    Through the training loader (librosa.load resamples only the 3 s segment) the edge
    frames differ a little; on average the features agree to 1e-4 of their spread.
    """
    py = _need("librosa", "soxr")
    r = _json(_run(py, "-m", "conversion.ser_checks", "frontend", "--clips", str(CLIPS)))
    assert r["clips"] == 60 and r["shape"] == [40, 282]
    assert r["same_input"]["max_rel"] < 1e-5, r
    assert r["same_input"]["max_abs"] < 1e-2, r
    assert r["training_loader"]["mean_rel"] < 1e-4, r


def test_conversion_writes_the_recipe_files(converted: dict[str, Path]) -> None:
    """Every file the manifest names, and a model.json the classifier can use."""
    sizes = {}
    for precision, d in converted.items():
        meta = json.loads((d / "model.json").read_text())
        model_file = d / meta["model_file"]
        assert model_file.is_file() and (d / "scaler.npz").is_file()
        assert meta["precision"] == precision and meta["task"] == "emotion"
        assert meta["labels"][0] == "surprised" and len(meta["labels"]) == 8
        assert meta["input"]["shape"] == [1, 1, 40, 282]
        assert len(meta["source"]["checkpoint_sha256"]) == 64
        assert not list(d.glob(".convert-*")), "temporary folder left behind"
        sizes[precision] = model_file.stat().st_size
    # int8 weights: about a third of the fp32 file
    assert sizes["int8"] < 0.5 * sizes["fp32"], sizes


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_matches_pytorch(converted: dict[str, Path], precision: str) -> None:
    """On the 60 real clips (scaled) and on noise: fp32 is exact, int8 keeps every argmax."""
    py = _need("torch", "onnxruntime")
    r = _json(_run(py, "-m", "conversion.ser_checks", "parity", "--checkpoint",
                   str(CHECKPOINT), "--model-dir", str(converted[precision]),
                   "--clips", str(CLIPS)))
    assert r["clips"]["inputs"] == 60
    assert r["clips"]["argmax_agree"] == 1.0, r
    if precision == "fp32":
        assert r["clips"]["max_prob_diff"] < 1e-4 and r["noise"]["max_prob_diff"] < 1e-4, r
    else:
        assert r["clips"]["max_prob_diff"] < 0.05, r


def test_checkpoint_loads_strictly() -> None:
    """The rebuilt network takes the checkpoint as is and refuses any other key set."""
    py = _need("torch")
    r = _json(_run(py, "-m", "conversion.ser_checks", "strict", "--checkpoint",
                   str(CHECKPOINT)))
    assert r["refused"] == {"intact": False, "missing_key": True, "extra_key": True,
                            "wrong_shape": True}


def test_converter_refuses_bad_input(tmp_path: Path) -> None:
    """No checkpoint role, or a file that is no checkpoint: non-zero exit, nothing written."""
    py = _need("torch", "onnx")
    out = tmp_path / "out"
    proc = _run(py, "-m", "conversion.ser_cnn_to_onnx", "--input", "clips=x",
                "--output-dir", str(out))
    assert proc.returncode != 0 and "checkpoint" in proc.stderr
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a checkpoint")
    proc = _run(py, "-m", "conversion.ser_cnn_to_onnx", "--input", f"checkpoint={bad}",
                "--output-dir", str(out))
    assert proc.returncode != 0
    assert not out.exists() or not any(out.iterdir())


def test_no_torch_or_librosa_in_the_runtime_package() -> None:
    """Importing agent.emotion (and the scaler script) pulls in neither torch nor librosa."""
    code = ("import sys, agent.emotion, agent.emotion.sense_voice, conversion.ser_scaler; "
            "sys.exit(bool({'torch', 'librosa'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
