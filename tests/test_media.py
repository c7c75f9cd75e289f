"""Media decoding and preprocessing: RGB conversion, LLaVA pad / CLIP crop (HF parity), video sampling."""

import io

import av
import numpy as np
import pytest
from PIL import Image

from data_pipeline.media import (
    CLIP_MEAN,
    CLIP_STD,
    MediaError,
    load_image,
    load_media,
    load_video,
    preprocess_image,
    sample_frame_indices,
)

# Measured max |ours - HF CLIPImageProcessorPil| over the shapes below: 4.8e-7 (both resize with PIL bicubic
# on uint8; the rest is float32 rounding). HF's torchvision backend (not installed here) resizes differently.
HF_PARITY_ATOL = 1e-5


def png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_converts_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(png_bytes(rgb))
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)
    np.testing.assert_array_equal(load_image(png_bytes(rgb)), rgb)

    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    out = load_image(png_bytes(gray))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[1, 1] = (0, 0, 255, 0)  # fully transparent blue -> white
    out = load_image(png_bytes(rgba))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)

    pal = Image.new("P", (3, 3))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 1), 1)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    out = load_image(buf.getvalue())
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (200, 100, 50)


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(MediaError, match="bad.png: cannot decode image"):
        load_image(bad)
    with pytest.raises(MediaError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(MediaError, match="<bytes>"):
        load_image(b"\x89PNG garbage")


def normalised(rgb):
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return (np.asarray(rgb, np.float32) / 255 - mean) / std


def test_pad_mode_pads_with_the_mean_colour():
    img = np.zeros((20, 40, 3), np.uint8)
    img[...] = (255, 0, 0)
    out = preprocess_image(img, 40, "pad")
    assert out.shape == (40, 40, 3) and out.dtype == np.float32
    pad_colour = normalised([int(255 * m) for m in CLIP_MEAN])
    np.testing.assert_allclose(out[:9], np.broadcast_to(pad_colour, (9, 40, 3)), atol=1e-6)  # top band
    np.testing.assert_allclose(out[-9:], np.broadcast_to(pad_colour, (9, 40, 3)), atol=1e-6)  # bottom band
    np.testing.assert_allclose(out[11:29], np.broadcast_to(normalised([255, 0, 0]), (18, 40, 3)), atol=1e-6)
    tall = preprocess_image(np.full((30, 10, 3), 255, np.uint8), 30, "pad")  # pads left / right
    np.testing.assert_allclose(tall[:, :9], np.broadcast_to(pad_colour, (30, 9, 3)), atol=1e-6)
    np.testing.assert_allclose(tall[:, 11:19], np.broadcast_to(normalised([255] * 3), (30, 8, 3)), atol=1e-6)


def test_crop_mode_keeps_the_centre():
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20] = (0, 0, 255)
    img[:, 20:40] = (0, 255, 0)
    img[:, 40:] = (255, 0, 0)
    out = preprocess_image(img, 20, "crop")  # no resize needed: shorter side is already 20
    assert out.shape == (20, 20, 3)
    np.testing.assert_allclose(out, np.broadcast_to(normalised([0, 255, 0]), (20, 20, 3)), atol=1e-6)
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        preprocess_image(img, 20, "squash")
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(img.astype(np.float32), 20)


