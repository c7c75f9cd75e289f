"""mini-EmoBench: a deterministic, procedurally drawn EmoBench stand-in that a tiny model learns in minutes.

`python -m data_pipeline.mini_emobench --out DIR [--seed S] [--blank-control] [--video-files] [--sound]`

Every label follows from large visible cues at 64x64 (16x16 patches): a face filling the image whose brows,
eyes and mouth encode one of six emotions; a held object or night scene for intent; the face colour, weather
scene or expression that a caption agrees or clashes with for hate / humor / sarcasm; shapes and colours for
the objective caption / vqa tasks.

Hate / humor / sarcasm are a clash between a binary text feature and a binary image feature. Their captions
alone are at chance (each caption occurs equally often with both labels), but the text feature is skewed
4:1 as in real data (most sarcastic posts use positive words), so the image alone predicts 80% and the
caption flips the rest. A balanced pure XOR would give gradient descent no marginal signal to start from.

With sound (`sound_sizes`, `--sound`), emo_c and sarcasm also get voice records: a 2 s utterance whose
prosody (pitch level and contour, tempo, loudness, voice quality) says the emotion, asked about with an
`<audio>` marker; in voice sarcasm the words are in the text and the tone of voice agrees or clashes with
them, with the same 4:1 skew. `test_silent.jsonl` repeats the test split with every sound replaced by
silence, as `test_blank.jsonl` does with the pictures.

`card.json` states the rules. Same seed -> byte-identical files. This module picks the scenes, labels, texts
and files; `data_pipeline.mini_emobench_draw` draws the pictures, `data_pipeline.mini_emobench_voice`
synthesises the voices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline import mini_emobench_voice as voice
from data_pipeline import storage
from data_pipeline.mini_emobench_draw import (
    BACKGROUNDS,
    IMAGE_SIZE,
    SHAPE_COLOURS,
    SHAPES,
    SKIN,
    draw_face,
    draw_shapes,
    draw_weather,
)
from data_pipeline.records import AUDIO_MARKER, IMAGE_MARKER, VIDEO_MARKER

VERSION = 3
NUM_FRAMES = 4
EMOTIONS = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
INTENTS = ("to be left alone", "to eat", "to get help", "to play", "to sleep")
YES_NO = ("no", "yes")
BOTH = (False, True)
DEFAULT_SIZES: dict[str, tuple[int, int]] = {  # task -> (train, test)
    "emo_c": (400, 60), "emo_o": (400, 60), "intent": (400, 60), "hate": (400, 60), "humor": (400, 60),
    "sarcasm": (400, 60), "caption": (300, 60), "vqa": (300, 60),
}
SOUND_SIZES: dict[str, tuple[int, int]] = {"emo_c": (300, 60), "sarcasm": (300, 60)}  # voice records
BLANK_GREY = (128, 128, 128)
SILENT = "audio/silent.wav"

# Emotion -> (brows, eyes, mouth, tears); every part is drawn large so one 16x16 patch row shows it.
CUES = {
    "joy": ("level", "round", "smile", False),
    "sadness": ("inner-raised", "round", "frown", True),
    "anger": ("inner-lowered", "narrow", "flat", False),
    "fear": ("inner-raised", "wide", "small-open", False),
    "surprise": ("high-arched", "wide", "big-open", False),
    "disgust": ("low", "narrow", "wavy", False),
}
NEUTRAL = ("level", "round", "thin", False)
SLEEPY = ("level", "closed", "thin", False)
CUE_WORDS = {
    "level": "level brows", "inner-raised": "brows raised at the inner ends",
    "inner-lowered": "brows pulled down at the inner ends", "high-arched": "high arched brows",
    "low": "low flat brows", "round": "relaxed round eyes", "narrow": "narrowed eyes",
    "wide": "wide open eyes", "closed": "closed eyes", "smile": "a mouth curving up",
    "frown": "a mouth curving down", "flat": "a tight flat mouth", "small-open": "a small open mouth",
    "big-open": "a wide open mouth", "wavy": "a twisted wavy mouth", "thin": "a thin relaxed mouth",
}
GROUP_COLOURS = {"green": (70, 180, 70), "purple": (150, 80, 210)}
NUMBER_WORDS = ("zero", "one", "two")

INSTRUCTIONS = {
    "emo_c": (
        "Identify the only emotion depicted in the given {media} from the following options: [{options}].",
        "Which emotion does the person in the {media} show? Choose one of these options: [{options}].",
        "Select the emotion expressed by the face in the {media} from these options: [{options}].",
    ),
    "emo_o": (
        "What emotion is depicted in the given {media}? Answer with one word.",
        "Describe the emotion of the person in the {media} with a single word.",
        "Which emotion does the face in the {media} express? Answer with one word.",
    ),
    "intent": (
        "What does the person in the {media} want? Choose one of the following options: [{options}].",
        "Identify the intention of the person in the given {media} from the following options: [{options}].",
    ),
    "hate": (
        'The {media} is posted with the caption: "{caption}" Is this post hateful? Answer yes or no.',
        'Caption: "{caption}" Considering both the {media} and the caption, is this meme hateful? '
        "Answer yes or no.",
    ),
    "humor": (
        'The {media} is posted with the caption: "{caption}" Is this post humorous? Answer yes or no.',
        'Caption: "{caption}" Considering both the {media} and the caption, is this funny? Answer yes or no.',
    ),
    "sarcasm": (
        'The person in the {media} posted: "{caption}" Is this post sarcastic? Answer yes or no.',
        'Caption: "{caption}" Considering the face in the {media} and the caption, is this sarcastic? '
        "Answer yes or no.",
    ),
    "caption": ("Describe the {media}.", "Write a short caption for the {media}.", "What is in the {media}?"),
}
HATE_CAPTIONS = ("Typical {c} one. Pathetic.", "Ugh, another {c} one. Get out.", "No {c} ones allowed here.")
SARCASM_CAPTIONS = {
    "positive": ("I just love Mondays.", "Best day ever!", "What a wonderful morning.", "Life is great."),
    "negative": ("Worst day ever.", "This is terrible.", "I hate surprises.", "Everything is ruined."),
}
WEATHER = ("sunny", "rainy")
HUMOR_CAPTIONS = {
    "sunny": ("Perfect weather for sunbathing!", "Not a single cloud in the sky today."),
    "rainy": ("Do not forget your umbrella today.", "Great weather for ducks!"),
}
SKEW = 4  # records with the common text feature per record with the rare one (hate / humor / sarcasm)
# The common text feature of each clash task: the caption alone stays at chance, the image alone gives 80%.
COMMON = {"hate": "green", "humor": "sunny", "sarcasm": "positive"}


# ----------------------------------------------------------------------------------------------- records


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _balanced(rng: np.random.Generator, values: tuple, n: int) -> list:
    """n values cycling through `values` (so counts differ by at most one), in random order."""
    out = [values[i % len(values)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def _describe(cues) -> str:
    brows, eyes, mouth, tears = cues
    text = f"{CUE_WORDS[brows]}, {CUE_WORDS[eyes]} and {CUE_WORDS[mouth]}"
    return text + (" with tears" if tears else "")


def _question(task: str, rng: np.random.Generator, media: str, **kw) -> str:
    marker = VIDEO_MARKER if media == "video" else IMAGE_MARKER
    return f"{marker}\n" + _pick(rng, INSTRUCTIONS[task]).format(media=media, **kw)


def _record(rid: str, task: str, question: str, answer: str, *, media: str = "image", label=None,
            options=None, rationale: str, meta: dict) -> dict[str, Any]:
    """A record, keys in the schema's order (`data_pipeline.records`); the media path (`media` key) is
    filled in when the frames are saved."""
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    rec: dict[str, Any] = {"id": rid, "task": task, media: None, "conversations": turns}
    if label is not None:
        rec["label"] = label
    if options is not None:
        rec["options"] = list(options)
    rec["rationale"], rec["meta"] = rationale, meta
    return rec


def _face_kwargs(rng: np.random.Generator) -> dict:
    return {"skin": _pick(rng, SKIN), "background": _pick(rng, BACKGROUNDS), "rng": rng}


def _cue_meta(cues) -> dict:
    return {"cues": [*cues[:3], *(["tears"] if cues[3] else [])]}


def _emotion_item(task: str, rid: str, label: str, rng, as_video: bool):
    cues, kw = CUES[label], _face_kwargs(rng)
    if as_video:  # a neutral first frame, then the expression while the head drifts
        sx, sy = int(rng.choice([-1, 1])), int(rng.choice([-1, 1]))
        frames = [draw_face(NEUTRAL if t == 0 else cues, shift=(sx * t, sy * t), **kw)
                  for t in range(NUM_FRAMES)]
        why = f"The face starts neutral, then shows {_describe(cues)}, which signals {label}."
    else:
        frames = [draw_face(cues, **kw)]
        why = f"The face shows {_describe(cues)}, which signals {label}."
    media = "video" if as_video else "image"
    options = EMOTIONS if task == "emo_c" else None
    q = _question(task, rng, media, options=", ".join(EMOTIONS))
    return _record(rid, task, q, label, media=media, label=label, options=options, rationale=why,
                   meta=_cue_meta(cues)), frames


INTENT_SCENES = {  # intent -> (face cues, held object, night)
    "to eat": (CUES["joy"], "apple", False), "to play": (CUES["joy"], "ball", False),
    "to sleep": (SLEEPY, None, True), "to get help": (CUES["fear"], None, False),
    "to be left alone": (CUES["anger"], None, False),
}
INTENT_WHY = {
    "to eat": "The person smiles while holding an apple, so they want to eat.",
    "to play": "The person smiles while holding a ball, so they want to play.",
    "to sleep": "The eyes are closed and it is night with a moon, so the person wants to sleep.",
    "to get help": "The wide eyes, raised inner brows and open mouth show fear, so the person wants help.",
    "to be left alone": "Lowered brows and a tight mouth show anger and nothing is held, so the person "
                        "wants to be left alone.",
}


def _intent_item(rid: str, label: str, rng):
    cues, held, night = INTENT_SCENES[label]
    im = draw_face(cues, held=held, night=night, **_face_kwargs(rng))
    q = _question("intent", rng, "image", options=", ".join(INTENTS))
    return _record(rid, "intent", q, label, label=label, options=INTENTS, rationale=INTENT_WHY[label],
                   meta={"held": held, "night": night}), [im]


def _hate_item(rid: str, caption: str, colour: str, yes: bool, rng):
    """Hateful iff the caption's insulted colour group is the colour of the depicted face."""
    face = colour if yes else next(c for c in GROUP_COLOURS if c != colour)
    im = draw_face(CUES[_pick(rng, EMOTIONS)], skin=GROUP_COLOURS[face], background=_pick(rng, BACKGROUNDS),
                   rng=rng)
    how = "so it attacks the person depicted" if yes else "so it does not target the person depicted"
    why = f"The caption insults {colour} people and the person shown is {face}, {how}."
    q = _question("hate", rng, "image", caption=caption)
    return _record(rid, "hate", q, YES_NO[yes], label=YES_NO[yes], options=YES_NO, rationale=why,
                   meta={"caption": caption, "caption_colour": colour, "face_colour": face}), [im]


