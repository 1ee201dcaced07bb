"""Resemblyzer's front end in numpy: input checks, volume, silence trimming, power mel, windows.

A faithful port of ``resemblyzer/audio.py`` and ``VoiceEncoder.compute_partial_slices``
(Resemblyzer 0.1.4, `hparams.py` values) so that the ONNX export of its GE2E encoder sees the
same input it was trained on, without librosa, scipy or torch at runtime. The mel matches
``librosa.feature.melspectrogram`` (Slaney mel scale and norm, periodic Hann window, centred
frames, zero padding); `conversion/ge2e_to_onnx.py --check-mel` measures it.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import webrtcvad

from agent.constants import PIPELINE_RATE
from agent.errors import SpeakerError

log = logging.getLogger(__name__)

SR = PIPELINE_RATE
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms step
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s per partial window
VAD_WINDOW = 480  # 30 ms, the granularity of Resemblyzer's silence trimming
VAD_AVG_WIDTH = 8  # moving-average smoothing of the VAD flags
VAD_MAX_SILENCE = 6  # windows; longer silences are cut
NORM_TARGET_DBFS = -30.0
INT16_MAX = 2**15 - 1

MIN_AUDIO_S = 0.5
MIN_SPEECH_S = 0.5
MAX_AUDIO_S = 30.0
# Below this RMS (-70 dBFS) a clip is digital silence; volume normalisation would only
# amplify the noise floor into something the VAD might call speech.
SILENCE_RMS = 10 ** (-70 / 20)


def check_audio(audio: object, *, min_s: float = MIN_AUDIO_S,
                max_s: float | None = MAX_AUDIO_S) -> np.ndarray:
    """Validate 16 kHz mono float audio; returns it as contiguous float32 or raises SpeakerError.

    Codes: ``bad_audio`` (not a 1-D float array, NaN/inf, samples far outside [-1, 1]),
    ``too_short``, ``too_long``, ``silent`` (digital silence).
    """
    if not isinstance(audio, np.ndarray):
        raise SpeakerError("bad_audio", f"audio must be a numpy array, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise SpeakerError("bad_audio", f"audio must be mono (1-D), got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise SpeakerError("bad_audio", f"audio must be float in [-1, 1], got {audio.dtype}")
    x = np.ascontiguousarray(audio, dtype=np.float32)
    dur = len(x) / SR
    if dur < min_s:
        raise SpeakerError("too_short", f"need at least {min_s:g} s of audio, got {dur:.2f} s")
    if max_s is not None and dur > max_s:
        raise SpeakerError("too_long", f"at most {max_s:g} s of audio, got {dur:.1f} s")
    if not np.isfinite(x).all():
        raise SpeakerError("bad_audio", "audio contains NaN or infinite samples (corrupt?)")
    peak = float(np.abs(x).max())
    if peak > 8.0:  # int16 PCM passed as float, or garbage bytes reinterpreted
        raise SpeakerError("bad_audio", f"samples must lie in [-1, 1], peak is {peak:.3g}")
    if float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) < SILENCE_RMS:
        raise SpeakerError("silent", f"the audio is silent ({dur:.2f} s without signal)")
    return x


def normalize_volume(wav: np.ndarray, target_dbfs: float = NORM_TARGET_DBFS) -> np.ndarray:
    """Raise (never lower) the level to `target_dbfs` RMS, as Resemblyzer's increase_only."""
    rms = float(np.sqrt(np.mean((wav.astype(np.float64) * INT16_MAX) ** 2)))
    if rms <= 0.0:
        return wav
    change = target_dbfs - 20 * np.log10(rms / INT16_MAX)
    if change < 0:
        return wav
    return (wav * np.float32(10 ** (change / 20))).astype(np.float32)


