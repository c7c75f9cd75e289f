"""mini-EmoBench's pictures: faces, weather scenes and shapes drawn with PIL at 64x64.

Each function draws one scene from its description (a face's cues, a weather kind, a list of shapes) and an
rng for small jitter; which scene goes with which label is `data_pipeline.mini_emobench`'s business. Parts
are large so that one 16x16 patch row shows each cue.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
INK = (20, 20, 20)
SKIN = ((255, 222, 180), (240, 195, 130), (225, 170, 110), (200, 140, 90), (170, 110, 70))
BACKGROUNDS = ((170, 200, 230), (200, 230, 190), (230, 210, 170), (215, 190, 225), (190, 190, 190))
SHAPE_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
}
SHAPES = ("circle", "square", "triangle")


def _jit(rng: np.random.Generator, k: int = 2) -> int:
    return int(rng.integers(-k, k + 1))


def draw_face(cues: tuple[str, str, str, bool], *, skin: tuple[int, int, int],
              background: tuple[int, int, int], rng: np.random.Generator, held: str | None = None,
              night: bool = False, shift: tuple[int, int] = (0, 0)) -> Image.Image:
    """A 64x64 face filling the image; `cues` = (brows, eyes, mouth, tears), the part names that
    `mini_emobench.CUE_WORDS` describes. `held`: "apple" | "ball" | None; `night`: dark sky and a moon."""
    brows, eyes, mouth, tears = cues
    dx, dy = shift[0] + _jit(rng, 1), shift[1] + _jit(rng, 1)
    bg = (25, 25, 70) if night else background
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(im)
    if night:  # a moon in the top-right corner
        d.ellipse((50, 1, 62, 13), fill=(250, 240, 150))
        d.ellipse((46, 0, 57, 10), fill=bg)
    d.ellipse((3 + dx, 2 + dy, 60 + dx, 63 + dy), fill=skin, outline=INK, width=2)

    def p(x: float, y: float) -> tuple[float, float]:
        return (x + dx, y + dy)

    brow_lines = {
        "level": ((12, 16, 27, 16), (37, 16, 52, 16)),
        "inner-raised": ((12, 19, 27, 11), (37, 11, 52, 19)),
        "inner-lowered": ((12, 11, 27, 19), (37, 19, 52, 11)),
        "low": ((12, 20, 27, 20), (37, 20, 52, 20)),
    }
    if brows == "high-arched":
        for x0 in (11, 36):
            d.arc((*p(x0, 6), *p(x0 + 17, 20)), 200, 340, fill=INK, width=4)
    else:
        for x0, y0, x1, y1 in brow_lines[brows]:
            d.line((*p(x0, y0), *p(x1, y1)), fill=INK, width=4)
    for cx in (20, 44):
        if eyes == "round":
            d.ellipse((*p(cx - 4, 22), *p(cx + 4, 30)), fill=INK)
        elif eyes == "wide":
            d.ellipse((*p(cx - 7, 19), *p(cx + 7, 33)), fill=(255, 255, 255), outline=INK, width=2)
            d.ellipse((*p(cx - 3, 23), *p(cx + 3, 29)), fill=INK)
        elif eyes == "narrow":
            d.line((*p(cx - 6, 26), *p(cx + 6, 26)), fill=INK, width=3)
        elif eyes == "closed":
            d.arc((*p(cx - 6, 20), *p(cx + 6, 30)), 20, 160, fill=INK, width=3)
    if tears:
        d.ellipse((*p(14, 32), *p(20, 42)), fill=(40, 110, 255))
        d.ellipse((*p(44, 32), *p(50, 42)), fill=(40, 110, 255))
    if mouth == "smile":
        d.arc((*p(16, 28), *p(48, 54)), 15, 165, fill=INK, width=5)
    elif mouth == "frown":
        d.arc((*p(16, 44), *p(48, 66)), 200, 340, fill=INK, width=5)
    elif mouth == "flat":
        d.line((*p(18, 48), *p(46, 48)), fill=INK, width=6)
    elif mouth == "thin":
        d.line((*p(22, 48), *p(42, 48)), fill=INK, width=2)
    elif mouth == "small-open":
        d.ellipse((*p(26, 42), *p(38, 54)), fill=INK)
    elif mouth == "big-open":
        d.ellipse((*p(20, 37), *p(44, 59)), fill=INK)
    elif mouth == "wavy":
        d.line([p(16, 48), p(22, 43), p(28, 51), p(34, 43), p(40, 51), p(47, 45)], fill=INK, width=4)
    if held == "apple":
        d.ellipse((42, 42, 63, 63), fill=(215, 30, 30), outline=INK, width=1)
        d.line((52, 36, 53, 44), fill=(100, 60, 20), width=3)
        d.ellipse((54, 35, 61, 41), fill=(40, 170, 40))
    elif held == "ball":
        d.ellipse((41, 41, 63, 63), fill=(250, 250, 250), outline=INK, width=2)
        d.line((41, 52, 63, 52), fill=(30, 60, 230), width=5)
    return im


def draw_weather(kind: str, rng: np.random.Generator) -> Image.Image:
    """Sky over ground: a sun and blue sky, or a dark cloud with rain."""
    sky = {"sunny": (110, 180, 250), "rainy": (90, 95, 110)}[kind]
    ground = {"sunny": (90, 180, 70), "rainy": (70, 110, 60)}[kind]
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), sky)
    d = ImageDraw.Draw(im)
    d.rectangle((0, 46, 63, 63), fill=ground)
    dx = _jit(rng, 4)
    if kind == "sunny":
        d.ellipse((20 + dx, 6, 44 + dx, 30), fill=(255, 220, 0))
    else:
        for box in ((6, 8, 30, 26), (20, 3, 46, 25), (36, 9, 60, 27)):
            d.ellipse((box[0] + dx, box[1], box[2] + dx, box[3]), fill=(50, 50, 60))
        for i in range(7):
            x, y = 6 + 8 * i + int(rng.integers(0, 4)), 30 + int(rng.integers(0, 8))
            d.line((x, y, x - 3, y + 10), fill=(30, 70, 255), width=2)
    return im


def draw_shapes(items: list[tuple[str, str]], rng: np.random.Generator) -> Image.Image:
    """One big shape in the centre or two side by side (left to right = the order of `items`)."""
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    d = ImageDraw.Draw(im)
    half = 18 if len(items) == 1 else 13
    centres = [(32, 32)] if len(items) == 1 else [(16, 32), (48, 32)]
    for (colour, shape), (cx, cy) in zip(items, centres, strict=True):
        cx, cy, r = cx + _jit(rng), cy + _jit(rng, 6), half + _jit(rng, 1)
        fill = SHAPE_COLOURS[colour]
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im