def _humor_item(rid: str, caption: str, said: str, yes: bool, rng):
    """Humorous iff the caption describes weather other than the pictured one (a playful mismatch)."""
    shown = next(w for w in WEATHER if w != said) if yes else said
    how = "a playful mismatch" if yes else "a plain description"
    why = f"The caption talks about {said} weather and the picture is {shown}: {how}."
    q = _question("humor", rng, "image", caption=caption)
    rec = _record(rid, "humor", q, YES_NO[yes], label=YES_NO[yes], options=YES_NO, rationale=why,
                  meta={"caption": caption, "caption_scene": said, "image_scene": shown})
    return rec, [draw_weather(shown, rng)]


def _sarcasm_item(rid: str, caption: str, tone: str, yes: bool, rng):
    """Sarcastic iff the caption's tone and the face's valence disagree: a smiling face (joy) or a frowning,
    crying one (sadness, whose blue tears are the largest cue of any negative emotion)."""
    face_positive = (tone == "positive") != yes
    emotion = "joy" if face_positive else "sadness"
    im = draw_face(CUES[emotion], **_face_kwargs(rng))
    how = "they clash" if yes else "they agree"
    why = f"The words sound {tone} and the face shows {emotion} ({_describe(CUES[emotion])}): {how}."
    q = _question("sarcasm", rng, "image", caption=caption)
    return _record(rid, "sarcasm", q, YES_NO[yes], label=YES_NO[yes], options=YES_NO, rationale=why,
                   meta={"caption": caption, "caption_tone": tone, "face_emotion": emotion}), [im]