def _moving_average(flags: np.ndarray, width: int) -> np.ndarray:
    """Resemblyzer's centred moving average (zero-padded, same length as `flags`)."""
    padded = np.concatenate((np.zeros((width - 1) // 2), flags, np.zeros(width // 2)))
    ret = np.cumsum(padded, dtype=float)
    ret[width:] = ret[width:] - ret[:-width]
    return ret[width - 1:] / width


def voice_mask(wav: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-30 ms-window keep flags (webrtcvad mode 3, smoothed, dilated by 6 windows), and
    how many windows the VAD itself called voiced."""
    n = len(wav) // VAD_WINDOW
    # Resemblyzer casts without clipping; we clip so a loud peak cannot wrap around.
    pcm = np.round(np.clip(wav[:n * VAD_WINDOW], -1.0, 1.0) * INT16_MAX).astype(np.int16)
    vad = webrtcvad.Vad(3)
    raw = pcm.tobytes()
    step = VAD_WINDOW * 2
    flags = np.fromiter(
        (vad.is_speech(raw[i * step:(i + 1) * step], SR) for i in range(n)), dtype=bool, count=n
    )
    mask = np.round(_moving_average(flags.astype(float), VAD_AVG_WIDTH)).astype(bool)
    # binary_dilation with a structure of VAD_MAX_SILENCE + 1 ones (odd, so centred)
    k = np.ones(VAD_MAX_SILENCE + 1, dtype=np.int32)
    return np.convolve(mask.astype(np.int32), k, mode="same") > 0, int(flags.sum())


def trim_long_silences(wav: np.ndarray) -> tuple[np.ndarray, float]:
    """Drop silences longer than ~0.2 s (Resemblyzer's trim_long_silences).

    Returns the trimmed audio and the seconds of speech in it (windows the VAD called voiced;
    the trimmed audio is longer, since it keeps short pauses and ~0.1 s around speech).
    """
    mask, voiced = voice_mask(wav)
    n = len(mask) * VAD_WINDOW
    return wav[:n][np.repeat(mask, VAD_WINDOW)], voiced * VAD_WINDOW / SR


def preprocess(wav: np.ndarray) -> tuple[np.ndarray, float]:
    """Resemblyzer's preprocess_wav for 16 kHz input (normalise volume, trim silences), and
    the seconds of speech."""
    return trim_long_silences(normalize_volume(wav))


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default, htk=False)."""
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels
    )


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    """Inverse of _hz_to_mel."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """(40, 201) Slaney-normalised triangular filters, as librosa.filters.mel builds them."""
    fft_freqs = np.fft.rfftfreq(N_FFT, 1.0 / SR)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(SR / 2)),
                                     N_MELS + 2))
    fdiff = np.diff(mel_pts)
    ramps = np.subtract.outer(mel_pts, fft_freqs)
    weights = np.zeros((N_MELS, len(fft_freqs)), dtype=np.float32)
    for i in range(N_MELS):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2:N_MELS + 2] - mel_pts[:N_MELS]))[:, None]
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    """Periodic Hann window of N_FFT samples (scipy get_window('hann', fftbins=True))."""
    w = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    w.setflags(write=False)
    return w


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """(frames, 40) float32 power mel; frames = 1 + len(wav) // 160 (centred, zero-padded)."""
    pad = N_FFT // 2
    y = np.pad(wav.astype(np.float32, copy=False), (pad, pad))
    n_frames = 1 + (len(y) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        y, shape=(n_frames, N_FFT), strides=(y.strides[0] * HOP, y.strides[0]), writeable=False
    )
    spec = np.fft.rfft(frames * _window(), axis=1)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    # einsum, not `@`: a BLAS call wakes OpenBLAS's thread pool, which costs ~8 ms after idle
    # on a 2-core box (measured), against ~0.5 ms for this small product in one thread.
    return np.einsum("tf,mf->tm", power, mel_filters(), dtype=np.float32)


def partial_slices(n_samples: int, rate: float = 1.3,
                   min_coverage: float = 0.75) -> list[tuple[int, int]]:
    """Mel-frame ranges of the 160-frame partial windows (Resemblyzer's overlap rule).

    Windows start every round(16000 / rate / 160) frames until they cover the utterance; the
    last one is dropped when less than `min_coverage` of it is audio, unless it is the only one.
    """
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    step = int(np.round((SR / rate) / HOP))
    if not 0 < step <= PARTIAL_FRAMES:
        raise ValueError(f"rate {rate} gives a window step of {step} frames")
    steps = max(1, n_frames - PARTIAL_FRAMES + step + 1)
    out = [(i, i + PARTIAL_FRAMES) for i in range(0, steps, step)]
    last_start = out[-1][0] * HOP
    coverage = (n_samples - last_start) / (PARTIAL_FRAMES * HOP)
    if coverage < min_coverage and len(out) > 1:
        out.pop()
    return out


def partial_mels(wav: np.ndarray, rate: float = 1.3,
                 min_coverage: float = 0.75) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(n_partials, 160, 40) mel windows of a preprocessed utterance, and their frame ranges."""
    slices = partial_slices(len(wav), rate, min_coverage)
    need = slices[-1][1] * HOP
    if need >= len(wav):
        wav = np.pad(wav, (0, need - len(wav)))
    mel = mel_spectrogram(wav)
    return np.stack([mel[a:b] for a, b in slices]), slices
