"""Sound for the audio tower: decoding with PyAV to 16 kHz mono, and Whisper's log-mel front end in numpy.

    from data_pipeline.audio import load_audio, log_mel_spectrogram, log_mel_windows
    wave = load_audio("clip.mp4")                  # float32[S]: the container's audio track, 16 kHz mono
    mel = log_mel_spectrogram(wave, n_mels=80)     # float32[80, 3000]: its first 30 s, padded as Whisper pads
    windows = log_mel_windows(wave, n_mels=128)    # float32[W, 128, 3000]: every 30 s window of a longer clip
    wave = record_sound(record, data_root)         # a record's sound: its `audio` file or its video's track

The front end computes what transformers' `WhisperFeatureExtractor` computes (its PyTorch path): the waveform
truncated or zero-padded to the window, a 400-point periodic-Hann STFT every 160 samples with reflect padding
(the last frame dropped), power spectrum, Slaney mel filters up to 8 kHz, log10 floored at 1e-10, clipped to
8 below the window's maximum, then (x + 4) / 4. Everything is numpy (no torch, no JAX), so it runs in data
worker processes.
"""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_pipeline import storage
from data_pipeline.paths import FROM_VIDEO, resolve_media_path

SAMPLE_RATE = 16_000  # Hz: what every Whisper checkpoint reads
N_FFT = 400  # 25 ms analysis window
HOP_LENGTH = 160  # 10 ms between frames
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH
WINDOW_SECONDS = 30.0  # Whisper's window: 3000 frames
MEL_MAX_HZ = 8000.0
N_MELS = (80, 128)  # tiny ... large-v2 read 80 bins, large-v3 128
# Source rates decoding accepts: below telephone speech's 8 kHz a 16 kHz spectrogram would be mostly empty.
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 8_000, 384_000

AudioSource = str | os.PathLike | bytes | bytearray | memoryview


class AudioError(ValueError):
    """Sound that cannot be used: the message names the file (or `<bytes>`) and why."""


# ---------------------------------------------------------------------------------------------- front end


def window_samples(window_seconds: float = WINDOW_SECONDS) -> int:
    """Samples in one window; a window is a whole number of 10 ms frames and at least one FFT long."""
    samples = round(window_seconds * SAMPLE_RATE)
    if abs(samples - window_seconds * SAMPLE_RATE) > 1e-6 or samples % HOP_LENGTH or samples < N_FFT:
        raise ValueError(f"window_seconds={window_seconds}: must be a multiple of "
                         f"{HOP_LENGTH / SAMPLE_RATE} s and at least {N_FFT / SAMPLE_RATE} s")
    return samples


