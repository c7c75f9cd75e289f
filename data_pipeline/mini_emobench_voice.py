"""mini-EmoBench's voices: short utterances synthesised at 16 kHz whose prosody says the speaker's emotion.

A voice here is a harmonic stack on a pitch contour, filtered through the formants of a vowel per syllable
and gated into syllables with pauses (no words: the words of a record are in its text). What differs per
emotion is what speech research reports listeners use (Scherer 2003; Banse and Scherer 1996), drawn large:

| emotion  | pitch          | contour                     | tempo (syllables/s) | loudness | voice        |
|----------|----------------|-----------------------------|---------------------|----------|--------------|
| joy      | high (240 Hz)  | rises then falls, wide      | fast (5)            | loud     | clear        |
| sadness  | low (130 Hz)   | falls                       | slow (2)            | quiet    | breathy      |
| anger    | mid (180 Hz)   | flat, level                 | fastest (6.5)       | loudest  | harsh        |
| fear     | highest (300)  | trembles (9 Hz vibrato)     | medium-fast (4)     | soft     | breathy      |
| surprise | mid (210 Hz)   | rises steeply to the end    | medium (3)          | loud     | clear        |
| disgust  | lowest (115)   | falls then rises (a dip)    | slow (2.5)          | medium   | harsh        |

Each clip varies the speaker (pitch +-8%), tempo (+-10%), loudness (+-15%), length, onset and vowels, so a
model has to read the prosody, not one waveform. `synthesise` is deterministic given its rng.
"""

from __future__ import annotations

import dataclasses
import io
import os
import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
CLIP_SECONDS = 2.0  # every clip: the utterance, then silence up to this length
# (F1, F2) of the vowels a, i, u, e, o (adult averages, Hz)
VOWELS = ((730.0, 1090.0), (270.0, 2290.0), (300.0, 870.0), (530.0, 1840.0), (570.0, 840.0))
MAX_HARMONIC_HZ = 4000.0


@dataclasses.dataclass(frozen=True)
class Prosody:
    """How an emotion sounds: median pitch (Hz), contour shape and depth (fraction of the pitch), syllables
    per second, peak loudness (full scale 1), and voice quality ("clear" | "breathy" | "harsh")."""

    pitch: float
    contour: str
    depth: float
    rate: float
    loudness: float
    voice: str


PROSODY = {
    "joy": Prosody(240.0, "rise-fall", 0.35, 5.0, 0.5, "clear"),
    "sadness": Prosody(130.0, "fall", 0.3, 2.0, 0.08, "breathy"),
    "anger": Prosody(180.0, "flat", 0.04, 6.5, 0.9, "harsh"),
    "fear": Prosody(300.0, "tremble", 0.1, 4.0, 0.18, "breathy"),
    "surprise": Prosody(210.0, "rise", 0.8, 3.0, 0.6, "clear"),
    "disgust": Prosody(115.0, "dip", 0.35, 2.5, 0.3, "harsh"),
}
CONTOUR_WORDS = {
    "rise-fall": "rises and falls widely", "fall": "falls", "flat": "stays flat",
    "tremble": "trembles", "rise": "rises steeply at the end", "dip": "falls and rises again",
}


def describe(emotion: str) -> str:
    """The prosody of `emotion` in words (for rationales)."""
    p = PROSODY[emotion]
    pitch = "high" if p.pitch >= 230 else "low" if p.pitch <= 140 else "medium"
    rate = "fast" if p.rate >= 4.5 else "slow" if p.rate <= 2.5 else "measured"
    loud = "loud" if p.loudness >= 0.5 else "quiet" if p.loudness <= 0.2 else "moderately loud"
    return (f"a {pitch} voice whose pitch {CONTOUR_WORDS[p.contour]}, {rate} and {loud}"
            + {"clear": "", "breathy": ", breathy", "harsh": ", harsh"}[p.voice])


def _contour(kind: str, u: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Relative pitch offset over the utterance; u in [0, 1] is the position in it, t seconds."""
    if kind == "rise-fall":
        return np.sin(np.pi * u) * 1.2 - 0.4
    if kind == "fall":
        return 0.6 - 1.2 * u
    if kind == "tremble":
        return np.sin(2 * np.pi * 9.0 * t)
    if kind == "rise":
        return 1.4 * u**2 - 0.3
    if kind == "dip":
        return 1.6 * (2 * u - 1) ** 2 - 0.6
    return np.zeros_like(u)


def synthesise(emotion: str, rng: np.random.Generator, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """float32[seconds * 16000]: one utterance of `emotion`'s prosody (`PROSODY`), silence after it."""
    p = PROSODY[emotion]
    speaker, tempo, gain = rng.uniform(0.92, 1.08), rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)
    length, onset = rng.uniform(1.35, 1.75), rng.uniform(0.02, 0.15)
    t = np.arange(round(seconds * SAMPLE_RATE), dtype=np.float64) / SAMPLE_RATE
    u = np.clip((t - onset) / length, 0.0, 1.0)
    f0 = p.pitch * speaker * (1.0 + p.depth * _contour(p.contour, u, t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    n_syl = max(2, round(length * p.rate * tempo))
    syl = np.minimum((u * n_syl).astype(np.int64), n_syl - 1)  # syllable of each sample
    within = u * n_syl - syl  # position inside it, [0, 1)
    envelope = np.where(within < 0.72, np.sin(np.pi * within / 0.72) ** 2, 0.0)  # voiced part, then a pause
    envelope *= (t >= onset) & (t < onset + length)
    formants = np.asarray(VOWELS)[rng.integers(len(VOWELS), size=n_syl)][syl]  # float[S, 2]
    tilt = 0.5 if p.voice == "harsh" else 1.0  # harsh voices keep more energy in high harmonics
    # Harmonic gains change slowly: computed every 5 ms and held; sin(k phase) by the recurrence
    # sin(k a) = 2 cos(a) sin((k - 1) a) - sin((k - 2) a).
    hold = SAMPLE_RATE // 200
    f0_slow, formants_slow = f0[::hold], formants[::hold]
    two_cos, prev, cur = 2.0 * np.cos(phase), np.zeros_like(t), np.sin(phase)
    x = np.zeros_like(t)
    for k in range(1, int(MAX_HARMONIC_HZ // f0.min()) + 1):
        hk = k * f0_slow
        gain_k = (np.exp(-(((hk - formants_slow[:, 0]) / 90.0) ** 2))
                  + 0.7 * np.exp(-(((hk - formants_slow[:, 1]) / 120.0) ** 2)) + 0.08) / k**tilt
        x += np.repeat(np.where(hk < MAX_HARMONIC_HZ, gain_k, 0.0), hold)[: len(t)] * cur
        prev, cur = cur, two_cos * cur - prev
    if p.voice != "clear":  # breath or roughness: noise riding on the voiced parts
        x += (0.25 if p.voice == "breathy" else 0.12) * rng.standard_normal(t.shape) * np.abs(x).max()
    x *= envelope
    x *= p.loudness * gain / max(np.abs(x).max(), 1e-9)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def silence(seconds: float = CLIP_SECONDS) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), np.float32)


def wav_bytes(wave_f32: np.ndarray) -> bytes:
    """16-bit PCM mono WAV at 16 kHz (deterministic bytes)."""
    pcm = np.round(np.clip(wave_f32, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def save_wav(wave_f32: np.ndarray, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(wave_f32))
