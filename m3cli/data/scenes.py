"""Deterministic synthetic scenes with question/answer pairs and dense patch labels.

Each scene is a 48x48 RGB image (a 24x24 grid of 2x2-pixel patches) showing a plain background, 1-6
non-overlapping coloured shapes and, in about 40% of scenes, one capital letter.  Every item of a split
is regenerated from ``np.random.default_rng([SPLIT_SEEDS[split], index])``, so any sample can be rebuilt on
its own and the test split is never seen during training.

Besides the one-word families (``FAMILIES``) every scene has an open question, the ``describe`` family
("what is this?", "describe the image.", ...), answered with :func:`description`. Its phrasing is drawn
from the same generator after every other draw, so adding it left the other families' questions as they were.

Pixel boxes are half-open: a shape occupies columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 48
GRID = 24

# Background and shape palettes are disjoint and all colours are far apart in RGB.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "brown": (110, 62, 20),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (30, 185, 45),
    "blue": (35, 85, 245),
    "yellow": (245, 235, 40),
    "purple": (160, 45, 210),
    "orange": (255, 125, 0),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, int] = {"small": 7, "large": 13}  # side of the bounding box in pixels (odd: centred)
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
GLYPHS: tuple[str, ...] = ("A", "E", "H", "L", "M", "T", "U", "X")
GLYPH_FONT_SIZE = 14  # bundled Aileron font with a 1 px stroke: capitals are 12 px tall
GLYPH_STROKE = 1
GLYPH_RATE = 0.4
MAX_SHAPES = 6
MARGIN = 1  # empty pixels required between any two objects' boxes
MAX_TRIES = 200  # placement attempts per shape before it is dropped
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")

FAMILIES: tuple[str, ...] = ("background", "exists", "count", "corner", "colour_of", "letter")
TEMPLATES: dict[str, str] = {
    "background": "what colour is the background?",
    "exists": "is there {article} {colour} shape?",
    "count": "how many shapes are there?",
    "corner": "what shape is in the {quadrant}?",
    "colour_of": "what colour is the {kind}?",
    "letter": "what letter is written?",
}
SPLIT_SEEDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# The open question: any of these phrasings (lower-case or capitalised) asks for the scene's description.
DESCRIBE = "describe"
DESCRIBE_QUESTIONS: tuple[str, ...] = (
    "what is this?",
    "what is in the picture?",
    "describe the image.",
    "what do you see?",
    "what is in this image?",
    "what is in the image?",
    "describe this image.",
    "describe the picture.",
    "what can you see?",
    "what does the image show?",
    "describe the scene.",
    "what is shown?",
)
EVAL_FAMILIES: tuple[str, ...] = (*FAMILIES, DESCRIBE)  # what the built-in evaluation can ask
DESCRIPTION_MAX_WORDS = 2 + 2 * (MAX_SHAPES + 1)  # background, six shapes and a letter: one token each

# Names of the values of each dense label map (value i means LABEL_NAMES[key][i]; 0 = nothing there).
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "kind": ("none", *KINDS, "letter"),
    "colour": ("none", *COLOUR_NAMES),
    "size": ("none", *SIZE_NAMES),
    "glyph": ("none", *(c.lower() for c in GLYPHS)),
    "background": ("none", *BACKGROUND_NAMES),
}
GLYPH_KIND = len(KINDS) + 1  # value of the 'kind' label map on letter pixels

_WORD_RE = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Shape:
    """One filled shape; (x0, y0, x1, y1) is its half-open pixel box."""

    kind: str
    colour: str
    size: str
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the box in pixel coordinates (never on the image midlines: sides are odd)."""
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2


@dataclass(frozen=True)
class Glyph:
    """A capital letter; (x0, y0, x1, y1) is the half-open box of its rendered ink."""

    char: str
    colour: str
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class Scene:
    """A background colour, the shapes (ordered by quadrant, then position) and an optional letter."""

    background: str
    shapes: tuple[Shape, ...]
    glyph: Glyph | None


@dataclass(frozen=True)
class QA:
    """One question of a family with its one-word answer."""

    family: str
    question: str
    answer: str


