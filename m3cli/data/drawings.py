"""Scenes as a person draws them: other image sizes, larger shapes, any background colour.

The scenes of :mod:`m3cli.data.scenes` are 48 px renders with shapes of 7 or 13 px. A user's own picture is
usually larger (a 336 px canvas), drawn with smooth edges, and its shapes fill more of the frame. A
*drawing* is a scene (in the same 48-unit coordinates, so every question and answer of ``scenes`` applies
unchanged) rendered natively at ``size`` pixels:

* half of the drawings are ordinary scenes (``scenes.make_scene``) drawn at another size;
* the other half hold 1-4 larger shapes (9-25 units across) and, in ``COLOUR_BACKGROUND_RATE`` of them, a
  background in one of the shape colours (no shape or letter then has that colour).

Sizes run from 48 to 512 px (``SIZES``); half are antialiased. The model still sees 48 px: its image
processor resizes a drawing as it resizes any user image. Drawing ``index`` of a split is rebuilt from
``np.random.default_rng([SPLIT_SEEDS[split], DRAWING_STREAM, index])``, a stream apart from the scenes'.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from m3cli.data.scenes import (
    BACKGROUND_NAMES,
    BACKGROUNDS,
    COLOUR_NAMES,
    COLOURS,
    GLYPH_FONT_SIZE,
    GLYPH_RATE,
    GLYPH_STROKE,
    GLYPHS,
    IMAGE_SIZE,
    KINDS,
    MAX_TRIES,
    QUADRANTS,
    SPLIT_SEEDS,
    Glyph,
    Sample,
    Scene,
    Shape,
    describe_qa,
    make_scene,
    patch_labels,
    quadrant,
    questions,
)

DRAWING_STREAM = 1
SIZES: tuple[int, ...] = (48, 64, 96, 128, 224, 336, 512)
BIG_SIDES: tuple[int, ...] = tuple(range(9, 26, 2))  # odd, so no centre lies on a midline
MAX_BIG_SHAPES = 4
COLOUR_BACKGROUND_RATE = 0.3
SUPERSAMPLE = 4  # antialiased drawings are drawn this much larger, then reduced


@dataclass(frozen=True)
class Drawing:
    """A scene to be rendered at ``size`` x ``size`` pixels, antialiased when ``smooth``."""

    scene: Scene
    size: int
    smooth: bool


def colour_rgb(name: str) -> tuple[int, int, int]:
    """RGB of a background or shape colour name."""
    return BACKGROUNDS[name] if name in BACKGROUNDS else COLOURS[name]


def _clear(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + 1 <= b[0] or b[2] + 1 <= a[0] or a[3] + 1 <= b[1] or b[3] + 1 <= a[1]


def make_big_scene(rng: np.random.Generator) -> Scene:
    """1-4 shapes of 9-25 units, a letter with ``GLYPH_RATE``; the background sometimes a shape colour."""
    if rng.random() < COLOUR_BACKGROUND_RATE:
        background = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    else:
        background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    colours = [c for c in COLOUR_NAMES if c != background]
    boxes: list[tuple[int, int, int, int]] = []
    glyph = None
    if rng.random() < GLYPH_RATE:
        char = GLYPHS[int(rng.integers(len(GLYPHS)))]
        w, h = _glyph_box(char)
        x0, y0 = int(rng.integers(0, IMAGE_SIZE - w + 1)), int(rng.integers(0, IMAGE_SIZE - h + 1))
        glyph = Glyph(char, colours[int(rng.integers(len(colours)))], x0, y0, x0 + w, y0 + h)
        boxes.append((glyph.x0, glyph.y0, glyph.x1, glyph.y1))
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, MAX_BIG_SHAPES + 1))):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = colours[int(rng.integers(len(colours)))]
        side = BIG_SIDES[int(rng.integers(len(BIG_SIDES)))]
        for _ in range(MAX_TRIES):
            x0, y0 = int(rng.integers(0, IMAGE_SIZE - side + 1)), int(rng.integers(0, IMAGE_SIZE - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_clear(box, other) for other in boxes):
                boxes.append(box)
                shapes.append(Shape(kind, colour, "small" if side < 10 else "large", *box))
                break
    shapes.sort(key=lambda s: (QUADRANTS.index(quadrant(s)), s.y0 + s.y1, s.x0 + s.x1))
    return Scene(background, tuple(shapes), glyph)


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    return np.random.default_rng([SPLIT_SEEDS[split], DRAWING_STREAM, index])


def _draw_from(rng: np.random.Generator) -> Drawing:
    scene = make_scene(rng) if rng.random() < 0.5 else make_big_scene(rng)
    return Drawing(scene, SIZES[int(rng.integers(len(SIZES)))], bool(rng.random() < 0.5))


def drawing(split: str, index: int) -> Drawing:
    """Drawing ``index`` of ``split``, rebuilt deterministically."""
    return _draw_from(_rng(split, index))


def sample(split: str, index: int) -> Sample:
    """Drawing ``index`` of ``split`` as a :class:`~m3cli.data.scenes.Sample` (its scene, one question per
    family, the open question), for ``scenes.iter_questions(..., source=sample)``; render it with
    ``render(drawing(split, index))``."""
    rng = _rng(split, index)
    scene = _draw_from(rng).scene
    return Sample(split, index, scene, questions(scene, rng), describe_qa(scene, rng))


# --------------------------------------------------------------------------- rendering


def _font(px: float) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(1, round(px)))


def _glyph_box(char: str) -> tuple[int, int]:
    """(width, height) in scene units of the letter's ink, as the scenes draw it."""
    ink = _glyph_ink(char, 1.0)
    return ink.width, ink.height


