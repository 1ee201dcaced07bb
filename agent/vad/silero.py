"""Silero VAD v5 run with onnxruntime; the model ships in the `silero-vad` wheel."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from agent import providers
from agent.config import RuntimeConfig, SileroVadConfig
from agent.constants import PIPELINE_RATE
from agent.errors import VadError
from agent.vad.base import Vad

log = logging.getLogger(__name__)

CONTEXT = 64  # v5 expects the last 64 samples of the previous window prepended
WINDOW = 512


def default_model_path() -> Path:
    """The `silero-vad` model from `voice-agent models install`, else the wheel's own copy."""
    from agent import models
    from agent.errors import ModelError

    try:
        return models.model_files("silero-vad")["model"]
    except (ModelError, KeyError):
        pass
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadError(
            "model_missing",
            "silero-vad is not installed (pip install --no-deps silero-vad), "
            "or set vad.model to a silero_vad.onnx file",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"


class SileroVad(Vad):
    """Neural VAD on 32 ms windows, with hysteresis so decisions do not flicker."""

    name = "silero"

    def __init__(self, cfg: SileroVadConfig, threads: int = 1,
                 runtime: RuntimeConfig | None = None) -> None:
        import onnxruntime as ort

        rt = runtime or RuntimeConfig()
        sel = providers.select(rt.provider, rt.strict, device_id=rt.gpu_device,
                               trt_cache_dir=rt.trt_cache_dir)

        path = cfg.model.expanduser() if cfg.model else default_model_path()
        if not path.is_file():
            raise VadError("model_missing", f"Silero model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self._sess = ort.InferenceSession(
                str(path), sess_options=opts, providers=sel.ort_providers()
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise VadError("model_invalid", f"cannot load Silero model {path}: {e}") from e
        providers.record_session("vad", self._sess)
        self.model = cfg.model
        self.threshold = cfg.threshold
        # Leave speech only when clearly below threshold (same rule as Silero's reference).
        self.neg_threshold = max(cfg.threshold - 0.15, 0.01)
        self.frame_samples = WINDOW
        self._sr = np.array(PIPELINE_RATE, dtype=np.int64)
        self.reset()

    def update(self, cfg: object) -> bool:
        """A new threshold applies at once; another model file needs a restart."""
        if not isinstance(cfg, SileroVadConfig) or cfg.model != self.model:
            return False
        self.threshold = cfg.threshold
        self.neg_threshold = max(cfg.threshold - 0.15, 0.01)
        return True

    def reset(self) -> None:
        """Zero the recurrent state and context."""
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._speaking = False

    def probability(self, frame: np.ndarray) -> float:
        """Speech probability of one 512-sample window."""
        x = frame.astype(np.float32) / 32768.0
        inp = np.concatenate([self._context, x])[None, :]
        out, self._state = self._sess.run(
            None, {"input": inp, "state": self._state, "sr": self._sr}
        )
        self._context = x[-CONTEXT:]
        return float(out[0][0])

    def is_speech(self, frame: np.ndarray) -> bool:
        """Thresholded with hysteresis."""
        p = self.probability(frame)
        if p >= self.threshold:
            self._speaking = True
        elif p < self.neg_threshold:
            self._speaking = False
        return self._speaking
