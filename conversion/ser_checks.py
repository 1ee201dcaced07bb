#!/usr/bin/env python3
"""Conversion-time checks of the emotion model, run where librosa and torch are installed.

Tests run these through the conversion python in a subprocess (so the test process never
imports torch or librosa) and assert on the JSON printed:

    python -m conversion.ser_checks frontend --clips ../shared/data/emotion-en
        numpy front end vs librosa.feature.mfcc on the same 48 kHz samples ("same_input"),
        and vs the training loader librosa.load(sr=48000, offset=0.5, duration=3) on the
        pipeline's 16 kHz audio ("training_loader"; the resampling differs at the edges)
    python -m conversion.ser_checks parity --checkpoint PKL --model-dir DIR --clips DIR
        an installed ONNX model vs the PyTorch network, on the clips scaled by its scaler
    python -m conversion.ser_checks strict --checkpoint PKL
        loading refuses a state dict with a key missing, an extra key or a wrong shape
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def check_frontend(clips_dir: Path) -> dict[str, Any]:
    """Max and mean |ours - librosa| per clip, absolute and relative to librosa's spread."""
    import librosa
    import soxr

    from agent.emotion.frontend import MfccFrontend, mfcc, window_audio
    from conversion.ser_scaler import find_clips, load_pipeline_audio

    fe = MfccFrontend()
    spec = fe.spec
    kwargs: dict[str, Any] = {"sr": spec.sample_rate, "n_mfcc": spec.n_mfcc, "n_fft": spec.n_fft,
              "win_length": spec.win_length, "hop_length": spec.hop_length,
              "window": spec.window, "n_mels": spec.n_mels, "fmin": spec.fmin,
              "fmax": spec.fmax, "center": spec.center, "pad_mode": spec.pad_mode}
    same, loader = [], []
    for clip in find_clips(clips_dir):
        x16 = load_pipeline_audio(clip.path)
        y = window_audio(np.asarray(soxr.resample(x16, 16000, spec.sample_rate), np.float32),
                         spec)
        ref = librosa.feature.mfcc(y=y, **kwargs)
        same.append(_diff(mfcc(y, spec), ref))
        # what training did on a file at this rate: load a 3 s segment, zero-pad to 3 s
        seg, _ = librosa.load(clip.path, sr=spec.sample_rate, offset=spec.offset_s,
                              duration=spec.duration_s)
        padded = np.zeros(spec.samples, dtype=np.float32)
        padded[:len(seg)] = seg[:spec.samples]
        loader.append(_diff(fe(x16, 16000), librosa.feature.mfcc(y=padded, **kwargs)))
    return {"librosa": getattr(librosa, "__version__", "?"), "clips": len(same),
            "shape": list(fe.shape), "same_input": _summary(same),
            "training_loader": _summary(loader)}


def _diff(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    if ours.shape != ref.shape:
        raise SystemExit(f"shape {ours.shape} != librosa {ref.shape}")
    d = np.abs(ours.astype(np.float64) - ref)
    spread = float(ref.std())
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "max_rel": float(d.max() / spread), "mean_rel": float(d.mean() / spread)}


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    return {"max_abs": max(r["max_abs"] for r in rows),
            "max_rel": max(r["max_rel"] for r in rows),
            "mean_rel": float(np.mean([r["mean_rel"] for r in rows]))}


def check_parity(checkpoint: Path, model_dir: Path, clips_dir: Path) -> dict[str, Any]:
    """The installed model's ONNX vs PyTorch on real scaled features (plus unit noise)."""
    from agent.emotion.classifier import OnnxEmotionClassifier
    from conversion.ser_cnn_to_onnx import load_checkpoint, parity
    from conversion.ser_scaler import features, find_clips

    clf = OnnxEmotionClassifier(model_dir)
    assert clf.scaler is not None
    feats = clf.scaler.transform(features(find_clips(clips_dir), clf.frontend.spec))[:, None]
    noise = np.random.default_rng(1).standard_normal((8, *feats.shape[1:])).astype(np.float32)
    model = load_checkpoint(checkpoint)
    onnx_path = model_dir / str(clf.meta["model_file"])
    return {"model_id": clf.model_id, "precision": clf.meta.get("precision"),
            "clips": parity(model, onnx_path, feats), "noise": parity(model, onnx_path, noise)}


def check_strict(checkpoint: Path) -> dict[str, Any]:
    """Whether the loader refuses each kind of mismatched state dict (True = refused)."""
    import torch

    from conversion.ser_cnn_to_onnx import build_torch_model

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    variants = {"intact": dict(state)}
    missing = dict(state)
    missing.pop("fc1_linear.bias")
    variants["missing_key"] = missing
    variants["extra_key"] = {**state, "transformer_encoder.weight": torch.zeros(1)}
    variants["wrong_shape"] = {**state, "fc1_linear.weight": torch.zeros(8, 1064)}
    refused = {}
    for name, sd in variants.items():
        try:
            build_torch_model().load_state_dict(sd, strict=True)
            refused[name] = False
        except RuntimeError:
            refused[name] = True
    return {"refused": refused, "keys": len(state)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one check and print its JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="check", required=True)
    f = sub.add_parser("frontend")
    f.add_argument("--clips", type=Path, required=True)
    q = sub.add_parser("parity")
    q.add_argument("--checkpoint", type=Path, required=True)
    q.add_argument("--model-dir", type=Path, required=True)
    q.add_argument("--clips", type=Path, required=True)
    s = sub.add_parser("strict")
    s.add_argument("--checkpoint", type=Path, required=True)
    args = p.parse_args(argv)
    if args.check == "frontend":
        out = check_frontend(args.clips)
    elif args.check == "parity":
        out = check_parity(args.checkpoint, args.model_dir, args.clips)
    else:
        out = check_strict(args.checkpoint)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
