"""sherpa-onnx ASR backends: offline (re-decoded partials) and online (true streaming)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent import providers
from agent.asr.base import AsrEngine, AsrSession, Transcript, collapse_loops
from agent.asr.files import check_files, resolve_files
from agent.config import RuntimeConfig, SherpaOfflineAsrConfig, SherpaOnlineAsrConfig
from agent.constants import PIPELINE_RATE
from agent.errors import ModelError

log = logging.getLogger(__name__)


def model_directory(model: str, model_dir: Path | None) -> Path:
    """The configured directory, or the installed location of a manifest model id."""
    if model_dir is not None:
        return model_dir.expanduser()
    from agent import models

    return models.path(model)


class SherpaOfflineEngine(AsrEngine):
    """sherpa_onnx.OfflineRecognizer: Whisper, SenseVoice or paraformer."""

    def __init__(self, cfg: SherpaOfflineAsrConfig, provider: str = "cpu") -> None:
        import sherpa_onnx

        self.cfg = cfg
        self.model_id = cfg.model if cfg.model_dir is None else str(cfg.model_dir)
        directory = model_directory(cfg.model, cfg.model_dir)
        files = resolve_files(directory, cfg.model_type, cfg.quantized)
        check_files(files, cfg.model_type)
        self.files = files
        f = {k: str(v) for k, v in files.items()}
        self.language = cfg.language or None
        try:
            if cfg.model_type == "whisper":
                self._rec = sherpa_onnx.OfflineRecognizer.from_whisper(
                    encoder=f["encoder"], decoder=f["decoder"], tokens=f["tokens"],
                    language=cfg.language, task="transcribe", num_threads=cfg.threads,
                    tail_paddings=cfg.tail_paddings, provider=provider,
                )
            elif cfg.model_type == "sense_voice":
                self._rec = sherpa_onnx.OfflineRecognizer.from_sense_voice(
                    model=f["model"], tokens=f["tokens"], num_threads=cfg.threads,
                    language=cfg.language or "auto", use_itn=True, provider=provider,
                )
            else:
                self._rec = sherpa_onnx.OfflineRecognizer.from_paraformer(
                    paraformer=f["model"], tokens=f["tokens"], num_threads=cfg.threads,
                    provider=provider,
                )
        except Exception as e:  # sherpa raises RuntimeError/ValueError on bad configs
            raise ModelError("load_failed", f"cannot load {self.model_id}: {e}") from e
        log.info("ASR %s loaded (%s)", self.model_id,
                 ", ".join(p.name for p in files.values()))

    def decode(self, audio: np.ndarray) -> Transcript:
        """One full decode (blocking; call from a worker thread)."""
        if len(audio) < PIPELINE_RATE // 10:
            return Transcript("", self.language)
        t0 = time.perf_counter()
        stream = self._rec.create_stream()
        stream.accept_waveform(PIPELINE_RATE, audio)
        self._rec.decode_stream(stream)
        res: Any = stream.result
        lang = getattr(res, "lang", "") or self.language
        text = res.text.strip()
        if self.cfg.model_type == "whisper":
            text = collapse_loops(text)
        return Transcript(text, (lang or "").strip("<|>") or None,
                          decode_s=time.perf_counter() - t0)


class OnlineSession(AsrSession):
    """Feeds a sherpa OnlineStream and decodes as audio arrives."""

    def __init__(self, engine: SherpaOnlineEngine) -> None:
        self.engine = engine
        self._stream = engine._rec.create_stream()
        self._n = 0
        self._lock = threading.Lock()

    @property
    def fed_samples(self) -> int:
        """Samples accepted."""
        return self._n

    def _decode(self) -> str:
        rec = self.engine._rec
        while rec.is_ready(self._stream):
            rec.decode_stream(self._stream)
        return str(rec.get_result(self._stream)).strip()

    def feed(self, samples: np.ndarray) -> str:
        """Accept and decode what is ready; returns the running text."""
        with self._lock:
            self._stream.accept_waveform(PIPELINE_RATE, samples)
            self._n += len(samples)
            return self._decode()

    def finish(self) -> Transcript:
        """Flush the model's right context and return the final text."""
        with self._lock:
            # Trailing silence lets the encoder see past the last word before input ends.
            self._stream.accept_waveform(PIPELINE_RATE,
                                         np.zeros(int(0.3 * PIPELINE_RATE), np.float32))
            self._stream.input_finished()
            t0 = time.perf_counter()
            text = self._decode()
            return Transcript(text, self.engine.language, decode_s=time.perf_counter() - t0)


class SherpaOnlineEngine(AsrEngine):
    """sherpa_onnx.OnlineRecognizer for the official streaming models."""

    streaming = True

    def __init__(self, cfg: SherpaOnlineAsrConfig, provider: str = "cpu") -> None:
        import sherpa_onnx

        self.cfg = cfg
        self.model_id = cfg.model if cfg.model_dir is None else str(cfg.model_dir)
        directory = model_directory(cfg.model, cfg.model_dir)
        kind = "paraformer_online" if cfg.model_type == "paraformer" else cfg.model_type
        files = resolve_files(directory, kind, cfg.quantized)
        check_files(files, kind)
        self.files = files
        f = {k: str(v) for k, v in files.items()}
        # The segmenter decides utterance ends; sherpa's endpointing stays off.
        common = dict(tokens=f["tokens"], num_threads=cfg.threads, sample_rate=PIPELINE_RATE,
                      feature_dim=80, decoding_method=cfg.decoding_method, provider=provider)
        try:
            if cfg.model_type == "transducer":
                self._rec = sherpa_onnx.OnlineRecognizer.from_transducer(
                    encoder=f["encoder"], decoder=f["decoder"], joiner=f["joiner"], **common)
            elif cfg.model_type == "paraformer":
                common.pop("decoding_method")
                self._rec = sherpa_onnx.OnlineRecognizer.from_paraformer(
                    encoder=f["encoder"], decoder=f["decoder"], **common)
            else:
                self._rec = sherpa_onnx.OnlineRecognizer.from_zipformer2_ctc(
                    model=f["model"], **common)
        except Exception as e:
            raise ModelError("load_failed", f"cannot load {self.model_id}: {e}") from e
        log.info("streaming ASR %s loaded", self.model_id)

    def session(self) -> OnlineSession:
        """A streaming session."""
        return OnlineSession(self)


def make_engine(cfg: SherpaOfflineAsrConfig | SherpaOnlineAsrConfig,
                runtime: RuntimeConfig | None = None) -> AsrEngine:
    """Load the configured backend (blocking: seconds for big models) on the configured
    execution provider (a missing one: a warning and CPU, or an error with `strict`)."""
    rt = runtime or RuntimeConfig()
    sel = providers.select(rt.provider, rt.strict, engine="sherpa", device_id=rt.gpu_device)
    engine: AsrEngine
    if isinstance(cfg, SherpaOfflineAsrConfig):
        engine = SherpaOfflineEngine(cfg, sel.sherpa)
    else:
        engine = SherpaOnlineEngine(cfg, sel.sherpa)
    providers.record("asr", sel.provider)
    return engine