def _shape_items(rng) -> list[tuple[str, str]]:
    return [(_pick(rng, tuple(SHAPE_COLOURS)), _pick(rng, SHAPES)) for _ in range(1 + int(rng.integers(2)))]


def _shape_caption(items) -> str:
    if len(items) == 2 and items[0] == items[1]:
        return f"two {items[0][0]} {items[0][1]}s"
    return " and ".join(f"a {c} {s}" for c, s in items)


def _caption_item(rid: str, kind: str, rng):
    if kind == "face":
        cues = _pick(rng, (*CUES.values(), NEUTRAL, SLEEPY))
        im, answer = draw_face(cues, **_face_kwargs(rng)), f"a face with {_describe(cues)}"
        why = "The picture shows one face; its brows, eyes and mouth are described."
    else:
        items = _shape_items(rng)
        im, answer = draw_shapes(items, rng), _shape_caption(items)
        why = "The shapes are listed from left to right with their colours."
    q = _question("caption", rng, "image")
    return _record(rid, "caption", q, answer, rationale=why, meta={"kind": kind}), [im]


def _vqa_item(rid: str, rng):
    items = _shape_items(rng)
    colours, shapes = [c for c, _ in items], [s for _, s in items]
    kinds = ("count", "present") + (("colour",) if len(set(shapes)) == len(shapes) else ()) + (
        ("shape",) if len(set(colours)) == len(colours) else ())
    kind = _pick(rng, kinds)
    why = f"The image shows {_shape_caption(items)}."
    if kind == "count":
        q, a = "How many shapes are there?", NUMBER_WORDS[len(items)]
    elif kind == "present":
        shape = _pick(rng, SHAPES)
        q, a = f"Is there a {shape} in the image?", YES_NO[shape in shapes]
    elif kind == "colour":
        c, s = _pick(rng, items)
        q, a, why = f"What color is the {s}?", c, f"The {s} is filled with {c}."
    else:
        c, s = _pick(rng, items)
        q, a, why = f"What shape is the {c} object?", s, f"The {c} object is a {s}."
    question = f"{IMAGE_MARKER}\n{q} Answer with one word."
    rec = _record(rid, "vqa", question, a, rationale=why, meta={"kind": kind})
    return rec, [draw_shapes(items, rng)]


