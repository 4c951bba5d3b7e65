"""The paper's video collage: frames, order, layout and question prefix (IG-VLM's recipe)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m3cli.answering.collage import (
    COLLAGE_PREFIX,
    DEFAULT_FRAMES,
    collage,
    collage_question,
    default_cols,
    uniform_indices,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (40, 80, 120)]


def _solid(colour, size=(64, 48)):
    return Image.new("RGB", size, colour)


def _cell(img, col, row, cell):
    w, h = cell
    return tuple(int(v) for v in np.asarray(img)[row * h + h // 2, col * w + w // 2])


def test_default_layout_is_igvlm_2_columns_by_3_rows():
    frames = [_solid(c) for c in COLOURS[:6]]
    sheet = collage(frames)
    assert sheet.mode == "RGB" and sheet.size == (2 * 64, 3 * 48)
    # row-major: frame i sits at row i // 2, column i % 2
    for i, colour in enumerate(COLOURS[:6]):
        assert _cell(sheet, i % 2, i // 2, (64, 48)) == colour
    # every pixel of a cell is its frame's (no borders, no blending between cells)
    arr = np.asarray(sheet)
    assert np.all(arr[:48, :64] == COLOURS[0]) and np.all(arr[96:, 64:] == COLOURS[5])


def test_explicit_layout_and_white_fill():
    frames = [_solid(c) for c in COLOURS[:6]]
    wide = collage(frames, cols=3, rows=2)
    assert wide.size == (3 * 64, 2 * 48)
    assert [_cell(wide, i % 3, i // 3, (64, 48)) for i in range(6)] == COLOURS[:6]
    short = collage([_solid(c) for c in COLOURS[:5]], cols=2, rows=3)
    assert _cell(short, 1, 2, (64, 48)) == (255, 255, 255)
    assert _cell(short, 0, 2, (64, 48)) == COLOURS[4]
    assert collage([_solid(COLOURS[0])] * 4).size == (128, 96)  # round(sqrt(4)) = 2 per row
    with pytest.raises(ValueError, match="do not fit"):
        collage(frames, cols=2, rows=2)
    with pytest.raises(ValueError):
        collage([])


def test_cells_take_the_smallest_frame_and_max_side_keeps_aspect():
    frames = [_solid(COLOURS[0], (80, 60)), _solid(COLOURS[1], (64, 48)), Image.new("L", (100, 50), 200)]
    sheet = collage(frames, cols=3)
    assert sheet.size == (3 * 64, 48)
    assert _cell(sheet, 2, 0, (64, 48)) == (200, 200, 200)  # greyscale converted to RGB
    big = [_solid(c, (640, 480)) for c in COLOURS[:6]]
    capped = collage(big, max_side=672)
    assert max(capped.size) <= 672
    assert capped.size == (2 * 298, 3 * 224)  # 640x480 cells scaled by 672 / 1440, floored
    w, h = capped.size[0] // 2, capped.size[1] // 3
    assert abs(w / h - 640 / 480) < 0.02 and 3 * h <= 672
    assert [_cell(capped, i % 2, i // 2, (w, h)) for i in range(6)] == COLOURS[:6]
    assert collage(big, max_side=10**6).size == (1280, 1440)  # a cap above the size changes nothing


def test_uniform_indices_follow_igvlm_stride():
    assert DEFAULT_FRAMES == 6
    assert uniform_indices(60) == [0, 10, 20, 30, 40, 50]
    assert uniform_indices(100) == [0, 16, 32, 48, 64, 80]  # stride floor(100 / 6) = 16, tail unused
    assert uniform_indices(6) == [0, 1, 2, 3, 4, 5]
    assert uniform_indices(3) == [0, 0, 1, 1, 2, 2]  # fewer frames than cells: repeated, in order
    assert uniform_indices(1, k=4) == [0, 0, 0, 0]
    assert uniform_indices(1000, k=1) == [0]
    for n in range(1, 200):
        for k in (1, 4, 6, 9):
            idx = uniform_indices(n, k)
            assert len(idx) == k and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
    with pytest.raises(ValueError):
        uniform_indices(0)
    with pytest.raises(ValueError):
        uniform_indices(10, k=0)


def test_default_cols():
    assert [default_cols(n) for n in (1, 2, 4, 6, 9, 12)] == [1, 1, 2, 2, 3, 3]


def test_question_prefix_is_the_papers():
    assert COLLAGE_PREFIX == "The provided image arranges keyframes from a video in a grid view"
    assert collage_question("What happens first?") == (
        "The provided image arranges keyframes from a video in a grid view. Question: What happens first?"
    )
    assert collage_question("  why?\n") == f"{COLLAGE_PREFIX}. Question: why?"
