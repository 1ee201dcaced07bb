"""Speaker embedders: audio in, one L2-normalised voice vector out (synchronous, thread-safe).

`Ge2eEmbedder` runs the GE2E encoder exported by `conversion/ge2e_to_onnx.py` with
onnxruntime behind the numpy port of Resemblyzer's front end. `SherpaEmbedder` wraps
sherpa-onnx's `SpeakerEmbeddingExtractor` for the official 3D-Speaker (CAM++, ERes2Net) and
WeSpeaker exports; their files are checked with onnxruntime first, because sherpa-onnx
crashes the process (exit or segfault) on a model without the metadata it expects.

Every method may be called from any worker thread; none of them touches an event loop.
"""

from __future__ import annotations

import abc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.constants import PIPELINE_RATE
from agent.errors import ModelError, SpeakerError
from agent.speaker import frontend

log = logging.getLogger(__name__)

GE2E_MODEL_ID = "ge2e-resemblyzer"
GE2E_FILE = "ge2e_encoder.onnx"
# Metadata keys sherpa-onnx's wespeaker / 3d-speaker loader reads (it dies without them).
SHERPA_METADATA = ("framework", "sample_rate", "output_dim", "normalize_samples", "language")
SHERPA_FRAMEWORKS = ("wespeaker", "3d-speaker")
SHERPA_FEAT_DIM = 80  # sherpa-onnx computes 80-band fbank for these frameworks


@dataclass(frozen=True)
class Embedding:
    """One utterance's voice vector and how much speech it was made from."""

    vector: np.ndarray  # float32, L2-normalised, shape (dim,)
    model_id: str
    audio_s: float
    speech_s: float  # voiced 30 ms windows, in seconds


