#!/usr/bin/env python3
"""Convert the RAVDESS speech-emotion CNN checkpoint to ONNX (fp32 or int8) with its scaler.

Script-recipe contract (run by `voice-agent models install`, or by hand)::

    python -m conversion.ser_cnn_to_onnx --input checkpoint=parallel_all_you_wantFINAL-429.pkl \
        --output-dir models_onnx/ser-ravdess-cnn-int8 [--precision int8|fp32] [--model-id ID] \
        [--scaler FILE | --input clips=DIR] [--check-clips DIR]

Writes into --output-dir:
  * `ser-ravdess-cnn.int8.onnx` (dynamic int8) or `ser-ravdess-cnn.onnx` (fp32):
    input `mfcc` (N, 1, 40, 282) scaled MFCCs -> output `logits` (N, 8), native class order
    surprised, neutral, calm, happy, sad, angry, fearful, disgust;
  * `scaler.npz`: per-element mean/scale (see conversion/ser_scaler.py), by default the
    statistics shipped in conversion/data/ (fitted on the 60 shared RAVDESS clips);
  * `model.json`: labels, label map, front end, input/output, scaler and provenance, which
    agent.emotion.classifier.OnnxEmotionClassifier reads.

The network (two parallel conv blocks, fc over both flattened) is rebuilt in PyTorch and the
state dict loaded strictly; ONNX is checked against PyTorch before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.emotion.frontend import FrontendSpec
from agent.emotion.scaler import Scaler

log = logging.getLogger(__name__)

OPSET = 17
NATIVE_LABELS = ("surprised", "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust")
SPEC = FrontendSpec()
INPUT_SHAPE = (1, 1, SPEC.n_mfcc, SPEC.frames)
# Parity thresholds on softmax probabilities: fp32 is the same arithmetic, int8 is not.
FP32_MAX_PROB_DIFF = 1e-4
INT8_MAX_PROB_DIFF = 0.15
UPSTREAM = "https://github.com/IliaZenkov/transformer-cnn-emotion-recognition"


def build_torch_model() -> Any:
    """The checkpoint's network: two identical conv blocks in parallel, one linear layer."""
    import torch
    from torch import nn

    def conv_block() -> nn.Sequential:
        # Indices match the checkpoint keys (conv 0/5/10, batch norm 1/6/11).
        return nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(kernel_size=2, stride=2), nn.Dropout(0.3),
            nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(kernel_size=4, stride=4), nn.Dropout(0.3),
            nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(kernel_size=4, stride=4), nn.Dropout(0.3),
        )

    class ParallelCnn(nn.Module):
        """40 x 282 MFCCs -> 8 logits; each block ends at 64 x 1 x 8, 512 values."""

        def __init__(self) -> None:
            super().__init__()
            self.conv2Dblock1 = conv_block()
            self.conv2Dblock2 = conv_block()
            self.fc1_linear = nn.Linear(1024, len(NATIVE_LABELS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.flatten(self.conv2Dblock1(x), start_dim=1)
            b = torch.flatten(self.conv2Dblock2(x), start_dim=1)
            return self.fc1_linear(torch.cat([a, b], dim=1))

    return ParallelCnn()


def load_checkpoint(path: Path) -> Any:
    """The network with the checkpoint loaded strictly (every key, every shape), in eval mode."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_torch_model()
        model.load_state_dict(state, strict=True)
    except Exception as e:  # unpickling and key/shape mismatches raise many types
        raise SystemExit(f"{path}: not the RAVDESS CNN state dict: {type(e).__name__}: "
                         f"{str(e)[:500]}") from e
    return model.eval()


def torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    """Run the PyTorch network on scaled features (N, 1, 40, 282)."""
    import torch

    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy())


def export_onnx(model: Any, path: Path) -> None:
    """TorchScript-based export, dynamic batch."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(INPUT_SHAPE),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["mfcc"], output_names=["logits"],
            dynamic_axes={"mfcc": {0: "batch"}, "logits": {0: "batch"}},
        )


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: weights int8 offline, activations quantized per call (no calibration data).

    onnxruntime's CPU ConvInteger takes only uint8 weights, so the convs get QUInt8.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # silences "Please consider to run pre-processing ..."
    try:
        quantize_dynamic(model_input=str(src), model_output=str(dst),
                         op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                         weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Run an exported model on scaled features, one clip at a time (as the daemon does)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"mfcc": x[i:i + 1]})[0] for i in range(len(x))])


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def parity(model: Any, onnx_path: Path, x: np.ndarray) -> dict[str, Any]:
    """ONNX vs PyTorch on the same inputs: max |logit| and |probability| gaps, argmax agreement."""
    ref, got = torch_logits(model, x), onnx_logits(onnx_path, x)
    pr, pg = softmax(ref), softmax(got)
    return {
        "inputs": len(x),
        "max_logit_diff": float(np.abs(ref - got).max()),
        "max_prob_diff": float(np.abs(pr - pg).max()),
        "argmax_agree": float((ref.argmax(1) == got.argmax(1)).mean()),
    }


