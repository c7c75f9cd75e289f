"""The audio front end against transformers' WhisperFeatureExtractor, and decoding sound with PyAV from files
the tests write (every container and audio format the project reads)."""

import wave

import av
import numpy as np
import pytest
import transformers
from transformers.audio_utils import mel_filter_bank

from data_pipeline import audio
from data_pipeline.audio import AudioError, load_audio, log_mel_spectrogram, log_mel_windows


def speech_like(seconds: float, rate: int = 16_000, seed: int = 0, noise: bool = True) -> np.ndarray:
    """float32[S]: a voiced-speech stand-in. A harmonic stack on an intonation contour (F0 gliding between
    ~110 and ~270 Hz, analytic phase, so the same signal can be drawn at any rate), shaped by two moving
    formants, gated into ~4 syllables per second with pauses; `noise` adds fricative-like bursts
    (differenced white noise, 40-120 ms). Every tone stays below 7 kHz."""
    rng = np.random.RandomState(seed)
    t = np.arange(round(seconds * rate)) / rate
    base, depth = 190.0 + 20 * rng.rand(), 60.0 + 20 * rng.rand()
    fm, phi = 0.3 + 0.4 * rng.rand(), rng.rand() * 6
    f0 = base + depth * np.sin(2 * np.pi * fm * t + phi)
    wobble = np.cos(2 * np.pi * fm * t + phi) - np.cos(phi)
    phase = 2 * np.pi * (base * t - depth / (2 * np.pi * fm) * wobble)  # the integral of f0
    f1 = 650 + 150 * np.sin(2 * np.pi * 1.3 * t + rng.rand() * 6)
    f2 = 1600 + 400 * np.sin(2 * np.pi * 0.9 * t + rng.rand() * 6)
    x = np.zeros_like(t)
    for k in range(1, int(7000 // (base + depth)) + 1):
        hk = k * f0
        gain = np.exp(-(((hk - f1) / 180) ** 2)) + 0.6 * np.exp(-(((hk - f2) / 250) ** 2)) + 0.15 / k
        x += gain * np.sin(k * phase)
    syllables = np.abs(np.sin(2 * np.pi * 2.0 * t + rng.rand())) ** 1.5
    pauses = (np.sin(2 * np.pi * 0.23 * t + rng.rand() * 6) > -0.6).astype(float)
    x *= 0.15 * syllables * pauses
    if noise:
        for start in rng.uniform(0, max(seconds - 0.2, 0.01), size=int(2 * seconds) + 1):
            a, b = int(start * rate), int((start + rng.uniform(0.04, 0.12)) * rate)
            burst = np.diff(rng.randn(b - a + 1)) * rng.uniform(0.03, 0.12)
            x[a:b] += burst[: len(x[a:b])] * np.hanning(len(x[a:b]))
    return x.astype(np.float32)


def whisper_features(x: np.ndarray, n_mels: int, chunk_length: int = 30) -> np.ndarray:
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk_length)
    return extractor(x, sampling_rate=16_000, return_tensors="np")["input_features"][0]


# ---------------------------------------------------------------------------------------------- front end


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_are_transformers_slaney_bank(n_mels):
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                          max_frequency=8000.0, sampling_rate=16_000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(audio.mel_filters(n_mels), ref.astype(np.float32), rtol=0, atol=1e-7)


@pytest.mark.parametrize(("seconds", "seed"), [(3.7, 0), (12.0, 1), (30.0, 2), (41.3, 3)])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor_on_speech(n_mels, seconds, seed):
    """Padded (short clips) or truncated (41 s) to 30 s as the extractor does; every bin within 1e-4."""
    x = speech_like(seconds, seed=seed)
    ours = log_mel_spectrogram(x, n_mels=n_mels)
    ref = whisper_features(x, n_mels)
    assert ours.shape == ref.shape == (n_mels, 3000) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert ours.max() - ours.min() > 1.5  # speech, pauses and padding: a real dynamic range was compared


def test_log_mel_takes_float64_and_lists_like_the_extractor():
    x = speech_like(2.0, seed=5).astype(np.float64) * 3.0  # loud: float64 is cast to float32 first
    np.testing.assert_allclose(log_mel_spectrogram(x), whisper_features(x, 80), rtol=0, atol=1e-4)


def test_a_shorter_window_matches_the_extractor_chunk_length():
    x = speech_like(3.3, seed=6)
    ours = log_mel_spectrogram(x, n_mels=80, window_seconds=2)
    assert ours.shape == (80, 200)
    np.testing.assert_allclose(ours, whisper_features(x, 80, chunk_length=2), rtol=0, atol=1e-4)


def test_long_clip_is_cut_into_30s_windows_each_as_the_extractor_sees_it():
    x = speech_like(75.0, seed=7)
    out = log_mel_windows(x, n_mels=80)
    assert out.features.shape == (3, 80, 3000)
    np.testing.assert_array_equal(out.valid_frames, [3000, 3000, 1500])
    for i in range(3):
        np.testing.assert_allclose(out.features[i], whisper_features(x[i * 480_000:(i + 1) * 480_000], 80),
                                   rtol=0, atol=1e-4, err_msg=f"window {i}")
    first_two = log_mel_windows(x, n_mels=80, max_windows=2)
    np.testing.assert_array_equal(first_two.features, out.features[:2])


def test_window_edges_and_empty_clip():
    exact = log_mel_windows(np.ones(480_000, np.float32) * 0.1)
    assert exact.features.shape[0] == 1 and exact.valid_frames.tolist() == [3000]
    one_more = log_mel_windows(np.ones(480_001, np.float32) * 0.1)
    assert one_more.valid_frames.tolist() == [3000, 1]
    empty = log_mel_windows(np.zeros(0, np.float32), n_mels=128)
    assert empty.features.shape == (1, 128, 3000) and empty.valid_frames.tolist() == [0]
    silence = whisper_features(np.zeros(16, np.float32), 128)
    np.testing.assert_allclose(empty.features, silence[None], rtol=0, atol=1e-6)


def test_bad_front_end_arguments_are_named():
    with pytest.raises(ValueError, match="mono waveform"):
        log_mel_spectrogram(np.zeros((2, 1600), np.float32))
    with pytest.raises(ValueError, match="window_seconds=0.0123"):
        log_mel_spectrogram(np.zeros(1600, np.float32), window_seconds=0.0123)
    with pytest.raises(ValueError, match="n_mels=0"):
        log_mel_spectrogram(np.zeros(1600, np.float32), n_mels=0)
    with pytest.raises(ValueError, match="max_windows=0"):
        log_mel_windows(np.zeros(1600, np.float32), max_windows=0)


# ----------------------------------------------------------------------------------------------- decoding

# name, container format, suffix, audio encoders to try (first available), video encoders (None: audio only),
# source rate, channels, lossless
FORMATS = [
    ("wav", "wav", ".wav", ("pcm_s16le",), None, 44_100, 2, True),
    ("flac", "flac", ".flac", ("flac",), None, 22_050, 1, True),
    ("mp3", "mp3", ".mp3", ("libmp3lame", "mp3"), None, 44_100, 2, False),
    ("ogg", "ogg", ".ogg", ("libopus", "opus", "libvorbis", "vorbis"), None, 48_000, 2, False),
    ("mp4", "mp4", ".mp4", ("aac",), ("libx264", "mpeg4"), 48_000, 2, False),
    ("webm", "webm", ".webm", ("libopus", "opus", "libvorbis", "vorbis"), ("libvpx", "libvpx-vp9"), 48_000, 2,
     False),
    ("mkv", "matroska", ".mkv", ("flac", "aac"), ("mpeg4", "libx264"), 32_000, 2, True),
]


def _encoder(candidates):
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # av.codec.codec.UnknownCodecError: not in this FFmpeg build
            continue
    return None


def _require(candidates, what):
    name = _encoder(candidates)
    if name is None:
        pytest.skip(f"{what}: none of the encoders {candidates} is in this PyAV build (FFmpeg "
                    f"{av.library_versions.get('libavcodec')})")
    return name


def write_media(path, fmt, audio_codec, rate, channels, signal, video_codec=None, seconds=2.0):
    """Encodes `signal` float32[C, S] (C = channels) with PyAV, plus 10 fps black video when asked."""
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w", format=fmt) as out:
        video = None
        if video_codec:
            video = out.add_stream(video_codec, rate=10)
            video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        if audio_codec:
            stream = out.add_stream(audio_codec, rate=rate, layout=layout)
            stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's own opus/vorbis encoders
            for i in range(0, signal.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[:, i:i + 1024]), format="fltp",
                                                   layout=layout)
                frame.sample_rate, frame.pts = rate, i
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        if video is not None:
            for i in range(int(10 * seconds)):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                frame.pts = i
                for packet in video.encode(frame):
                    out.mux(packet)
            for packet in video.encode(None):
                out.mux(packet)