@pytest.mark.parametrize("h, w, size", [(37, 53, 32), (300, 200, 224), (64, 64, 64), (61, 100, 64)])
def test_parity_with_hf_clip_image_processor(h, w, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(h * w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    hf = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ref = hf(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess_image(img, size, "crop"), ref, atol=HF_PARITY_ATOL, rtol=0)

    # LLaVA-1.5 "pad": expand2square with the mean colour, then the same CLIP processor.
    side = max(h, w)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in hf.image_mean))
    square.paste(Image.fromarray(img), ((side - w) // 2, (side - h) // 2))
    ref = hf(images=square, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess_image(img, size, "pad"), ref, atol=HF_PARITY_ATOL, rtol=0)


def test_sample_frame_indices():
    np.testing.assert_array_equal(sample_frame_indices(10, 4), [1, 3, 6, 8])
    np.testing.assert_array_equal(sample_frame_indices(4, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(sample_frame_indices(2, 4), [0, 0, 1, 1])
    for total in (8, 17, 100, 1001):
        idx = sample_frame_indices(total, 8)
        assert len(idx) == 8 and idx.min() >= 0 and idx.max() < total and np.all(np.diff(idx) > 0)
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


def write_mp4(path, values, size=32):
    """A grey clip whose frame i has intensity values[i]; high-quality mpeg4 keeps it within a few levels."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=8, options={"qscale": "2", "g": "1"})
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for v in values:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), v, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_load_video_from_mp4(tmp_path):
    values = [10 * i + 20 for i in range(12)]
    write_mp4(tmp_path / "clip.mp4", values)
    video = load_video(tmp_path / "clip.mp4", 4)
    assert video.shape == (4, 32, 32, 3) and video.dtype == np.uint8
    expected = np.asarray(values)[sample_frame_indices(12, 4)]  # frames 1, 4, 7, 10
    np.testing.assert_allclose(video.reshape(4, -1).mean(1), expected, atol=4)
    from_bytes = load_video((tmp_path / "clip.mp4").read_bytes(), 4)
    np.testing.assert_array_equal(from_bytes, video)
    with pytest.raises(MediaError, match="12 frames, fewer than the 13"):
        load_video(tmp_path / "clip.mp4", 13)
    (tmp_path / "bad.mp4").write_bytes(b"garbage" * 100)
    with pytest.raises(MediaError, match="bad.mp4: cannot decode video"):
        load_video(tmp_path / "bad.mp4", 4)


def test_load_video_from_frame_dir_and_list(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(d / f"{i:03d}.png")
    (d / "notes.txt").write_text("ignored")
    video = load_video(d, 3)  # centres of 3 segments of 6 frames: 1, 3, 5
    np.testing.assert_array_equal(video[:, 0, 0, 0], [30, 90, 150])
    files = sorted(d.glob("*.png"))
    np.testing.assert_array_equal(load_video(files, 3), video)
    np.testing.assert_array_equal(load_video([f.read_bytes() for f in files], 3), video)
    with pytest.raises(MediaError, match="6 frames, fewer than the 7"):
        load_video(d, 7)


def test_load_media_images_videos_bytes(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    img = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "img" / "a.png")
    frames_dir = tmp_path / "vid"
    frames_dir.mkdir()
    for i in range(5):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(frames_dir / f"{i}.png")
    kw = dict(image_size=16, num_frames=4, mode="pad")

    one = load_media({"id": "a", "image": "img/a.png"}, tmp_path, **kw)
    assert one.shape == (1, 16, 16, 3) and one.dtype == np.float32
    np.testing.assert_array_equal(one[0], preprocess_image(img, 16, "pad"))
    two = load_media({"id": "b", "image": ["img/a.png", "img/a.png"]}, tmp_path, **kw)
    assert two.shape == (2, 16, 16, 3)
    vid = load_media({"id": "c", "video": "vid"}, tmp_path, **kw)
    assert vid.shape == (4, 16, 16, 3)
    vid_list = load_media({"id": "c", "video": [f"vid/{i}.png" for i in range(5)]}, tmp_path, **kw)
    np.testing.assert_array_equal(vid_list, vid)

    embedded = {"id": "d", "image_bytes": (tmp_path / "img" / "a.png").read_bytes(), "image": "img/gone.png"}
    np.testing.assert_array_equal(load_media(embedded, tmp_path, **kw), one)  # bytes win over the path
    encoded = [(frames_dir / f"{i}.png").read_bytes() for i in range(5)]
    frames_bytes = {"id": "e", "video_frames_bytes": encoded}
    np.testing.assert_array_equal(load_media(frames_bytes, tmp_path, **kw), vid)
    write_mp4(tmp_path / "v.mp4", [0, 60, 120, 180, 240], size=16)
    from_file = load_media({"id": "f", "video": "v.mp4"}, tmp_path, **kw)
    from_bytes = load_media({"id": "f", "video_bytes": (tmp_path / "v.mp4").read_bytes()}, tmp_path, **kw)
    assert from_file.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(from_bytes, from_file)

    assert load_media({"id": "g"}, tmp_path, **kw).shape == (0, 16, 16, 3)
    with pytest.raises(MediaError, match="record h: .*outside the data root"):
        load_media({"id": "h", "image": "../x.png"}, tmp_path, **kw)
    with pytest.raises(MediaError, match="record i: .*gone.png: file not found"):
        load_media({"id": "i", "image": "img/gone.png"}, tmp_path, **kw)