@dataclass(frozen=True)
class Sample:
    """Item ``index`` of a split: the scene, one question per applicable one-word family (``qas``) and its
    open ``describe`` question."""

    split: str
    index: int
    scene: Scene
    qas: tuple[QA, ...]
    describe: QA | None = None


def split_words(text: str) -> list[str]:
    """Lower-case words of a question, answer or caption (punctuation dropped)."""
    return _WORD_RE.findall(text.lower())


# --------------------------------------------------------------------------- geometry


@cache
def _glyph_mask(char: str) -> np.ndarray:
    """Antialiased ink mask (uint8, tight box) of ``char`` in the bundled Pillow font."""
    font = ImageFont.load_default(size=GLYPH_FONT_SIZE)
    canvas = Image.new("L", (2 * GLYPH_FONT_SIZE, 2 * GLYPH_FONT_SIZE), 0)
    ImageDraw.Draw(canvas).text((4, 0), char, fill=255, font=font, stroke_width=GLYPH_STROKE, stroke_fill=255)
    arr = np.asarray(canvas)
    rows = np.flatnonzero(arr.max(axis=1))
    cols = np.flatnonzero(arr.max(axis=0))
    mask = arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()
    mask.setflags(write=False)
    return mask


def _boxes_clear(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = MARGIN) -> bool:
    """True when boxes a and b are separated by at least ``margin`` empty pixels."""
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _box(obj: Shape | Glyph) -> tuple[int, int, int, int]:
    return obj.x0, obj.y0, obj.x1, obj.y1


def quadrant(shape: Shape, size: int = IMAGE_SIZE) -> str:
    """Quadrant word ('top left', ...) that contains the shape's centre."""
    cx, cy = shape.centre
    vert = "top" if cy < size / 2 else "bottom"
    horiz = "left" if cx < size / 2 else "right"
    return f"{vert} {horiz}"