def _aligned_correlation(got, want, max_lag=800):
    """Correlation of `got` with `want` at the lag (|lag| <= 50 ms) that aligns them best (codec delay)."""
    n = min(len(got), len(want)) - 2 * max_lag
    lags = range(-max_lag, max_lag + 1)
    lag = max(lags, key=lambda k: float(np.dot(got[max_lag + k:max_lag + k + n], want[max_lag:max_lag + n])))
    return float(np.corrcoef(got[max_lag + lag:max_lag + lag + n], want[max_lag:max_lag + n])[0, 1]), lag


@pytest.mark.parametrize("spec", FORMATS, ids=[f[0] for f in FORMATS])
def test_decoded_track_is_the_encoded_sound_at_16k_mono(tmp_path, spec):
    name, fmt, suffix, audio_codecs, video_codecs, rate, channels, lossless = spec
    codec = _require(audio_codecs, f"{name} audio")
    vcodec = _require(video_codecs, f"{name} video") if video_codecs else None
    seconds = 2.0
    source = speech_like(seconds, rate=rate, seed=11, noise=False)
    path = tmp_path / f"clip{suffix}"
    write_media(path, fmt, codec, rate, channels, np.stack([source] * channels), vcodec, seconds)

    got = load_audio(path)
    want = speech_like(seconds, rate=16_000, seed=11, noise=False)  # the same sound drawn at 16 kHz
    assert got.dtype == np.float32 and got.ndim == 1
    # duration at 16 kHz: a wrong rate would stretch it; lossy codecs add up to ~one frame of priming
    assert abs(len(got) - 32_000) <= (40 if lossless else 1_200), len(got)
    corr, lag = _aligned_correlation(got, want)
    assert corr > (0.999 if lossless else 0.98), (codec, corr, lag)
    # equal channels average to the channel itself (Whisper's loader), not sqrt(2) louder
    np.testing.assert_allclose(np.abs(got).max(), np.abs(want).max(), rtol=0.08)
    assert np.array_equal(load_audio(path.read_bytes()), got)  # the file's bytes decode the same