def _skewed(captions: Mapping[str, tuple[str, ...]], common: str) -> tuple:
    """(caption, text feature, label) triples: every caption with both labels equally often, and `SKEW`
    common-feature triples per rare one, in blocks of `SKEW + 1` of one label (so any whole number of blocks
    has the skew exactly and consecutive block pairs balance the labels)."""
    rare = next(k for k in captions if k != common)
    major = [(t, common, y) for t in captions[common] for y in BOTH]
    minor = [(t, rare, y) for t in captions[rare] for y in BOTH]
    if len(major) != len(minor):
        raise ValueError(f"{common}/{rare}: need as many common as rare captions")
    return tuple(v for a, b in zip(major, minor, strict=True) for v in (a,) * SKEW + (b,))


def _task_values(task: str) -> tuple:
    """What `_balanced` cycles through per task: labels, or (caption, text feature, label) triples."""
    if task in ("emo_c", "emo_o"):
        return EMOTIONS
    if task == "intent":
        return INTENTS
    if task == "hate":
        return _skewed({c: tuple(t.format(c=c) for t in HATE_CAPTIONS) for c in GROUP_COLOURS}, COMMON[task])
    if task == "humor":
        return _skewed(HUMOR_CAPTIONS, COMMON[task])
    if task == "sarcasm":
        return _skewed(SARCASM_CAPTIONS, COMMON[task])
    if task == "caption":
        return ("shapes", "shapes", "face")
    return ("any",)


def _items(task: str, split: str, n: int, rng: np.random.Generator, video_fraction: float):
    """Yields (record, frames) for one task and split, labels (and captions x labels) balanced."""
    make = {"hate": _hate_item, "humor": _humor_item, "sarcasm": _sarcasm_item}
    for i, value in enumerate(_balanced(rng, _task_values(task), n)):
        rid = f"{task}-{split}-{i:05d}"
        if task in ("emo_c", "emo_o"):
            as_video = task == "emo_o" and rng.random() < video_fraction
            yield _emotion_item(task, rid, value, rng, as_video)
        elif task == "intent":
            yield _intent_item(rid, value, rng)
        elif task in make:
            yield make[task](rid, *value, rng)
        elif task == "caption":
            yield _caption_item(rid, value, rng)
        else:
            yield _vqa_item(rid, rng)


