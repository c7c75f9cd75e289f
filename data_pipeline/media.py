"""Image and video decoding, LLaVA/CLIP preprocessing, uniform frame sampling and media file checks.

Everything returns numpy (NHWC); nothing here touches JAX, so it runs in Grain worker processes.

Media sources of a record, in order of precedence (see `data_pipeline.records` for the schema):
- `image_bytes: bytes`: one encoded image (PNG/JPEG/...), as stored in ArrayRecord;
- `video_frames_bytes: list[bytes]`: the encoded frames of one video (already sampled or not: `num_frames`
  are sampled uniformly from them);
- `video_bytes: bytes`: one encoded video container (mp4/webm);
- `image`: a path or a list of paths (several images, one `<image>` marker each);
- `video`: a video file, a directory of frame images (sorted by name), or a list of frame paths.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline import storage
from data_pipeline.paths import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_SUFFIXES,
    frame_files,
    media_paths,
    resolve_media_path,
)

# OpenAI CLIP normalisation constants (the values in transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview


class MediaError(ValueError):
    """A media file or blob that cannot be decoded; the message names the file (or `<bytes>`)."""


def _name(src: Any) -> str:
    return "<bytes>" if isinstance(src, bytes | bytearray | memoryview) else str(src)


def load_image(src: ImageSource, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decodes an image file or encoded bytes to `uint8[H, W, 3]`.

    Palette, grayscale and CMYK images are converted to RGB; transparency is composited onto white (what
    transformers' `convert_to_rgb` does, so results match the HF processors). An image of more than
    `max_pixels` pixels (None: no limit) is a `MediaError` naming it, checked from the header before decoding.
    An image at a URL (`gs://...`) is read whole and decoded from memory.
    """
    name = _name(src)
    try:
        src = storage.as_readable(src)
        fp = io.BytesIO(bytes(src)) if isinstance(src, bytes | bytearray | memoryview) else src
        with Image.open(fp) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise MediaError(f"{name}: {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                 "(max_image_pixels)")
            im.load()
            has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
            if has_alpha:
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im.convert("RGBA"))
            rgb = im.convert("RGB")
    except MediaError:
        raise
    except FileNotFoundError as e:
        raise MediaError(f"{name}: file not found") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for corrupt data
        raise MediaError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    return np.asarray(rgb, dtype=np.uint8)