def test_lossless_16k_mono_round_trip_is_exact_up_to_16_bits(tmp_path):
    x = speech_like(1.5, seed=12)
    path = tmp_path / "clip.wav"
    write_media(path, "wav", "pcm_s16le", 16_000, 1, x[None])
    np.testing.assert_allclose(load_audio(path), x, rtol=0, atol=1.5 / 32768)


def test_stereo_is_averaged_to_mono(tmp_path):
    x = speech_like(1.0, seed=13, noise=False)
    path = tmp_path / "left_only.wav"
    write_media(path, "wav", "pcm_s16le", 16_000, 2, np.stack([x, np.zeros_like(x)]))
    np.testing.assert_allclose(load_audio(path), x / 2, rtol=0, atol=2.5 / 32768)


def _wav_bytes(path, rate, samples):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def test_missing_empty_corrupt_and_silent_tracks_name_the_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: file not found"):
        load_audio(tmp_path / "nope.wav")
    for suffix in (".wav", ".mp4"):
        empty = tmp_path / f"empty{suffix}"
        empty.write_bytes(b"")
        with pytest.raises(AudioError, match=rf"empty{suffix}: empty file \(0 bytes\)"):
            load_audio(empty)
    for suffix in (".mp3", ".mp4", ".flac"):
        corrupt = tmp_path / f"corrupt{suffix}"
        corrupt.write_bytes(np.random.RandomState(0).bytes(4096))
        with pytest.raises(AudioError, match=rf"corrupt{suffix}: (cannot decode audio|no audio track)"):
            load_audio(corrupt)
    no_samples = tmp_path / "no_samples.wav"
    _wav_bytes(no_samples, 16_000, np.zeros(0))
    with pytest.raises(AudioError, match=r"no_samples\.wav: the audio track holds no samples"):
        load_audio(no_samples)
    with pytest.raises(AudioError, match=r"<bytes>: empty"):
        load_audio(b"")


def test_a_video_without_sound_says_it_has_no_audio_track(tmp_path):
    vcodec = _require(("mpeg4", "libx264"), "mp4 video")
    path = tmp_path / "silent_film.mp4"
    write_media(path, "mp4", None, 16_000, 1, np.zeros((1, 0), np.float32), vcodec, seconds=1.0)
    with pytest.raises(AudioError, match=r"silent_film\.mp4: no audio track \(streams: video\)"):
        load_audio(path)


def test_an_unsupported_sample_rate_is_refused_naming_the_file(tmp_path):
    low = tmp_path / "phone_4k.wav"
    _wav_bytes(low, 4_000, (np.sin(np.arange(4000) * 0.3) * 8000))
    with pytest.raises(AudioError, match=r"phone_4k\.wav: sample rate 4000 Hz is not supported"):
        load_audio(low)
    ok = tmp_path / "phone_8k.wav"
    _wav_bytes(ok, 8_000, (np.sin(np.arange(8000) * 0.3) * 8000))
    assert abs(len(load_audio(ok)) - 16_000) <= 40  # the lowest accepted rate, doubled
