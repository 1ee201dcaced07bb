"""MFCC front end of the RAVDESS CNN, in numpy: what librosa.feature.mfcc computed in training.

The model was trained on `librosa.load(path, sr=48000, offset=0.5, duration=3)` zero-padded
to 3 s, then `librosa.feature.mfcc(n_mfcc=40, n_fft=1024, win_length=512, window="hamming",
n_mels=128, fmax=24000)`: a centred STFT (hop 512) of a periodic Hamming window zero-padded to
1024 points, the power spectrum through a Slaney mel filterbank, `power_to_db` (ref 1, amin
1e-10, top_db 80) and an orthonormal DCT-II -> 40 x 282. The training code pins librosa
0.8.0, whose STFT padded the edges by reflection (0.10 changed the default to zeros), so
`pad_mode` is "reflect" (on the shared clips both give the same predictions). Everything is
parameterised by `FrontendSpec`, read from a model's model.json.

No librosa at run time: the pipeline's float32 16 kHz audio is upsampled with soxr.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from agent.errors import EmotionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontendSpec:
    """Parameters of an MFCC front end (the `frontend` object of a model.json)."""

    kind: str = "mfcc"
    sample_rate: int = 48000
    n_mfcc: int = 40
    n_fft: int = 1024
    win_length: int = 512
    hop_length: int = 512
    window: str = "hamming"
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float = 24000.0
    center: bool = True
    pad_mode: str = "reflect"
    top_db: float | None = 80.0
    offset_s: float = 0.5
    duration_s: float = 3.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrontendSpec:
        """Build from a model.json object; unknown keys are a ModelError-worthy typo."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown front-end key(s): {', '.join(unknown)}")
        spec = cls(**d)
        if spec.kind != "mfcc":
            raise ValueError(f"unsupported front end {spec.kind!r} (only 'mfcc')")
        if spec.window not in _WINDOWS:
            raise ValueError(f"unsupported window {spec.window!r}; one of {sorted(_WINDOWS)}")
        if spec.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"unsupported pad_mode {spec.pad_mode!r}")
        if not 0 < spec.win_length <= spec.n_fft:
            raise ValueError("win_length must be in 1..n_fft")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The model.json form."""
        return asdict(self)

    @property
    def samples(self) -> int:
        """Length of the analysed window at the model's rate."""
        return round(self.duration_s * self.sample_rate)

    @property
    def frames(self) -> int:
        """Number of STFT frames the window gives (282 for the RAVDESS model)."""
        if self.center:
            return 1 + self.samples // self.hop_length
        return 1 + (self.samples - self.n_fft) // self.hop_length


def _periodic(n: int, a0: float) -> np.ndarray:
    """A periodic ("fftbins") generalised cosine window, as scipy.signal.get_window gives."""
    return a0 - (1.0 - a0) * np.cos(2.0 * np.pi * np.arange(n) / n)


_WINDOWS = {
    "hamming": lambda n: _periodic(n, 0.54),
    "hann": lambda n: _periodic(n, 0.5),
}


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (linear below 1 kHz, logarithmic above): librosa's htk=False."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = f >= min_log_hz
    mels = np.where(log_t, min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep,
                    mels)
    return mels


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    """Inverse of `_hz_to_mel`."""
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-normalised triangular mel filters (n_mels x (1 + n_fft//2)), like librosa's."""
    fftfreqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(fmax)),
                                   n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney area normalisation: each filter integrates to about one.
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights


@dataclass(frozen=True)
class _Tables:
    """Precomputed per spec: window, the mel filterbank as two slope sets, DCT via FFT."""

    window: np.ndarray  # win_length
    bins: slice  # the FFT bins any filter covers
    # Each bin feeds at most two triangles (its left and right neighbour's slopes); both
    # triangle indices grow with the bin, so each slope set is a segmented sum (reduceat).
    weights: tuple[np.ndarray, np.ndarray]  # per bin, float32
    starts: tuple[np.ndarray, np.ndarray]  # segment starts (over the covered bins)
    targets: tuple[np.ndarray, np.ndarray]  # the filter each segment adds into
    dct_order: np.ndarray  # Makhoul's even/odd reordering of the mel axis
    dct_twiddle: np.ndarray  # ortho-scaled exp(-i pi k / 2N), first n_mfcc


@functools.lru_cache(maxsize=8)
def _tables(spec: FrontendSpec) -> _Tables:
    """Build (once per spec) what `mfcc` needs.

    No BLAS on purpose: a dense (frames x bins) @ (bins x mels) product is 50x the work of
    the ~1000 non-zero triangle weights, and OpenBLAS's thread pool stalls when the daemon's
    other threads hold the cores.
    """
    fb = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.fmin, spec.fmax)
    covered = np.flatnonzero(fb.any(axis=0))
    lo, hi = int(covered[0]), int(covered[-1]) + 1
    sub = fb[:, lo:hi] > 0
    if (sub.sum(axis=0) > 2).any():
        raise ValueError("mel filters overlap more than pairwise")  # not a triangle bank
    n_bins = hi - lo
    first = sub.argmax(axis=0)  # lowest triangle each bin feeds
    last = spec.n_mels - 1 - sub[::-1].argmax(axis=0)  # highest (== first when only one)
    cols = np.arange(n_bins)
    w_first = fb[first, cols + lo]
    w_last = np.where(last != first, fb[last, cols + lo], 0.0)
    starts, targets = [], []
    for rows in (first, last):
        seg = np.flatnonzero(np.r_[True, np.diff(rows) != 0])
        starts.append(seg)
        targets.append(rows[seg])
    n = spec.n_mels
    order = np.r_[np.arange(0, n, 2), np.arange(n - 1 - (n % 2), 0, -2)]
    k = np.arange(spec.n_mfcc)
    twiddle = 2.0 * np.exp(-1j * np.pi * k / (2 * n)) * np.sqrt(1.0 / (2 * n))
    twiddle[0] *= np.sqrt(0.5)
    return _Tables(_WINDOWS[spec.window](spec.win_length), slice(lo, hi),
                   (w_first.astype(np.float32), w_last.astype(np.float32)),
                   (starts[0], starts[1]), (targets[0], targets[1]), order, twiddle)