VOICE_INSTRUCTIONS = {
    "emo_c": (
        "Identify the emotion in the speaker's voice from the following options: [{options}].",
        "Which emotion does the tone of voice express? Choose one of these options: [{options}].",
    ),
    "sarcasm": (
        'The speaker says: "{caption}" Is this sarcastic? Answer yes or no.',
        'Listen to how it is said: "{caption}" Is the speaker being sarcastic? Answer yes or no.',
    ),
}
NEGATIVE_VOICES = ("sadness", "anger", "disgust")


def _voice_item(task: str, rid: str, value, rng: np.random.Generator):
    """(record, float32 waveform) of one voice record: emo_c from the prosody alone; sarcasm iff the tone of
    voice (joy, or a negative emotion) disagrees with the words' tone."""
    instruction = _pick(rng, VOICE_INSTRUCTIONS[task])
    if task == "emo_c":
        emotion = value
        q = f"{AUDIO_MARKER}\n" + instruction.format(options=", ".join(EMOTIONS))
        why = f"The speaker has {voice.describe(emotion)}, which signals {emotion}."
        rec = _record(rid, task, q, emotion, media="audio", label=emotion, options=EMOTIONS, rationale=why,
                      meta={"voice_emotion": emotion})
    else:
        caption, tone, yes = value
        emotion = "joy" if (tone == "positive") != yes else _pick(rng, NEGATIVE_VOICES)
        q = f"{AUDIO_MARKER}\n" + instruction.format(caption=caption)
        why = (f"The words sound {tone}, said in {voice.describe(emotion)} ({emotion}): "
               f"{'they clash' if yes else 'they agree'}.")
        meta = {"caption": caption, "caption_tone": tone, "voice_emotion": emotion}
        rec = _record(rid, task, q, YES_NO[yes], media="audio", label=YES_NO[yes], options=YES_NO,
                      rationale=why, meta=meta)
    return rec, voice.synthesise(emotion, rng)


def _voice_items(task: str, split: str, n: int, rng: np.random.Generator):
    for i, value in enumerate(_balanced(rng, _task_values(task), n)):
        yield _voice_item(task, f"{task}-voice-{split}-{i:05d}", value, rng)


# ----------------------------------------------------------------------------------------------- writing