def l2_normalize(v: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit-length rows (zero rows stay zero)."""
    n = np.linalg.norm(v, axis=axis, keepdims=True)
    return (v / np.where(n > 0, n, 1.0)).astype(np.float32)


class Embedder(abc.ABC):
    """A speaker-embedding model behind a small synchronous interface."""

    model_id: str
    dim: int
    #: length of one sliding window `embed_windows` embeds
    window_s: float = 1.6

    def __init__(self, *, min_speech_s: float = frontend.MIN_SPEECH_S,
                 max_audio_s: float | None = frontend.MAX_AUDIO_S) -> None:
        self.min_speech_s = min_speech_s
        self.max_audio_s = max_audio_s

    def preprocess(self, audio: np.ndarray) -> tuple[np.ndarray, float]:
        """Validated audio -> (what the model sees: long silences trimmed, seconds of speech)."""
        return frontend.trim_long_silences(audio)

    @abc.abstractmethod
    def _embed_speech(self, speech: np.ndarray) -> np.ndarray:
        """Preprocessed speech -> unnormalised or normalised (dim,) vector."""

    def extract(self, audio: np.ndarray) -> Embedding:
        """Check, preprocess and embed 16 kHz mono float32 audio; SpeakerError on bad input."""
        x = frontend.check_audio(audio, max_s=self.max_audio_s)
        speech, speech_s = self.preprocess(x)
        if speech_s == 0 or not len(speech):
            raise SpeakerError("silent", f"no speech found in {len(x) / PIPELINE_RATE:.2f} s "
                                         "of audio")
        if speech_s < self.min_speech_s:
            raise SpeakerError("too_short", f"need at least {self.min_speech_s:g} s of speech, "
                                            f"got {speech_s:.2f} s")
        vec = l2_normalize(np.asarray(self._embed_speech(speech), dtype=np.float32))
        return Embedding(vec, self.model_id, len(x) / PIPELINE_RATE, speech_s)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """The L2-normalised (dim,) float32 voice vector of an utterance."""
        return self.extract(audio).vector

    def embed_windows(self, audio: np.ndarray, hop_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Sliding-window embeddings of raw (untrimmed) audio: (starts_s, (n, dim) vectors).

        For diarization: windows of `window_s` every `hop_s`; the last window is shifted back
        to end at the audio's end. Audio shorter than a window gives one (padded) window.
        """
        win = int(self.window_s * PIPELINE_RATE)
        hop = max(1, int(hop_s * PIPELINE_RATE))
        starts = list(range(0, max(1, len(audio) - win + 1), hop))
        if len(audio) > win and starts[-1] + win < len(audio):
            starts.append(len(audio) - win)
        vecs = [self._embed_speech(np.asarray(audio[s:s + win], dtype=np.float32))
                for s in starts]
        return (np.array(starts, dtype=np.float64) / PIPELINE_RATE,
                l2_normalize(np.stack(vecs).astype(np.float32)))


def _session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session, or ModelError when the file is missing or invalid."""
    import onnxruntime as ort

    if not path.is_file() or path.stat().st_size == 0:
        raise ModelError("missing_file", f"speaker model file {path} is missing or empty")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError("invalid_onnx", f"{path} is not a valid ONNX model: "
                                         f"{str(e).splitlines()[0][:300]}") from e


class Ge2eEmbedder(Embedder):
    """Resemblyzer's GE2E encoder (256-d) on onnxruntime with the numpy front end."""

    dim = 256

    def __init__(self, model: Path | str | None = None, *, model_id: str = GE2E_MODEL_ID,
                 threads: int = 1, rate: float = 1.3, min_coverage: float = 0.75,
                 **limits: Any) -> None:
        super().__init__(**limits)
        if model is None:
            from agent import models

            model = models.path(model_id)
        path = Path(model)
        if path.is_dir():
            path = path / GE2E_FILE
        self.model_id = model_id
        self.path = path
        self.rate = rate
        self.min_coverage = min_coverage
        self._sess = _session(path, threads)
        inputs = self._sess.get_inputs()
        meta = self._sess.get_modelmeta().custom_metadata_map
        if (len(inputs) != 1 or inputs[0].shape[-1] != frontend.N_MELS
                or meta.get("mel", "power") != "power"):
            raise ModelError("bad_model", f"{path} is not a GE2E encoder export "
                                          f"(inputs {[(i.name, i.shape) for i in inputs]})")
        self._input = inputs[0].name

    def preprocess(self, audio: np.ndarray) -> tuple[np.ndarray, float]:
        """Resemblyzer's preprocess_wav: volume up to -30 dBFS, long silences trimmed."""
        return frontend.preprocess(audio)

    def _run(self, mels: np.ndarray) -> np.ndarray:
        """(n, frames, 40) mels -> (n, 256) partial embeddings."""
        return np.asarray(self._sess.run(None, {self._input: mels})[0], dtype=np.float32)

    def _embed_speech(self, speech: np.ndarray) -> np.ndarray:
        mels, _ = frontend.partial_mels(speech, self.rate, self.min_coverage)
        return self._run(mels).mean(axis=0)

    def embed_windows(self, audio: np.ndarray, hop_s: float) -> tuple[np.ndarray, np.ndarray]:
        """One mel of the whole audio, 160-frame windows every `hop_s`, one batched run."""
        x = np.asarray(audio, dtype=np.float32)
        step = max(1, round(hop_s * PIPELINE_RATE / frontend.HOP))
        mel = frontend.mel_spectrogram(x)
        n = frontend.PARTIAL_FRAMES
        if len(mel) < n:
            mel = np.pad(mel, ((0, n - len(mel)), (0, 0)))
        starts = list(range(0, len(mel) - n + 1, step))
        if starts[-1] + n < len(mel):
            starts.append(len(mel) - n)
        out = [self._run(np.stack([mel[s:s + n] for s in starts[i:i + 64]]))
               for i in range(0, len(starts), 64)]  # bounded batches: bounded memory
        return (np.array(starts, dtype=np.float64) * frontend.HOP / PIPELINE_RATE,
                l2_normalize(np.concatenate(out)))


def check_sherpa_model(path: Path) -> dict[str, str]:
    """Refuse (ModelError) a file sherpa-onnx's extractor would crash on; returns its metadata."""
    sess = _session(path, 1)
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    missing = [k for k in SHERPA_METADATA if k not in meta]
    if missing:
        raise ModelError("bad_metadata", f"{path} lacks metadata sherpa-onnx needs: "
                                         f"{', '.join(missing)}")
    if meta["framework"] not in SHERPA_FRAMEWORKS:
        raise ModelError("bad_metadata", f"{path}: framework {meta['framework']!r} is not one "
                                         f"of {', '.join(SHERPA_FRAMEWORKS)}")
    try:
        dim, rate = int(meta["output_dim"]), int(meta["sample_rate"])
        int(meta["normalize_samples"])
    except ValueError as e:
        raise ModelError("bad_metadata", f"{path}: non-integer metadata ({e})") from e
    ins, outs = sess.get_inputs(), sess.get_outputs()
    shape = list(ins[0].shape) if len(ins) == 1 else []
    if len(shape) != 3 or (isinstance(shape[2], int) and shape[2] != SHERPA_FEAT_DIM):
        raise ModelError("bad_model", f"{path}: wants one (N, T, {SHERPA_FEAT_DIM}) input, has "
                                      f"{[(i.name, i.shape) for i in ins]}")
    out_dim = outs[0].shape[-1] if outs else None
    if isinstance(out_dim, int) and out_dim != dim:
        raise ModelError("bad_metadata", f"{path}: output_dim {dim} but the model outputs "
                                         f"{out_dim} values")
    if rate != PIPELINE_RATE:
        log.info("%s expects %d Hz; sherpa-onnx resamples the 16 kHz pipeline audio", path, rate)
    return meta


class SherpaEmbedder(Embedder):
    """sherpa-onnx SpeakerEmbeddingExtractor (3D-Speaker CAM++/ERes2Net, WeSpeaker ONNX)."""

    window_s = 1.5

    def __init__(self, model: Path | str, *, model_id: str, threads: int = 1,
                 **limits: Any) -> None:
        super().__init__(**limits)
        import sherpa_onnx

        path = Path(model)
        if path.is_dir():
            found = sorted(path.glob("*.onnx"))
            if len(found) != 1:
                raise ModelError("missing_file", f"{path}: expected one .onnx file, found "
                                                 f"{[p.name for p in found]}")
            path = found[0]
        self.meta = check_sherpa_model(path)
        self.model_id = model_id
        self.path = path
        cfg = sherpa_onnx.SpeakerEmbeddingExtractorConfig(
            model=str(path), num_threads=threads, debug=False, provider="cpu")
        if not cfg.validate():
            raise ModelError("bad_model", f"sherpa-onnx refuses the config for {path}")
        self._ex = sherpa_onnx.SpeakerEmbeddingExtractor(cfg)
        self.dim = int(self._ex.dim)
        # compute() on one shared extractor from several threads is not documented as safe
        self._lock = threading.Lock()

    def _embed_speech(self, speech: np.ndarray) -> np.ndarray:
        with self._lock:
            stream = self._ex.create_stream()
            stream.accept_waveform(PIPELINE_RATE, speech)
            stream.input_finished()
            if not self._ex.is_ready(stream):
                raise SpeakerError("too_short", f"{len(speech) / PIPELINE_RATE:.2f} s is too "
                                                f"short for {self.model_id}")
            vec = np.asarray(self._ex.compute(stream), dtype=np.float32)
        if vec.shape != (self.dim,):
            raise ModelError("bad_model", f"{self.model_id} returned shape {vec.shape}, "
                                          f"expected ({self.dim},)")
        return vec


def make_embedder(model_id: str, backend: str, *, threads: int = 1,
                  model_dir: Path | None = None, **limits: Any) -> Embedder:
    """An embedder by manifest backend (`ge2e` or `sherpa-speaker`) and installed model id."""
    if model_dir is None:
        from agent import models

        model_dir = models.path(model_id)
    if backend == "ge2e":
        return Ge2eEmbedder(model_dir, model_id=model_id, threads=threads, **limits)
    if backend == "sherpa-speaker":
        return SherpaEmbedder(model_dir, model_id=model_id, threads=threads, **limits)
    raise ModelError("bad_backend", f"unknown speaker backend {backend!r} "
                                    "(ge2e, sherpa-speaker)")