def _mel(power: np.ndarray, t: _Tables, n_mels: int) -> np.ndarray:
    """frames x bins power -> frames x n_mels through the triangle bank (no dense product)."""
    p = power[:, t.bins]
    mel = np.zeros((len(power), n_mels), dtype=np.float32)
    for w, starts, targets in zip(t.weights, t.starts, t.targets, strict=True):
        # targets are unique per slope set (segments of one triangle are contiguous)
        mel[:, targets] += np.add.reduceat(p * w, starts, axis=1)
    return mel


def _dct_ortho(x: np.ndarray, t: _Tables) -> np.ndarray:
    """First n_mfcc orthonormal DCT-II coefficients along the last axis (Makhoul's FFT)."""
    v = np.fft.fft(x[..., t.dct_order], axis=-1)[..., :len(t.dct_twiddle)]
    return (v * t.dct_twiddle).real


def mfcc(y: np.ndarray, spec: FrontendSpec) -> np.ndarray:
    """MFCCs (n_mfcc x frames, float32) of `y`, already at `spec.sample_rate` and cut to length."""
    t = _tables(spec)
    x = np.asarray(y, dtype=np.float64)
    if spec.center:
        pad = spec.n_fft // 2
        mode = spec.pad_mode if len(x) > pad else "constant"  # reflect needs len > pad
        x = np.pad(x, pad, mode=mode)  # type: ignore[call-overload]
    # librosa centres the short window in an n_fft frame and zero-fills the rest; a shift only
    # changes the phase, so the power spectrum is the FFT of the window's span zero-padded.
    left = (spec.n_fft - spec.win_length) // 2
    n_frames = 1 + (len(x) - spec.n_fft) // spec.hop_length
    span = x[left:left + (n_frames - 1) * spec.hop_length + spec.win_length]
    frames = np.lib.stride_tricks.sliding_window_view(span, spec.win_length)[::spec.hop_length]
    spectrum = np.fft.rfft(frames * t.window, n=spec.n_fft, axis=1)  # frames x bins
    power = (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)
    mel = _mel(power, t, spec.n_mels)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))  # frames x n_mels
    if spec.top_db is not None:
        db = np.maximum(db, db.max() - spec.top_db)
    return np.ascontiguousarray(_dct_ortho(db, t).T, dtype=np.float32)


def window_audio(audio: np.ndarray, spec: FrontendSpec, min_rest_s: float = 1.0) -> np.ndarray:
    """The analysed window at the model's rate: from `offset_s`, `duration_s` long, zero-padded.

    `audio` is at `spec.sample_rate`. The offset is the training one (the first 0.5 s of a
    RAVDESS clip is lead-in) unless that would leave less than `min_rest_s`: a short live
    utterance keeps its speech, offset shrunk so that `min_rest_s` (or all of it) remains.
    """
    sr = spec.sample_rate
    offset = round(spec.offset_s * sr)
    rest = round(min_rest_s * sr)
    offset = max(0, min(offset, len(audio) - rest))
    seg = audio[offset:offset + spec.samples]
    out = np.zeros(spec.samples, dtype=np.float32)
    out[:len(seg)] = seg
    return out


class MfccFrontend:
    """Float32 mono audio at any rate -> the model's MFCC matrix (n_mfcc x frames)."""

    def __init__(self, spec: FrontendSpec | None = None, resample_quality: str = "HQ") -> None:
        self.spec = spec or FrontendSpec()
        self.resample_quality = resample_quality
        _tables(self.spec)  # build the tables now, not on the first utterance

    @property
    def shape(self) -> tuple[int, int]:
        """(n_mfcc, frames) of every output."""
        return self.spec.n_mfcc, self.spec.frames

    def resample(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """`audio` at the model's rate (soxr, whole clip at once)."""
        if sample_rate == self.spec.sample_rate:
            return np.asarray(audio, dtype=np.float32)
        if sample_rate <= 0:
            raise EmotionError("bad_audio", f"sample rate must be positive, got {sample_rate}")
        import soxr  # here, not at the top: the conversion environment needs only FrontendSpec

        out = soxr.resample(np.asarray(audio, dtype=np.float32), sample_rate,
                            self.spec.sample_rate, quality=self.resample_quality)
        return np.asarray(out, dtype=np.float32)

    def __call__(self, audio: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
        """MFCCs of a clip (float32 mono in [-1, 1] at `sample_rate`)."""
        y = window_audio(self.resample(audio, sample_rate), self.spec)
        return mfcc(y, self.spec)