def _save_png(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")


def save_mp4(frames: list[Image.Image], path: str | os.PathLike, fps: int = 4) -> None:
    """Writes frames as a lossless H.264 (4:4:4, qp 0) mp4, single-threaded so the bytes are reproducible.

    Without libx264 in this PyAV build it falls back to intra-only, high-quality MPEG-4 Part 2 (lossy, 4:2:0).
    """
    import av

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lossless = "libx264" in av.codecs_available
    with av.open(str(path), "w", format="mp4") as container:
        if lossless:
            stream = container.add_stream("libx264", rate=fps, options={"qp": "0", "preset": "ultrafast"})
        else:
            stream = container.add_stream("mpeg4", rate=fps, options={"qscale": "2", "g": "1"})
        stream.width, stream.height = frames[0].width, frames[0].height
        stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
        stream.thread_count = 1
        for im in frames:
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_jsonl(records: list[dict], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    os.replace(tmp, path)


def _blank(records: list[dict], out: Path) -> list[dict]:
    """The same records with every image replaced by one grey image and every video by grey frames."""
    grey = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BLANK_GREY)
    _save_png(grey, out / "images" / "blank.png")
    for t in range(NUM_FRAMES):
        _save_png(grey, out / "videos" / "blank" / f"{t:03d}.png")
    blank_path = {"image": "images/blank.png", "video": "videos/blank"}
    return [{k: blank_path.get(k, v) for k, v in rec.items()} for rec in records]


def _silent(records: list[dict], out: Path) -> list[dict]:
    """The same records with every sound replaced by silence of the same length."""
    voice.save_wav(voice.silence(), out / SILENT)
    return [{k: SILENT if k == "audio" else v for k, v in rec.items()} for rec in records]


def generate(
    out_dir: str | os.PathLike,
    seed: int = 0,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    *,
    sound_sizes: Mapping[str, tuple[int, int]] | None = None,
    blank_control: bool = True,
    video_files: bool = False,
    video_fraction: float = 0.3,
) -> dict[str, Any]:
    """Writes mini-EmoBench into `out_dir`; returns the card (also `card.json`) plus `out_dir` and `seconds`.

    Files: `train.jsonl`, `test.jsonl`, `test_blank.jsonl` (if `blank_control`), `images/<id>.png`, videos as
    frame directories `videos/<id>/<t>.png` (with `video_files`, every other video instead points to
    `videos/<id>.mp4`), `card.json`. `sizes`: task -> (train, test) record counts (missing tasks: none).
    `sound_sizes` (`SOUND_SIZES` gives the default job's): voice records per task, among `SOUND_SIZES`'
    tasks, as `audio/<id>.wav`, plus `test_silent.jsonl` and `audio/silent.wav`; None or empty: no sound.
    `out_dir` may be a URL (`gs://...`): drawn on local disk, then uploaded, `card.json` last.
    """
    if storage.is_remote(out_dir):
        with tempfile.TemporaryDirectory(prefix="emollm_jax-data-") as local:
            card = generate(local, seed, sizes, sound_sizes=sound_sizes, blank_control=blank_control,
                            video_files=video_files, video_fraction=video_fraction)
            for sub in ("images", "videos", "audio"):  # stale media from an earlier run must not survive
                storage.path(out_dir).joinpath(sub).rmtree(missing_ok=True)
            if not sound_sizes:
                storage.path(out_dir).joinpath("test_silent.jsonl").unlink(missing_ok=True)
            storage.copy_tree(local, out_dir, last="card.json")
        return {**card, "out_dir": os.fspath(out_dir)}
    start = time.perf_counter()
    out = Path(out_dir)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    sound_sizes = dict(sound_sizes or {})
    for name, given, known in (("sizes", sizes, DEFAULT_SIZES), ("sound_sizes", sound_sizes, SOUND_SIZES)):
        if set(given) - set(known):
            raise ValueError(f"{name}: unknown tasks {sorted(set(given) - set(known))}; "
                             f"expected among {list(known)}")
    for sub in ("images", "videos", "audio"):  # stale media from an earlier run must not survive
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    n_video = 0
    for t_idx, task in enumerate(DEFAULT_SIZES):
        for s_idx, split in enumerate(splits):
            n = sizes.get(task, (0, 0))[s_idx]
            rng = np.random.default_rng([seed, t_idx, s_idx])  # a stream per (task, split): sizes independent
            for rec, frames in _items(task, split, n, rng, video_fraction):
                if "video" in rec:
                    rec["video"] = f"videos/{rec['id']}"
                    for t, im in enumerate(frames):
                        _save_png(im, out / rec["video"] / f"{t:03d}.png")
                    if video_files and n_video % 2 == 0:
                        rec["video"] = f"videos/{rec['id']}.mp4"
                        save_mp4(frames, out / rec["video"])
                    n_video += 1
                else:
                    rec["image"] = f"images/{rec['id']}.png"
                    _save_png(frames[0], out / rec["image"])
                splits[split].append(rec)
            n = sound_sizes.get(task, (0, 0))[s_idx]
            rng = np.random.default_rng([seed, t_idx, s_idx, 1])  # voices: a stream of their own
            for rec, sound in _voice_items(task, split, n, rng):
                rec["audio"] = f"audio/{rec['id']}.wav"
                voice.save_wav(sound, out / rec["audio"])
                splits[split].append(rec)
    for split, recs in splits.items():
        _write_jsonl(recs, out / f"{split}.jsonl")
    if blank_control:
        _write_jsonl(_blank(splits["test"], out), out / "test_blank.jsonl")
    if sound_sizes:
        _write_jsonl(_silent(splits["test"], out), out / "test_silent.jsonl")
    else:  # a control of an earlier run's voices must not survive
        (out / "test_silent.jsonl").unlink(missing_ok=True)
    card = _card(seed, sizes, splits, blank_control, video_files, sound_sizes)
    tmp = out / "card.json.tmp"
    tmp.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "card.json")
    return {**card, "out_dir": str(out), "seconds": round(time.perf_counter() - start, 3)}