def check_inputs(scaler: Scaler, clips_dir: Path | None, seed: int = 0) -> np.ndarray:
    """Scaled features to compare on: real clips when given, plus unit-normal noise."""
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((8, *INPUT_SHAPE[1:])).astype(np.float32)]
    if clips_dir is not None:
        from conversion.ser_scaler import features, find_clips

        feats = scaler.transform(features(find_clips(clips_dir), SPEC))
        parts.append(feats[:, None])
    return np.concatenate(parts)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_json(model_id: str, model_file: str, precision: str, scaler_info: dict[str, Any],
               checkpoint: Path) -> dict[str, Any]:
    """What OnnxEmotionClassifier needs to run any such model, and where this one came from."""
    return {
        "format": 1,
        "model_id": model_id,
        "task": "emotion",
        "backend": "onnxruntime",
        "model_file": model_file,
        "precision": precision,
        "labels": list(NATIVE_LABELS),
        "label_map": {label: label for label in NATIVE_LABELS},
        "frontend": SPEC.to_dict(),
        "input": {"name": "mfcc", "shape": list(INPUT_SHAPE)},
        "output": {"name": "logits", "activation": "softmax"},
        "scaler": scaler_info,
        "trained_on": "RAVDESS: acted English speech, 48 kHz",
        "source": {"upstream": UPSTREAM, "checkpoint": checkpoint.name,
                   "checkpoint_sha256": _sha256(checkpoint), "licence": "MIT"},
    }


def _parse_inputs(items: Sequence[str]) -> dict[str, Path]:
    roles: dict[str, Path] = {}
    for item in items:
        role, sep, value = item.partition("=")
        if not sep or not role or not value:
            raise SystemExit(f"--input wants ROLE=PATH, got {item!r}")
        roles[role] = Path(value)
    unknown = sorted(set(roles) - {"checkpoint", "clips"})
    if unknown:
        raise SystemExit(f"unknown --input role(s): {', '.join(unknown)} (checkpoint, clips)")
    if "checkpoint" not in roles:
        raise SystemExit("--input checkpoint=PATH is required")
    return roles


def convert(checkpoint: Path, out_dir: Path, *, precision: str = "int8",
            model_id: str | None = None, scaler_path: Path | None = None,
            fit_clips: Path | None = None, check_clips: Path | None = None) -> dict[str, Any]:
    """Build every output file in a temporary folder, check parity, then move them into place."""
    from conversion.ser_scaler import DEFAULT_STATS, features, find_clips

    model = load_checkpoint(checkpoint)
    if fit_clips is not None:
        clips = find_clips(fit_clips)
        scaler = Scaler.fit(features(clips, SPEC))
        scaler_info = {"file": "scaler.npz", "kind": scaler.kind, "fitted_on":
                       f"{len(clips)} clips in {fit_clips.name}/ (16 kHz pipeline path)"}
    else:
        src = scaler_path or DEFAULT_STATS
        scaler = Scaler.load(src)
        scaler_info = {"file": "scaler.npz", "kind": scaler.kind, "fitted_on":
                       "the 60 shared RAVDESS Actor_01 clips (16 kHz pipeline path)"
                       if src == DEFAULT_STATS else src.name}
    if scaler.mean.shape != INPUT_SHAPE[2:]:
        raise SystemExit(f"scaler shape {scaler.mean.shape} != features {INPUT_SHAPE[2:]}")
    model_file = "ser-ravdess-cnn.int8.onnx" if precision == "int8" else "ser-ravdess-cnn.onnx"
    model_id = model_id or f"ser-ravdess-cnn-{precision}"
    x = check_inputs(scaler, check_clips)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".convert-") as tmp:
        work = Path(tmp)
        fp32 = work / "ser-ravdess-cnn.onnx"
        export_onnx(model, fp32)
        report = {"fp32": parity(model, fp32, x)}
        if report["fp32"]["max_prob_diff"] > FP32_MAX_PROB_DIFF:
            raise SystemExit(f"fp32 ONNX differs from PyTorch: {report['fp32']}")
        if precision == "int8":
            quantize_int8(fp32, work / model_file)
            report["int8"] = parity(model, work / model_file, x)
            if report["int8"]["max_prob_diff"] > INT8_MAX_PROB_DIFF:
                raise SystemExit(f"int8 ONNX strays too far from PyTorch: {report['int8']}")
        scaler.save(work / "scaler.npz")
        meta = model_json(model_id, model_file, precision, scaler_info, checkpoint)
        meta["parity"] = report
        (work / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name in (model_file, "scaler.npz", "model.json"):
            shutil.move(str(work / name), out_dir / name)
    sizes = {n: (out_dir / n).stat().st_size for n in (model_file, "scaler.npz", "model.json")}
    return {"model_id": model_id, "files": sizes, "parity": report}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (the script-recipe contract)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--input", action="append", default=[], metavar="ROLE=PATH",
                   help="checkpoint=PKL (required); clips=DIR fits the scaler on those clips")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--precision", choices=("int8", "fp32"), default="int8")
    p.add_argument("--model-id", help="written into model.json (default ser-ravdess-cnn-PREC)")
    p.add_argument("--scaler", type=Path, help="statistics .npz (default: the shipped ones)")
    p.add_argument("--check-clips", type=Path, help="also compare ONNX and PyTorch on these")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    roles = _parse_inputs(args.input)
    result = convert(roles["checkpoint"], args.output_dir, precision=args.precision,
                     model_id=args.model_id, scaler_path=args.scaler,
                     fit_clips=roles.get("clips"), check_clips=args.check_clips)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