def _glyph_ink(char: str, scale: float) -> Image.Image:
    """The letter's ink (mode L, tight box) drawn with the scenes' font at ``scale`` times its size."""
    size = GLYPH_FONT_SIZE * scale
    canvas = Image.new("L", (round(3 * size) + 8, round(3 * size) + 8), 0)
    ImageDraw.Draw(canvas).text((4, 0), char, fill=255, font=_font(size),
                                stroke_width=max(1, round(GLYPH_STROKE * scale)), stroke_fill=255)
    return canvas.crop(canvas.getbbox())


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, k: float) -> None:
    """One shape, its box scaled by ``k`` pixels per scene unit."""
    x0, y0 = round(shape.x0 * k), round(shape.y0 * k)
    x1, y1 = round(shape.x1 * k) - 1, round(shape.y1 * k) - 1  # inclusive corners
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape.kind == "cross":
        half = max(0.5, 0.2 * (x1 - x0 + 1))  # arms ~40% of the side, as the scenes' 3/7 and 5/13
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.rectangle((round(cx - half), y0, round(cx + half) - 1, y1), fill=fill)
        draw.rectangle((x0, round(cy - half), x1, round(cy + half) - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def render(item: Drawing) -> Image.Image:
    """The drawing as an RGB image of ``item.size`` pixels a side."""
    factor = SUPERSAMPLE if item.smooth else 1
    side = item.size * factor
    k = side / IMAGE_SIZE
    img = Image.new("RGB", (side, side), colour_rgb(item.scene.background))
    draw = ImageDraw.Draw(img)
    for shape in item.scene.shapes:
        _draw(draw, shape, k)
    g = item.scene.glyph
    if g is not None:
        box = (round(g.x0 * k), round(g.y0 * k), round(g.x1 * k), round(g.y1 * k))
        ink = _glyph_ink(g.char, k).resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR)
        img.paste(Image.new("RGB", ink.size, COLOURS[g.colour]), box[:2], ink)
    if factor != 1:
        img = img.resize((item.size, item.size), Image.Resampling.BOX)
    return img


def drawing_labels(scene: Scene) -> dict[str, np.ndarray]:
    """``scenes.patch_labels`` of the scene's 48-unit layout; the background label is 0 (none) where the
    background is a shape colour, which the background classes do not name."""
    if scene.background in BACKGROUNDS:
        return patch_labels(scene)
    labels = patch_labels(replace(scene, background=BACKGROUND_NAMES[0]))
    labels["background"] = np.zeros_like(labels["background"])
    return labels