def make_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: background, 1-6 non-overlapping shapes, a letter with probability 0.4."""
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUNDS)))]
    n_shapes = int(rng.integers(1, MAX_SHAPES + 1))
    boxes: list[tuple[int, int, int, int]] = []
    glyph = None
    if rng.random() < GLYPH_RATE:
        char = GLYPHS[int(rng.integers(len(GLYPHS)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOURS)))]
        h, w = _glyph_mask(char).shape
        x0 = int(rng.integers(0, IMAGE_SIZE - w + 1))
        y0 = int(rng.integers(0, IMAGE_SIZE - h + 1))
        glyph = Glyph(char, colour, x0, y0, x0 + w, y0 + h)
        boxes.append(_box(glyph))
    specs = [
        (
            KINDS[int(rng.integers(len(KINDS)))],
            COLOUR_NAMES[int(rng.integers(len(COLOURS)))],
            SIZE_NAMES[int(rng.integers(len(SIZES)))],
        )
        for _ in range(n_shapes)
    ]
    specs.sort(key=lambda s: -SIZES[s[2]])  # place large shapes first: fewer failed placements
    shapes: list[Shape] = []
    for kind, colour, size in specs:
        side = SIZES[size]
        for _ in range(MAX_TRIES):
            x0 = int(rng.integers(0, IMAGE_SIZE - side + 1))
            y0 = int(rng.integers(0, IMAGE_SIZE - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_boxes_clear(box, other) for other in boxes):
                boxes.append(box)
                shapes.append(Shape(kind, colour, size, *box))
                break
    shapes.sort(key=lambda s: (QUADRANTS.index(quadrant(s)), s.y0 + s.y1, s.x0 + s.x1))
    return Scene(background, tuple(shapes), glyph)


# --------------------------------------------------------------------------- rendering


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: int | tuple[int, int, int]) -> None:
    """Draw one shape (no antialiasing) with the same calls for the image and the label map."""
    x0, y0, x1, y1 = shape.x0, shape.y0, shape.x1 - 1, shape.y1 - 1  # inclusive corners
    side = shape.x1 - shape.x0
    cx, cy = x0 + side // 2, y0 + side // 2
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape.kind == "cross":
        half = 1 if side < 10 else 2  # arm thickness 3 or 5 px
        draw.rectangle((cx - half, y0, cx + half, y1), fill=fill)
        draw.rectangle((x0, cy - half, x1, cy + half), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def object_map(scene: Scene) -> np.ndarray:
    """[IMAGE_SIZE, IMAGE_SIZE] int64 map: 0 background, i+1 pixels of shape i, len(shapes)+1 glyph ink.

    Glyph ink is the antialiased font mask thresholded at 128 (pixels at least half letter colour).
    """
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for i, shape in enumerate(scene.shapes):
        _draw_shape(draw, shape, i + 1)
    out = np.asarray(canvas).astype(np.int64)
    if scene.glyph is not None:
        g = scene.glyph
        ink = _glyph_mask(g.char) >= 128
        out[g.y0 : g.y1, g.x0 : g.x1][ink] = len(scene.shapes) + 1
    return out


def _resize_index(size: int) -> np.ndarray:
    """Nearest-neighbour source rows/columns for an image of ``size`` pixels."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    return (np.arange(size) * IMAGE_SIZE) // size


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render the scene as an RGB image (drawn at 48x48, nearest-neighbour resized to ``size``)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        _draw_shape(draw, shape, COLOURS[shape.colour])
    arr = np.asarray(img).copy()
    if scene.glyph is not None:
        g = scene.glyph
        alpha = _glyph_mask(g.char).astype(np.int32)[..., None]
        region = arr[g.y0 : g.y1, g.x0 : g.x1].astype(np.int32)
        colour = np.array(COLOURS[g.colour], dtype=np.int32)
        blended = (region * (255 - alpha) + colour * alpha + 127) // 255
        arr[g.y0 : g.y1, g.x0 : g.x1] = blended.astype(np.uint8)
    if size != IMAGE_SIZE:
        idx = _resize_index(size)
        arr = arr[idx][:, idx]
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def patch_labels(scene: Scene, grid: int = GRID, size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """Dense [grid, grid] int64 labels per patch (value meanings in ``LABEL_NAMES``, 0 = nothing there).

    A patch takes the labels of the object (shape or letter) covering the most of its pixels, provided it
    covers at least half of them; otherwise it is 0.  Keys: 'kind' (letters are ``GLYPH_KIND``), 'colour',
    'size' (letters 0), 'glyph' (letter pixels only) and 'background' (every patch, 1-based).
    """
    if size % grid:
        raise ValueError(f"size {size} is not a multiple of grid {grid}")
    idx = _resize_index(size)
    objects = object_map(scene)[idx][:, idx]
    p = size // grid
    n_obj = len(scene.shapes) + 2  # background, shapes, glyph
    onehot = np.eye(n_obj, dtype=np.int64)[objects]  # [size, size, n_obj]
    counts = onehot.reshape(grid, p, grid, p, n_obj).sum(axis=(1, 3))
    counts[..., 0] = 0
    best = counts.argmax(axis=-1)
    best_count = np.take_along_axis(counts, best[..., None], axis=-1)[..., 0]
    best = np.where(2 * best_count >= p * p, best, 0)

    def lookup(values: Sequence[int], glyph_value: int) -> np.ndarray:
        table = np.array([0, *values, glyph_value], dtype=np.int64)
        return table[best]

    g = scene.glyph
    return {
        "kind": lookup([KINDS.index(s.kind) + 1 for s in scene.shapes], GLYPH_KIND),
        "colour": lookup(
            [COLOUR_NAMES.index(s.colour) + 1 for s in scene.shapes],
            COLOUR_NAMES.index(g.colour) + 1 if g else 0,
        ),
        "size": lookup([SIZE_NAMES.index(s.size) + 1 for s in scene.shapes], 0),
        "glyph": lookup([0] * len(scene.shapes), GLYPHS.index(g.char) + 1 if g else 0),
        "background": np.full((grid, grid), BACKGROUND_NAMES.index(scene.background) + 1, dtype=np.int64),
    }


# --------------------------------------------------------------------------- language


def _unique_by(scene: Scene, key) -> dict[str, Shape]:
    """Map key(shape) -> shape for the keys that exactly one shape has."""
    groups: dict[str, list[Shape]] = {}
    for s in scene.shapes:
        groups.setdefault(key(s), []).append(s)
    return {k: v[0] for k, v in groups.items() if len(v) == 1}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def questions(scene: Scene, rng: np.random.Generator) -> tuple[QA, ...]:
    """One question per applicable family, in ``FAMILIES`` order."""
    qas = [QA("background", TEMPLATES["background"], scene.background)]

    present = sorted({s.colour for s in scene.shapes}, key=COLOUR_NAMES.index)
    absent = [c for c in COLOUR_NAMES if c not in present]
    ask_present = rng.random() < 0.5
    if (ask_present and present) or not absent:
        colour, answer = present[int(rng.integers(len(present)))], "yes"
    else:
        colour, answer = absent[int(rng.integers(len(absent)))], "no"
    qas.append(QA("exists", TEMPLATES["exists"].format(article=_article(colour), colour=colour), answer))

    qas.append(QA("count", TEMPLATES["count"], NUMBER_WORDS[len(scene.shapes)]))

    corners = _unique_by(scene, quadrant)
    if corners:
        options = [q for q in QUADRANTS if q in corners]
        q = options[int(rng.integers(len(options)))]
        qas.append(QA("corner", TEMPLATES["corner"].format(quadrant=q), corners[q].kind))

    kinds = _unique_by(scene, lambda s: s.kind)
    if kinds:
        options = [k for k in KINDS if k in kinds]
        k = options[int(rng.integers(len(options)))]
        qas.append(QA("colour_of", TEMPLATES["colour_of"].format(kind=k), kinds[k].colour))

    if scene.glyph is not None:
        qas.append(QA("letter", TEMPLATES["letter"], scene.glyph.char.lower()))
    return tuple(qas)


def all_questions(scene: Scene) -> tuple[QA, ...]:
    """Every question the families can ask of a scene (training packs them all per image).

    ``exists`` is asked for every colour (present: yes, absent: no), ``corner`` for every
    quadrant holding exactly one shape, ``colour_of`` for every kind that occurs once.
    """
    qas = [QA("background", TEMPLATES["background"], scene.background)]
    present = {s.colour for s in scene.shapes}
    for colour in COLOUR_NAMES:
        answer = "yes" if colour in present else "no"
        qas.append(QA("exists", TEMPLATES["exists"].format(article=_article(colour), colour=colour), answer))
    qas.append(QA("count", TEMPLATES["count"], NUMBER_WORDS[len(scene.shapes)]))
    corners = _unique_by(scene, quadrant)
    for q in QUADRANTS:
        if q in corners:
            qas.append(QA("corner", TEMPLATES["corner"].format(quadrant=q), corners[q].kind))
    kinds = _unique_by(scene, lambda s: s.kind)
    for k in KINDS:
        if k in kinds:
            qas.append(QA("colour_of", TEMPLATES["colour_of"].format(kind=k), kinds[k].colour))
    if scene.glyph is not None:
        qas.append(QA("letter", TEMPLATES["letter"], scene.glyph.char.lower()))
    return tuple(qas)


def description(scene: Scene) -> str:
    """The answer to an open question: 'gray background red circle blue square green letter'.

    The background, then every shape's colour and kind in scene order, then the letter's colour. Each word
    is one token of the shipped tokenizer and there are no separators, so the longest description (six
    shapes and a letter) is ``DESCRIPTION_MAX_WORDS`` = 16 tokens: it always fits ``m3 ask``'s default
    ``--max-new-tokens 16``.
    Sizes, positions and the letter's identity are left out (see :func:`caption` for those).
    """
    words = [scene.background, "background"]
    for s in scene.shapes:
        words += [s.colour, s.kind]
    if scene.glyph is not None:
        words += [scene.glyph.colour, "letter"]
    return " ".join(words)


def describe_question(rng: np.random.Generator) -> str:
    """One phrasing of the open question, capitalised half of the time (as people type it)."""
    question = DESCRIBE_QUESTIONS[int(rng.integers(len(DESCRIBE_QUESTIONS)))]
    return question[0].upper() + question[1:] if rng.random() < 0.5 else question


def describe_qa(scene: Scene, rng: np.random.Generator) -> QA:
    """The scene's ``describe`` question (a phrasing drawn from ``rng``) with its description."""
    return QA(DESCRIBE, describe_question(rng), description(scene))


def caption(scene: Scene) -> str:
    """Short description, e.g. 'gray background. large red circle top left. letter k in green.'"""
    parts = [f"{scene.background} background."]
    parts += [f"{s.size} {s.colour} {s.kind} {quadrant(s)}." for s in scene.shapes]
    if scene.glyph is not None:
        parts.append(f"letter {scene.glyph.char.lower()} in {scene.glyph.colour}.")
    return " ".join(parts)


def answer_words(family: str) -> list[str]:
    """Every possible answer of a question family."""
    options: dict[str, Sequence[str]] = {
        "background": BACKGROUND_NAMES,
        "exists": ("yes", "no"),
        "count": NUMBER_WORDS[1 : MAX_SHAPES + 1],
        "corner": KINDS,
        "colour_of": COLOUR_NAMES,
        "letter": [c.lower() for c in GLYPHS],
    }
    if family not in options:
        raise ValueError(f"unknown question family {family!r}; expected one of {FAMILIES}")
    return list(options[family])


def vocabulary() -> list[str]:
    """Sorted list of every word that can appear in a question, answer or caption."""
    words: set[str] = set()
    for template in TEMPLATES.values():
        words.update(split_words(re.sub(r"\{\w+\}", " ", template)))
    for family in FAMILIES:
        words.update(answer_words(family))
    for group in (BACKGROUND_NAMES, COLOUR_NAMES, KINDS, SIZE_NAMES, QUADRANTS):
        for item in group:
            words.update(split_words(item))
    words.update(split_words("background letter in a an"))
    for question in DESCRIBE_QUESTIONS:
        words.update(split_words(question))
    return sorted(words)


# --------------------------------------------------------------------------- splits


def sample(split: str, index: int) -> Sample:
    """Item ``index`` of ``split``, regenerated deterministically from (split seed, index)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    scene = make_scene(rng)
    qas = questions(scene, rng)
    return Sample(split, index, scene, qas, describe_qa(scene, rng))  # drawn last: qas are unaffected


def iter_questions(
    split: str, n: int, families: Sequence[str] | None = None, max_lookahead: int = 1000,
    source: Callable[[str, int], Sample] = sample,
) -> Iterator[tuple[Sample, QA]]:
    """First ``n`` (sample, qa) pairs of a split, round-robin over ``families`` (default: the one-word
    ``FAMILIES``; ``describe`` is asked when named). ``source`` builds item i of the split (default: the
    scenes; ``drawings.sample`` for drawings).

    Samples are read in index order; each turn takes the earliest unused question of the next family, so a
    family's questions do not depend on which other families are asked. A family with no question in
    ``max_lookahead`` further samples is dropped from the rotation.
    """
    fams = list(FAMILIES if families is None else families)
    unknown = [f for f in fams if f not in EVAL_FAMILIES]
    if unknown or not fams:
        raise ValueError(f"unknown or empty families {unknown or fams}; expected a subset of {EVAL_FAMILIES}")
    fams = list(dict.fromkeys(fams))
    queues: dict[str, deque[tuple[Sample, QA]]] = {f: deque() for f in fams}
    next_index = 0
    produced = 0
    turn = 0
    while produced < n and fams:
        fam = fams[turn % len(fams)]
        start = next_index
        while not queues[fam] and next_index - start < max_lookahead:
            item = source(split, next_index)
            next_index += 1
            for qa in (*item.qas, *((item.describe,) if item.describe else ())):
                if qa.family in queues:
                    queues[qa.family].append((item, qa))
        if queues[fam]:
            yield queues[fam].popleft()
            produced += 1
            turn += 1
        else:
            fams.remove(fam)
            del queues[fam]
            if fams:
                turn %= len(fams)
