#!/usr/bin/env python3
"""Export Resemblyzer's GE2E speaker encoder (``pretrained.pt``) to ONNX, and check it.

Script-recipe contract (``voice-agent models install ge2e-resemblyzer``)::

    python -m conversion.ge2e_to_onnx --input weights=resemblyzer/pretrained.pt --output-dir DIR

writes ``DIR/ge2e_encoder.onnx``: input ``mels`` (batch, frames, 40) power mel (not log),
output ``embeds`` (batch, 256), each row ReLU'd and L2-normalised, i.e. one partial-window
embedding per batch row. The daemon's numpy front end (`agent.speaker.frontend`) makes the
mels and averages the partial embeddings. The network is the wheel's ``VoiceEncoder``
(3-layer LSTM 40->256, Linear 256->256, ReLU, L2 norm), rebuilt here and loaded strictly:
only the two GE2E-loss scalars, which inference never uses, are dropped from the checkpoint.

After the export, ONNX and torch are compared on random and speech-like mels (the export
fails if any cosine is under 0.99999). ``--quantize int8`` also writes a dynamically
quantized copy for experiments: it is not shipped, because it breaks this LSTM (see
bench/speaker.py ``--model-file``: EER 0.44 % -> 21 %).

Checks of the numpy front end (need librosa and, for ``--check-resemblyzer``, the
Resemblyzer package itself, both conversion-time only)::

    python -m conversion.ge2e_to_onnx --check-mel WAV [WAV ...]
    python -m conversion.ge2e_to_onnx --check-resemblyzer --model DIR/ge2e_encoder.onnx WAV ...

Each prints one JSON line with the figures, and exits 1 when a tolerance is missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17
ONNX_NAME = "ge2e_encoder.onnx"
N_MELS = 40
HIDDEN = 256
EMBED = 256
LAYERS = 3
PARTIAL_FRAMES = 160
# Training-only parameters of the GE2E loss (similarity scale and bias): not part of inference.
LOSS_KEYS = ("similarity_weight", "similarity_bias")
PARITY_MIN_COSINE = 0.99999
MEL_MAX_REL_ERR = 1e-5  # relative to each clip's largest mel value
RESEMBLYZER_MIN_COSINE = 0.9999


def _build_encoder() -> Any:
    """The wheel's VoiceEncoder network, without its loading and device code."""
    import torch
    from torch import nn

    class Ge2eEncoder(nn.Module):
        """LSTM over mel frames; the last layer's final hidden state -> ReLU'd, L2-normed."""

        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
            self.linear = nn.Linear(HIDDEN, EMBED)
            self.relu = nn.ReLU()

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (hidden, _) = self.lstm(mels)
            raw = self.relu(self.linear(hidden[-1]))
            return raw / torch.norm(raw, dim=1, keepdim=True)

    return Ge2eEncoder()


def load_encoder(weights: Path) -> Any:
    """Build the encoder and load ``pretrained.pt`` strictly (loss scalars dropped)."""
    import torch

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    state = ckpt["model_state"] if isinstance(ckpt, dict) and "model_state" in ckpt else ckpt
    state = {k: v for k, v in state.items() if k not in LOSS_KEYS}
    model = _build_encoder()
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def export(model: Any, path: Path) -> None:
    """TorchScript-based export with a dynamic batch (partial windows) and frame axis."""
    import torch

    dummy = torch.rand(3, PARTIAL_FRAMES, N_MELS)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["mels"],
            output_names=["embeds"],
            dynamic_axes={"mels": {0: "batch", 1: "frames"}, "embeds": {0: "batch"}},
        )
    _add_metadata(path)


def _add_metadata(path: Path) -> None:
    """Record what the front end must feed, so the loader can refuse a mismatched file."""
    import onnx

    m = onnx.load(str(path))
    meta = {
        "framework": "ge2e-resemblyzer",
        "sample_rate": "16000",
        "n_mels": str(N_MELS),
        "mel": "power",
        "partial_frames": str(PARTIAL_FRAMES),
        "output_dim": str(EMBED),
        "source": "Resemblyzer==0.1.4 resemblyzer/pretrained.pt (Apache-2.0)",
    }
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def _speechlike_mels(n: int, rng: np.random.Generator) -> np.ndarray:
    """Power mels with a speech-like dynamic range (1e-6..1e2, slowly varying)."""
    log_mel = rng.normal(-4.0, 2.5, size=(n, PARTIAL_FRAMES, N_MELS))
    log_mel = np.cumsum(log_mel * 0.2, axis=1) / np.sqrt(np.arange(1, PARTIAL_FRAMES + 1))[
        None, :, None
    ] - 3.0
    return np.exp(np.clip(log_mel, -14, 5)).astype(np.float32)