def _hertz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    mel = 3.0 * hz / 200.0
    log = hz >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hertz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int) -> np.ndarray:
    """float32[N_FFT // 2 + 1, n_mels]: Slaney-normalised triangular filters from 0 to 8 kHz (librosa's and
    transformers' `mel_filter_bank(norm="slaney", mel_scale="slaney")`), computed in float64."""
    edges = _mel_to_hertz(np.linspace(_hertz_to_mel(np.float64(0.0)), _hertz_to_mel(np.float64(MEL_MAX_HZ)),
                                      n_mels + 2))
    fft_hz = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    slopes = edges[None, :] - fft_hz[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (edges[2:] - edges[:-2])  # equal energy per band
    return filters.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    """float32[N_FFT]: the periodic Hann window (torch.hann_window's default)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def _log_mel(windows: np.ndarray, n_mels: int) -> np.ndarray:
    """float32[W, S] (each row one padded window) -> float32[W, n_mels, S // HOP_LENGTH]."""
    if n_mels < 1:
        raise ValueError(f"n_mels={n_mels}: must be positive (Whisper checkpoints use {N_MELS})")
    half = N_FFT // 2
    padded = np.pad(windows, ((0, 0), (half, half)), mode="reflect")
    count = windows.shape[1] // HOP_LENGTH  # the STFT's last frame is dropped, as Whisper does
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=-1)
    frames = frames[:, : count * HOP_LENGTH : HOP_LENGTH]  # float32[W, F, N_FFT], a strided view
    spectrum = np.fft.rfft(frames * _hann(), axis=-1)  # complex64[W, F, N_FFT // 2 + 1]
    power = np.square(spectrum.real) + np.square(spectrum.imag)
    mel = np.matmul(power, mel_filters(n_mels))  # float32[W, F, n_mels]
    log = np.log10(np.maximum(mel, np.float32(1e-10)))
    log = np.maximum(log, log.max(axis=(1, 2), keepdims=True) - np.float32(8.0))
    return ((log + np.float32(4.0)) / np.float32(4.0)).transpose(0, 2, 1)


def _mono_float32(waveform: np.ndarray) -> np.ndarray:
    wave = np.asarray(waveform)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform float[S], got shape {wave.shape}")
    return wave.astype(np.float32, copy=False)


def log_mel_spectrogram(waveform: np.ndarray, n_mels: int = 80, *,
                        window_seconds: float = WINDOW_SECONDS) -> np.ndarray:
    """16 kHz mono float[S] -> float32[n_mels, window_seconds * 100]: Whisper's log-mel features of the
    first window (30 s by default), the waveform zero-padded or truncated to it as `WhisperFeatureExtractor`
    does."""
    samples = window_samples(window_seconds)
    wave = _mono_float32(waveform)[:samples]
    window = np.zeros((1, samples), np.float32)
    window[0, : wave.shape[0]] = wave
    return _log_mel(window, n_mels)[0]


class MelWindows(NamedTuple):
    """features: float32[W, n_mels, F] one row per window (F = window_seconds * 100); valid_frames: int32[W]
    frames of each window that hold sound (the rest of the last window is padding)."""

    features: np.ndarray
    valid_frames: np.ndarray


def log_mel_windows(waveform: np.ndarray, n_mels: int = 80, *, window_seconds: float = WINDOW_SECONDS,
                    max_windows: int | None = None) -> MelWindows:
    """A clip of any length as consecutive windows, each the features `log_mel_spectrogram` gives for that
    stretch alone (zero-padded at the end; an empty clip is one silent window). `max_windows` keeps only the
    first ones."""
    samples = window_samples(window_seconds)
    wave = _mono_float32(waveform)
    count = max(1, math.ceil(wave.shape[0] / samples))
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows={max_windows}: must be positive")
        count = min(count, max_windows)
    wave = wave[: count * samples]
    padded = np.zeros((count * samples,), np.float32)
    padded[: wave.shape[0]] = wave
    per_window = samples // HOP_LENGTH
    filled = np.clip(wave.shape[0] - np.arange(count) * samples, 0, samples)
    # a frame is valid when it starts inside the sound (transformers' attention mask: every HOP-th sample)
    valid = np.minimum(-(-filled // HOP_LENGTH), per_window).astype(np.int32)
    return MelWindows(_log_mel(padded.reshape(count, samples), n_mels), valid)


# ----------------------------------------------------------------------------------------------- decoding


def _name(src: AudioSource) -> str:
    return "<bytes>" if isinstance(src, bytes | bytearray | memoryview) else str(src)


def _open(src: AudioSource):
    import av

    if isinstance(src, bytes | bytearray | memoryview):
        if not len(src):
            raise AudioError("<bytes>: empty (0 bytes)")
        return av.open(io.BytesIO(bytes(src)))
    path = storage.path(src)
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    if storage.size(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    if storage.is_remote(path):  # an object: its bytes, decoded from memory
        return av.open(io.BytesIO(path.read_bytes()))
    return av.open(str(path))


def _check_stream(container, name: str):
    """The first audio stream, refusing a container without one and a source rate we do not read."""
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise AudioError(f"{name}: no audio track (streams: {', '.join(kinds)})")
    stream = container.streams.audio[0]
    rate = int(stream.codec_context.sample_rate or stream.rate or 0)
    if rate <= 0:
        raise AudioError(f"{name}: cannot decode audio (the track declares no sample rate: corrupt or "
                         "truncated)")
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise AudioError(f"{name}: sample rate {rate} Hz is not supported (decoding reads {MIN_SOURCE_RATE} "
                         f"to {MAX_SOURCE_RATE} Hz and resamples to {SAMPLE_RATE})")
    return stream


def load_audio(src: AudioSource, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first audio track of a video container (mp4, webm, mkv, ...) or an audio file (wav, flac, mp3,
    ogg, ...), or of such a file's bytes, as float32[S] mono at `sample_rate`.

    Decoded as Whisper's own loader decodes (`ffmpeg -ac 1 -ar 16000 -f s16le`, then / 32768): FFmpeg's
    resampler downmixes to mono at signed 16 bits, which averages the channels (a float output format would
    sum them at 1/sqrt(2) each, 3 dB louder than what the checkpoints were trained on). A missing file, an
    empty or corrupt one, a container without an audio track, a track with no samples and a source rate
    outside 8-384 kHz raise `AudioError` naming the file."""
    import av

    name = _name(src)
    chunks: list[np.ndarray] = []
    try:
        with _open(src) as container:
            stream = _check_stream(container, name)
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except AudioError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends for corrupt or truncated data
        raise AudioError(f"{name}: cannot decode audio ({type(e).__name__}: {e})") from e
    if not sum(c.size for c in chunks):
        raise AudioError(f"{name}: the audio track holds no samples")
    return np.concatenate(chunks).astype(np.float32) / np.float32(32768.0)


# ------------------------------------------------------------------------------------------------ records


def record_sound(record: dict, data_root: str | os.PathLike | None) -> np.ndarray:
    """A record's sound as float32[S], 16 kHz mono: its `audio` file (a path under `data_root`), or with
    `"audio": "from_video"` the sound track of its video (`video` file or embedded `video_bytes`). Errors
    name the record and the file."""
    rid = record.get("id", "<no id>")
    value = record.get("audio")
    try:
        if value == FROM_VIDEO:
            if record.get("video_bytes") is not None:
                return load_audio(bytes(record["video_bytes"]))
            video = record.get("video")
            if not isinstance(video, str):
                raise AudioError(f"audio={FROM_VIDEO!r} needs a video file, and the record's video is "
                                 f"{video!r}")
            return load_audio(resolve_media_path(video, data_root))
        if not isinstance(value, str) or not value:
            raise AudioError(f"audio={value!r}: expected a file path or {FROM_VIDEO!r}")
        return load_audio(resolve_media_path(value, data_root))
    except (AudioError, ValueError) as e:
        raise AudioError(f"record {rid}: {e}") from e


def sound_problem(path: Path) -> str | None:
    """Why the file at `path` gives no usable sound (missing, empty, corrupt, no audio track, no samples,
    an unsupported rate), or None when it decodes."""
    try:
        load_audio(path)
    except AudioError as e:
        return str(e).removeprefix(f"{path}: ")
    return None