def preprocess_image(
    img: np.ndarray,
    size: int,
    mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """`uint8[H, W, 3]` -> normalised `float32[size, size, 3]` (CLIP's mean and std unless given).

    mode="pad": LLaVA-1.5's `image_aspect_ratio="pad"`: pad to a square with the mean colour
      (`int(255 * mean)`), centred, then bicubic resize to `size` x `size`.
    mode="crop": CLIP's processor: bicubic resize so the shorter side is `size` (longer side
      `int(size * long / short)`), then a centre crop of `size` x `size`.
    mode="resize": SigLIP's processor: bicubic resize straight to `size` x `size` (the aspect ratio is not
      kept).
    Then `(x / 255 - mean) / std`.
    """
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected uint8[H, W, 3], got {img.dtype}{list(img.shape)}")
    pil = Image.fromarray(img)
    w, h = pil.size
    if mode == "pad":
        if w != h:
            side = max(w, h)
            fill = tuple(int(255 * m) for m in mean)
            square = Image.new("RGB", (side, side), fill)
            square.paste(pil, ((side - w) // 2, (side - h) // 2))
            pil = square
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    elif mode == "crop":
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        if (new_w, new_h) != (w, h):
            pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
    elif mode == "resize":
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    else:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected 'pad', 'crop' or 'resize'")
    # (x / 255 - mean) / std as one scale and one shift, in place: two passes over the pixels instead of four
    std32 = np.asarray(std, np.float32)
    out = np.multiply(np.asarray(pil), np.float32(1.0 / 255.0) / std32, dtype=np.float32)
    out -= np.asarray(mean, np.float32) / std32
    return out


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """`int64[num_frames]`: the centre frame of each of `num_frames` equal segments of a `total`-frame clip.

    E.g. total=10, num_frames=4 -> [1, 3, 6, 8]; total == num_frames -> every frame. When total < num_frames
    frames repeat (callers that must not repeat check the count first).
    """
    if total < 1 or num_frames < 1:
        raise ValueError(f"need total >= 1 and num_frames >= 1, got total={total}, num_frames={num_frames}")
    idx = ((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64)
    return np.minimum(idx, total - 1)


def count_video_frames(src: str | os.PathLike | bytes) -> int:
    """Number of frames in a video container (header count, or a full decode when the header has none)."""
    import av

    src = storage.as_readable(src)
    with av.open(io.BytesIO(src) if isinstance(src, bytes | bytearray) else str(src)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def _decode_video(src: str | os.PathLike | bytes, num_frames: int) -> np.ndarray:
    import av

    name = _name(src)
    try:
        src = storage.as_readable(src)  # a URL: the container's bytes, decoded from memory
        with av.open(io.BytesIO(src) if isinstance(src, bytes | bytearray) else str(src)) as container:
            if not container.streams.video:
                raise MediaError(f"{name}: no video stream")
            stream = container.streams.video[0]
            total = int(stream.frames)
            if total >= num_frames:  # header count known: decode sequentially, keep only the sampled frames
                wanted = sample_frame_indices(total, num_frames)
                picked: dict[int, np.ndarray] = {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        picked[i] = frame.to_ndarray(format="rgb24")
                    if i >= wanted[-1]:
                        break
                if len(picked) == len(set(wanted.tolist())):
                    return np.stack([picked[i] for i in wanted.tolist()])
                container.seek(0)  # header lied about the length: fall back to a full decode
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except MediaError:
        raise
    except FileNotFoundError as e:
        raise MediaError(f"{name}: file not found") from e
    except Exception as e:  # av.error.InvalidDataError and friends
        raise MediaError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from e
    if len(frames) < num_frames:
        raise MediaError(f"{name}: has {len(frames)} frames, fewer than the {num_frames} asked for")
    return np.stack([frames[i] for i in sample_frame_indices(len(frames), num_frames)])


def _frames_from_sources(sources: Sequence[ImageSource], num_frames: int, name: str,
                         max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    if len(sources) < num_frames:
        raise MediaError(f"{name}: has {len(sources)} frames, fewer than the {num_frames} asked for")
    frames = [load_image(sources[i], max_pixels) for i in sample_frame_indices(len(sources), num_frames)]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise MediaError(f"{name}: frames differ in size: {sorted(shapes)}")
    return np.stack(frames)


def load_video(src: str | os.PathLike | Sequence[ImageSource] | bytes, num_frames: int, *,
               data_root: str | os.PathLike | None = None,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """`uint8[num_frames, H, W, 3]` uniformly sampled (`sample_frame_indices`) from a video.

    `src`: a video file (mp4/webm/... via PyAV), encoded container bytes, a directory of frame images, or a
    list of frame paths / encoded frames. Fewer frames than `num_frames` is an error (as in validation). With
    `data_root`, every frame of a directory must resolve inside it (`paths.frame_files`).
    """
    if isinstance(src, bytes | bytearray):
        return _decode_video(bytes(src), num_frames)
    if isinstance(src, str | os.PathLike):
        path = storage.path(src)
        if path.is_dir():
            files = frame_files(path, data_root)
            if not files:
                raise MediaError(f"{path}: frame directory holds no image files")
            return _frames_from_sources(files, num_frames, str(path), max_pixels)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return _frames_from_sources([path], num_frames, str(path), max_pixels)
        return _decode_video(path, num_frames)
    return _frames_from_sources(list(src), num_frames, "<frame list>", max_pixels)


def load_media(
    record: Mapping[str, Any],
    data_root: str | os.PathLike | None,
    *,
    image_size: int,
    num_frames: int,
    mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """All frames of a record's media, each through `preprocess_image(frame, image_size, mode, mean, std)`:
    `float32[F, image_size, image_size, 3]`.

    F = number of images (1 per image) or `num_frames` for a video; F = 0 for a text-only record.
    Frame-to-media grouping is `records.media_layout(record, num_frames)`. Embedded bytes take precedence
    over paths; paths, and the frames of a frame directory, are resolved under `data_root` and may not leave
    it. An image or frame over `max_pixels` pixels is an error.
    """
    def prep(frames: list[np.ndarray] | np.ndarray) -> np.ndarray:
        if len(frames) == 0:
            return np.zeros((0, image_size, image_size, 3), np.float32)
        return np.stack([preprocess_image(f, image_size, mode, mean, std) for f in frames])

    rid = record.get("id", "<no id>")
    root = data_root if data_root is not None else "."
    try:
        if record.get("image_bytes") is not None:
            return prep([load_image(record["image_bytes"], max_pixels)])
        if record.get("video_frames_bytes") is not None:
            return prep(_frames_from_sources(record["video_frames_bytes"], num_frames, "video_frames_bytes",
                                             max_pixels))
        if record.get("video_bytes") is not None:
            return prep(load_video(bytes(record["video_bytes"]), num_frames))
        image, video = record.get("image"), record.get("video")
        if image is not None:
            paths = [image] if isinstance(image, str) else list(image)
            return prep([load_image(resolve_media_path(p, root), max_pixels) for p in paths])
        if video is not None:
            if isinstance(video, str):
                return prep(load_video(resolve_media_path(video, root), num_frames, data_root=root,
                                       max_pixels=max_pixels))
            return prep(load_video([resolve_media_path(p, root) for p in video], num_frames,
                                   max_pixels=max_pixels))
    except (MediaError, ValueError) as e:
        raise MediaError(f"record {rid}: {e}") from e
    return prep([])


# ----------------------------------------------------------------------------------------------------------
# File checks (record validation with `check_media`): the verdict training would reach on the file


def image_problem(path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """Why the image file at `path` cannot be used (missing, empty, over `max_pixels`, not decodable), or None
    if it is fine. The image is decoded completely, as training decodes it: a truncated JPEG fails here."""
    if not path.is_file():
        return "file not found"
    if storage.size(path) == 0:
        return "empty file (0 bytes)"
    try:
        load_image(path, max_pixels)
    except MediaError as e:
        cause = e.__cause__
        if cause is None:  # over the pixel limit
            return str(e).removeprefix(f"{path}: ")
        return f"unreadable image ({type(cause).__name__}: {cause})"
    return None


def video_problem(path: Path, num_frames: int | None, data_root: str | os.PathLike | None = None,
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """Why the video at `path` cannot give `num_frames` frames, or None if it can.

    `path` is a video container, a directory of frame images, or one image file (checked as an image).
    Containers are opened with PyAV and their frames counted (`count_video_frames`); every frame of a
    directory must resolve inside `data_root` and decode.
    """
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return image_problem(path, max_pixels)
    if path.is_dir():
        try:
            frames = frame_files(path, data_root)
        except ValueError as e:
            return str(e)
        total = len(frames)
        if not total:
            return "frame directory holds no image files"
        for frame in frames:
            problem = image_problem(frame, max_pixels)
            if problem:
                return f"frame {frame.name}: {problem}"
    elif not path.is_file():
        return "file not found"
    elif storage.size(path) == 0:
        return "empty file (0 bytes)"
    else:
        try:
            total = count_video_frames(path)
        except Exception as e:  # PyAV raises av.error.* subclasses for corrupt containers
            return f"unreadable video ({type(e).__name__}: {e})"
    if num_frames is not None and total < num_frames:
        return f"has {total} frames, fewer than the {num_frames} frames asked for"
    return None


# ----------------------------------------------------------------------------------------------------------
# Media files as bytes (ArrayRecord / TFDS conversion)

# media_kind: how `media` decodes back into record fields
KIND_FIELD = {"image": "image_bytes", "frames": "video_frames_bytes", "video": "video_bytes"}


def read_media_bytes(record: dict[str, Any], data_root: str | os.PathLike) -> tuple[str, list[bytes]]:
    """A record's media as encoded files: ("image", [png]), ("frames", [png, ...]), ("video", [mp4]) or
    ("", []). Frame directories are listed with `paths.frame_files` (sorted by name), every frame resolved
    inside `data_root`, so no file outside the root is copied into a shard."""
    kind, paths = media_paths(record)
    if kind is None:
        return "", []
    files = [resolve_media_path(p, data_root) for p in paths]
    if kind == "image":
        if len(files) != 1:
            raise ValueError(f"record {record.get('id')}: {len(files)} images; an embedded record holds one")
        return "image", [files[0].read_bytes()]
    if len(files) == 1 and files[0].is_dir():
        files = frame_files(files[0], data_root)
    elif len(files) == 1:
        return "video", [files[0].read_bytes()]
    return "frames", [f.read_bytes() for f in files]