RULES = {
    "emo_c": "The face's brows, eyes and mouth (and tears) encode the emotion: "
             + "; ".join(f"{e}: {_describe(c)}" for e, c in CUES.items()) + ". The options are listed.",
    "emo_o": "Same cues, no options. About 30% are 4-frame videos: a neutral first frame, then the "
             "expression while the head drifts.",
    "intent": " ".join(INTENT_WHY.values()),
    "hate": "The caption insults a colour group (green or purple); hateful iff the depicted face has that "
            "colour; the expression is random. Every caption occurs equally often with both labels; 80% of "
            "captions insult green, so the face colour alone predicts 80% and the caption decides the rest.",
    "humor": "The caption describes sunny or rainy weather; humorous iff the picture shows the other weather "
             "(a playful mismatch). Every caption occurs equally often with both labels; 80% of captions "
             "are about sun, so the picture alone predicts 80% and the caption decides the rest.",
    "sarcasm": "The caption sounds positive or negative; sarcastic iff the face's emotion has the opposite "
               "valence (a smiling joy face vs a frowning, crying sadness face). Every caption occurs "
               "equally often with both labels; 80% of captions sound positive (as in real sarcasm data), "
               "so the face alone predicts 80% and the caption decides the rest.",
    "caption": "Objective: shapes named left to right with their colours ('a red circle and a blue square', "
               "'two green triangles'), or a face's brows, eyes and mouth described.",
    "vqa": "Objective: colour / shape / count / presence questions about one or two shapes.",
    "blank_control": "test_blank.jsonl holds the test records with every image replaced by images/blank.png "
                     "and every video by videos/blank/ (grey): the emotional tasks should drop to chance.",
}
SOUND_RULES = {
    "emo_c (voice)": "A 2 s utterance without words whose prosody encodes the emotion: "
                     + "; ".join(f"{e}: {voice.describe(e)}" for e in EMOTIONS) + ". The options are listed.",
    "sarcasm (voice)": "The words are in the text, the tone in the voice: sarcastic iff the voice's valence "
                       "(joy vs sadness, anger or disgust) is the opposite of the words'. Every sentence "
                       "occurs equally often with both labels; 80% sound positive, so the voice alone "
                       "predicts 80% and the words decide the rest.",
    "silent_control": f"test_silent.jsonl holds the test records with every sound replaced by {SILENT} "
                      "(silence): the voice records should drop to chance, the others stay.",
}


def _card(seed: int, sizes: dict, splits: dict[str, list[dict]], blank_control: bool,
          video_files: bool, sound_sizes: dict) -> dict:
    counts: dict[str, dict[str, dict[str, int]]] = {s: {t: {} for t in {**sizes, **sound_sizes}}
                                                     for s in splits}
    for split, recs in splits.items():
        for rec in recs:
            c = counts[split][rec["task"]]
            key = rec.get("label", "(free text)")
            c[key] = c.get(key, 0) + 1
    return {
        "name": "mini-EmoBench", "version": VERSION, "seed": seed, "image_size": IMAGE_SIZE,
        "num_frames": NUM_FRAMES, "sizes": {t: {"train": a, "test": b} for t, (a, b) in sizes.items()},
        "sound_sizes": {t: {"train": a, "test": b} for t, (a, b) in sound_sizes.items()},
        "silent_control": bool(sound_sizes),
        "label_counts": counts, "blank_control": blank_control, "video_files": video_files,
        "label_sets": {"emo_c": list(EMOTIONS), "emo_o": list(EMOTIONS), "intent": list(INTENTS),
                       "hate": list(YES_NO), "humor": list(YES_NO), "sarcasm": list(YES_NO)},
        "rules": {**RULES, **(SOUND_RULES if sound_sizes else {})},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.mini_emobench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blank-control", action=argparse.BooleanOptionalAction, default=True,
                        help="also write the blank-media control test_blank.jsonl (default: on)")
    parser.add_argument("--video-files", action="store_true", help="store every other video as an .mp4 file")
    parser.add_argument("--sound", action="store_true",
                        help="also write voice records (emo_c, sarcasm) and the silent-audio control")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every default split size")
    args = parser.parse_args(argv)
    sizes = {t: (round(a * args.scale), round(b * args.scale)) for t, (a, b) in DEFAULT_SIZES.items()}
    sound = {t: (round(a * args.scale), round(b * args.scale)) for t, (a, b) in SOUND_SIZES.items()}
    card = generate(args.out, args.seed, sizes, sound_sizes=sound if args.sound else None,
                    blank_control=args.blank_control, video_files=args.video_files)
    n = {s: sum(v[s] for part in ("sizes", "sound_sizes") for v in card[part].values())
         for s in ("train", "test")}
    print(f"mini-EmoBench: {n['train']} train and {n['test']} test records in {card['out_dir']} "
          f"({card['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