def parity(model: Any, onnx_path: Path, n: int = 16, seed: int = 0) -> dict[str, float]:
    """Torch vs onnxruntime on random and speech-like mels: min cosine, max abs diff."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    batches = [rng.random((n, PARTIAL_FRAMES, N_MELS), dtype=np.float32),
               _speechlike_mels(n, rng),
               rng.random((2, 300, N_MELS), dtype=np.float32)]  # a longer frame axis
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    cos_min, diff_max = 1.0, 0.0
    for mels in batches:
        with torch.no_grad():
            ref = model(torch.from_numpy(mels)).numpy()
        got = sess.run(None, {"mels": mels})[0]
        cos = np.sum(ref * got, axis=1) / (
            np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
        )
        cos_min = min(cos_min, float(cos.min()))
        diff_max = max(diff_max, float(np.abs(ref - got).max()))
    return {"min_cosine": cos_min, "max_abs_diff": diff_max}


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 (LSTM + MatMul weights): an experiment only, never shipped."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


# --------------------------------------------------------------------------------------------
# Front-end checks (librosa / Resemblyzer as references; conversion-time only)
# --------------------------------------------------------------------------------------------


def _read16k(path: Path) -> np.ndarray:
    """A 16 kHz mono float32 clip."""
    import soundfile as sf

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != 16000:
        raise SystemExit(f"{path}: {sr} Hz, need 16 kHz")
    return np.ascontiguousarray(x.mean(axis=1), dtype=np.float32)


def check_mel(wavs: Sequence[Path]) -> dict[str, Any]:
    """Our numpy power mel vs librosa.feature.melspectrogram with Resemblyzer's settings."""
    import librosa

    from agent.speaker.frontend import HOP, N_FFT, mel_spectrogram

    worst = 0.0
    frames = 0
    for p in wavs:
        x = _read16k(p)
        ref = librosa.feature.melspectrogram(
            y=x, sr=16000, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS
        ).astype(np.float32).T
        got = mel_spectrogram(x)
        if ref.shape != got.shape:
            return {"ok": False, "error": f"{p}: shape {got.shape} != librosa {ref.shape}"}
        worst = max(worst, float(np.abs(ref - got).max() / max(float(ref.max()), 1e-12)))
        frames += ref.shape[0]
    return {"ok": worst <= MEL_MAX_REL_ERR, "max_rel_err": worst, "frames": frames,
            "clips": len(wavs), "librosa": str(getattr(librosa, "__version__", "?"))}


def check_resemblyzer(model_path: Path, wavs: Sequence[Path]) -> dict[str, Any]:
    """Our whole embedding (numpy front end + ONNX) vs Resemblyzer's own torch pipeline."""
    import torch
    from resemblyzer import VoiceEncoder, preprocess_wav

    torch.set_num_threads(1)  # a check, not a race: don't fight the other jobs for cores

    from agent.speaker.embedder import Ge2eEmbedder

    enc = VoiceEncoder("cpu", verbose=False)
    ours = Ge2eEmbedder(model_path)
    cos: list[float] = []
    trim: list[int] = []
    for p in wavs:
        x = _read16k(p)
        ref_wav = preprocess_wav(x)
        ref = enc.embed_utterance(ref_wav)
        got = ours.extract(x)
        ours_wav, _ = ours.preprocess(x)
        trim.append(abs(len(ours_wav) - len(ref_wav)))
        cos.append(float(np.dot(ref, got.vector)))
    return {"ok": min(cos) >= RESEMBLYZER_MIN_COSINE and max(trim) == 0,
            "min_cosine": min(cos), "mean_cosine": float(np.mean(cos)),
            "max_trim_diff_samples": max(trim), "clips": len(wavs)}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _roles(items: Sequence[str]) -> dict[str, Path]:
    """``ROLE=PATH`` pairs of the script recipe -> dict."""
    out: dict[str, Path] = {}
    for item in items:
        role, sep, path = item.partition("=")
        if not sep or not role or not path:
            raise SystemExit(f"--input wants ROLE=PATH, got {item!r}")
        out[role] = Path(path)
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--input", action="append", default=[], metavar="ROLE=PATH",
                   help="staged source member; this recipe needs weights=pretrained.pt")
    p.add_argument("--output-dir", type=Path, help="where ge2e_encoder.onnx is written")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="also write ge2e_encoder.int8.onnx (experiment; not shipped)")
    p.add_argument("--check-mel", nargs="+", type=Path, metavar="WAV",
                   help="compare the numpy mel with librosa on these 16 kHz clips")
    p.add_argument("--check-resemblyzer", nargs="+", type=Path, metavar="WAV",
                   help="compare whole embeddings with the Resemblyzer package")
    p.add_argument("--model", type=Path, help="ONNX file for --check-resemblyzer")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: export (script recipe) or one of the front-end checks."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    if args.check_mel:
        res = check_mel(args.check_mel)
        print(json.dumps(res))
        return 0 if res["ok"] else 1
    if args.check_resemblyzer:
        if not args.model:
            raise SystemExit("--check-resemblyzer needs --model")
        res = check_resemblyzer(args.model, args.check_resemblyzer)
        print(json.dumps(res))
        return 0 if res["ok"] else 1
    roles = _roles(args.input)
    if "weights" not in roles or args.output_dir is None:
        raise SystemExit("export needs --input weights=PATH and --output-dir DIR")
    t0 = time.perf_counter()
    model = load_encoder(roles["weights"])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / ONNX_NAME
    export(model, out)
    res = parity(model, out)
    log.info("exported %s (%.1f MB) in %.1f s; torch vs onnx: min cosine %.7f, max |diff| %.2e",
             out, out.stat().st_size / 1e6, time.perf_counter() - t0,
             res["min_cosine"], res["max_abs_diff"])
    if res["min_cosine"] < PARITY_MIN_COSINE:
        log.error("ONNX export does not match torch (min cosine %.6f)", res["min_cosine"])
        out.unlink()
        return 1
    if args.quantize == "int8":
        q = args.output_dir / "ge2e_encoder.int8.onnx"
        quantize_int8(out, q)
        log.info("wrote %s (%.1f MB; experiment, not shipped)", q, q.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
