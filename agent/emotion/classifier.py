"""Emotion classifiers behind one small synchronous interface, and the ONNX one.

`EmotionClassifier.classify(audio)` takes float32 16 kHz mono audio in [-1, 1] and returns an
`EmotionResult` over the canonical labels of `agent.emotion.labels`. Classifiers are
thread-safe and do all their work in the calling thread: the daemon calls them from its
decode workers, never on the event loop.

`OnnxEmotionClassifier` runs any ONNX classifier whose folder has a `model.json`:

    {"model_id": "...", "model_file": "x.onnx",
     "labels": [native labels in output order], "label_map": {native: canonical},  # optional
     "frontend": {FrontendSpec fields}, "input": {"name": "mfcc", "shape": [1, 1, 40, 282]},
     "output": {"name": "logits", "activation": "softmax" | "none"},
     "scaler": {"file": "scaler.npz"} | null}

Native labels that map to the same canonical label add up; those with no canonical
equivalent are dropped and the rest renormalised.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.constants import PIPELINE_RATE
from agent.emotion.frontend import FrontendSpec, MfccFrontend
from agent.emotion.labels import LABELS, canonical
from agent.emotion.scaler import Scaler
from agent.errors import EmotionError, ModelError

log = logging.getLogger(__name__)

#: Shortest audio any classifier accepts; shorter clips are refused, longer ones are padded.
MIN_AUDIO_S = 0.25
#: Audio whose peak stays below this (-60 dBFS) is silence, not speech.
SILENCE_PEAK = 10 ** (-60 / 20)


@dataclass(frozen=True)
class EmotionResult:
    """One model's verdict on one clip, over canonical labels."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    model_id: str
    compute_ms: float = 0.0
    #: False for backends that only give a tag (probabilities one-hot, confidence 1.0).
    calibrated: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the `models` entries of emotion.detected, the analyze reply)."""
        d: dict[str, Any] = {
            "model": self.model_id, "label": self.label,
            "confidence": round(self.confidence, 4),
            "probabilities": {k: round(v, 4) for k, v in self.probabilities.items()},
            "compute_ms": round(self.compute_ms, 2), "calibrated": self.calibrated,
        }
        d.update(self.extra)
        return d


def result_from_probabilities(probabilities: dict[str, float], model_id: str,
                              compute_ms: float = 0.0, calibrated: bool = True,
                              extra: dict[str, Any] | None = None) -> EmotionResult:
    """Normalise canonical-label probabilities and take the argmax (ties: label order)."""
    probs = {label: max(0.0, float(probabilities.get(label, 0.0))) for label in LABELS}
    total = sum(probs.values())
    if not total > 0:
        raise EmotionError("no_probabilities", f"{model_id} gave no probability mass", status=500)
    probs = {k: v / total for k, v in probs.items()}
    label = max(LABELS, key=lambda k: probs[k])
    return EmotionResult(label, probs[label], probs, model_id, compute_ms, calibrated,
                         dict(extra or {}))


def check_audio(audio: Any, sample_rate: int = PIPELINE_RATE,
                min_audio_s: float = MIN_AUDIO_S) -> np.ndarray:
    """Validated float32 mono samples, or EmotionError with a code a client can act on.

    Codes: `bad_audio` (not a 1-D numeric array, NaN/inf, or not scaled to [-1, 1]),
    `empty_audio`, `too_short` (under `min_audio_s`), `silent` (peak below -60 dBFS).
    int16 arrays (the pipeline's chunks) are scaled by 1/32768.
    """
    x = np.asarray(audio)
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif x.dtype.kind != "f":
        raise EmotionError("bad_audio", f"audio must be float32 (or int16) samples, got {x.dtype}")
    if x.ndim != 1:
        raise EmotionError("bad_audio", f"audio must be mono (1-D), got shape {x.shape}")
    if x.size == 0:
        raise EmotionError("empty_audio", "no audio samples")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise EmotionError("bad_audio", "audio contains NaN or infinite samples")
    duration = len(x) / sample_rate
    if duration < min_audio_s:
        raise EmotionError("too_short",
                           f"need at least {min_audio_s:.2f} s of audio, got {duration:.2f} s")
    peak = float(np.abs(x).max())
    if peak > 4.0:  # resampling overshoots a little; this is unscaled integer data
        raise EmotionError("bad_audio", f"samples must be in [-1, 1], peak is {peak:.1f}")
    if peak < SILENCE_PEAK:
        raise EmotionError("silent", f"the audio is silent (peak {20 * np.log10(peak + 1e-12):.0f}"
                           " dBFS): nothing to classify")
    return x


class EmotionClassifier(abc.ABC):
    """A loaded emotion model: synchronous, thread-safe, 16 kHz float32 mono in."""

    model_id: str = ""
    #: Canonical labels this backend can output.
    labels: tuple[str, ...] = LABELS

    @abc.abstractmethod
    def classify(self, audio: np.ndarray) -> EmotionResult:
        """The emotion of one utterance (float32 16 kHz mono in [-1, 1])."""


class OnnxEmotionClassifier(EmotionClassifier):
    """Any ONNX classifier described by a model.json: front end, scaler, ONNX, label map."""

    def __init__(self, directory: str | os.PathLike[str], *, model_id: str | None = None,
                 threads: int = 1, min_audio_s: float = MIN_AUDIO_S) -> None:
        self.directory = Path(directory)
        meta = self._read_meta(self.directory)
        self.meta = meta
        self.model_id = model_id or str(meta.get("model_id") or self.directory.name)
        self.min_audio_s = min_audio_s
        try:
            self.frontend = MfccFrontend(FrontendSpec.from_dict(dict(meta["frontend"])))
            self.native_labels = [str(x) for x in meta["labels"]]
            label_map = meta.get("label_map")
            self._canonical = [canonical(n, label_map) for n in self.native_labels]
            inp, out = meta["input"], meta["output"]
            self.input_name, self.input_shape = str(inp["name"]), [int(d) for d in inp["shape"]]
            self.output_name = str(out["name"])
            self.activation = str(out.get("activation", "softmax"))
            scaler = meta.get("scaler")
            self.scaler = Scaler.load(self.directory / scaler["file"]) if scaler else None
            model_file = self.directory / str(meta["model_file"])
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ModelError("bad_model", f"{self.directory}/model.json: {type(e).__name__}: "
                             f"{e}") from e
        self._check_shapes()
        self.labels = tuple(label for label in LABELS if label in self._canonical)
        # One ONNX thread by default: the decode runner parallelises across utterances.
        self.session = self._open(model_file, threads)
        # The first run allocates and plans (tens of ms): pay that at load, not on an utterance.
        self.run(self.features(np.zeros(PIPELINE_RATE, dtype=np.float32)))

    @classmethod
    def from_installed(cls, model_id: str, *, models_dir: str | os.PathLike[str] | None = None,
                       manifest: Any = None, **kwargs: Any) -> OnnxEmotionClassifier:
        """Load an installed model by id (ModelError with the install command when absent)."""
        from agent import models

        directory = models.path(model_id, models_dir=models_dir, manifest=manifest)
        return cls(directory, model_id=model_id, **kwargs)

    @staticmethod
    def _read_meta(directory: Path) -> dict[str, Any]:
        path = directory / "model.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError("not_installed", f"no model.json in {directory}") from None
        except (OSError, ValueError) as e:
            raise ModelError("bad_model", f"{path}: {e}") from e
        if not isinstance(meta, dict):
            raise ModelError("bad_model", f"{path}: not a JSON object")
        return meta

    def _check_shapes(self) -> None:
        n_mfcc, frames = self.frontend.shape
        if int(np.prod(self.input_shape)) != n_mfcc * frames:
            raise ModelError("bad_model", f"{self.directory}: input shape {self.input_shape} "
                             f"does not hold the front end's {n_mfcc} x {frames}")
        if self.scaler is not None:
            try:
                np.broadcast_shapes(self.scaler.mean.shape, (n_mfcc, frames))
            except ValueError:
                raise ModelError("bad_model", f"{self.directory}: scaler shape "
                                 f"{self.scaler.mean.shape} does not fit {n_mfcc} x {frames}"
                                 ) from None
        if not any(c is not None for c in self._canonical):
            raise ModelError("bad_model", f"{self.directory}: no label maps onto {LABELS}")

    def _open(self, model_file: Path, threads: int) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(model_file), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError("bad_model", f"{model_file}: {type(e).__name__}: {e}") from e
        names_in = [i.name for i in sess.get_inputs()]
        names_out = [o.name for o in sess.get_outputs()]
        if self.input_name not in names_in or self.output_name not in names_out:
            raise ModelError("bad_model", f"{model_file}: expected input {self.input_name!r} "
                             f"and output {self.output_name!r}, has {names_in} -> {names_out}")
        return sess

    def features(self, audio: np.ndarray, sample_rate: int = PIPELINE_RATE) -> np.ndarray:
        """Scaled front-end features of validated audio (n_mfcc x frames)."""
        feats = self.frontend(audio, sample_rate)
        return self.scaler.transform(feats) if self.scaler is not None else feats

    def run(self, features: np.ndarray) -> np.ndarray:
        """Native-order class probabilities for one scaled feature matrix."""
        x = np.ascontiguousarray(features, dtype=np.float32).reshape(self.input_shape)
        out = np.asarray(self.session.run([self.output_name], {self.input_name: x})[0],
                         dtype=np.float64).reshape(-1)
        if len(out) != len(self.native_labels):
            raise ModelError("bad_model", f"{self.model_id} gave {len(out)} outputs for "
                             f"{len(self.native_labels)} labels")
        if self.activation == "softmax":
            out = np.exp(out - out.max())
            out /= out.sum()
        return out

    def classify(self, audio: np.ndarray, sample_rate: int = PIPELINE_RATE) -> EmotionResult:
        """Front end + model on one clip; padded as in training when short."""
        t0 = time.perf_counter()
        x = check_audio(audio, sample_rate, self.min_audio_s)
        native = self.run(self.features(x, sample_rate))
        return self.result(native, (time.perf_counter() - t0) * 1000.0)

    def result(self, native: np.ndarray, compute_ms: float = 0.0) -> EmotionResult:
        """Native-order probabilities (from `run`) -> a result over canonical labels."""
        probs: dict[str, float] = {}
        for c, p in zip(self._canonical, native, strict=True):
            if c is not None:
                probs[c] = probs.get(c, 0.0) + float(p)
        return result_from_probabilities(probs, self.model_id, compute_ms)
