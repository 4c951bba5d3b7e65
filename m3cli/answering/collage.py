"""The paper's video input: keyframes tiled into one grid image, and the question prefix that says so.

M3 evaluates video with IG-VLM's recipe (mu-cai/matryoshka-mm ``IG-VLM/``): 6 frames sampled at a
fixed stride, pasted row-major into a grid of ``round(sqrt(6)) = 2`` frames per row (so 3 rows of 2),
and the prompt ``"<image>\\nThe provided image arranges keyframes from a video in a grid view. Question: ..."``.
The grid then goes through anyres as one image. Everything here is pure PIL; decoding stays in
``m3cli.media``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

COLLAGE_PREFIX = "The provided image arranges keyframes from a video in a grid view"
DEFAULT_FRAMES = 6
WHITE = (255, 255, 255)  # IG-VLM fills the unused cells of a short last row with white


def uniform_indices(n_frames: int, k: int = DEFAULT_FRAMES) -> list[int]:
    """``k`` frame numbers out of ``n_frames``: IG-VLM's ``0, s, 2s, ...`` with stride ``s = n_frames // k``.

    The first frame is always taken and the tail after ``k * s`` never is (60 frames, k = 6: 0, 10, ..., 50).
    IG-VLM divides by zero when the video has fewer than ``k`` frames; here ``i * n_frames // k`` is used
    instead, which repeats frames so the grid keeps its ``k`` cells (3 frames: 0, 0, 1, 1, 2, 2).
    """
    if k < 1:
        raise ValueError(f"frame count must be >= 1, got {k}")
    if n_frames < 1:
        raise ValueError("the video has no frames")
    stride = n_frames // k
    if stride == 0:
        return [i * n_frames // k for i in range(k)]
    return [i * stride for i in range(k)]


def default_cols(n_frames: int) -> int:
    """Frames per row as IG-VLM picks them: ``round(sqrt(n))`` (6 -> 2, 4 -> 2, 9 -> 3, 12 -> 3)."""
    if n_frames < 1:
        raise ValueError(f"frame count must be >= 1, got {n_frames}")
    return max(1, round(math.sqrt(n_frames)))


def collage(
    frames: Sequence[Image.Image],
    cols: int | None = None,
    rows: int | None = None,
    *,
    max_side: int | None = None,
    fill: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """One RGB image with ``frames`` in row-major cells: frame 0 top left, frame ``cols`` starts row 2.

    ``cols`` defaults to :func:`default_cols` and ``rows`` to as many as the frames need, which is IG-VLM's
    layout (6 frames: 2 columns x 3 rows). Every cell has the smallest frame width and the smallest frame
    height, and a frame of another size is stretched to it, as IG-VLM does (frames of one video share a size,
    so none is resized then). ``max_side`` caps the collage's longer side by shrinking the cell with its aspect
    kept (IG-VLM has no cap). Cells without a frame are ``fill``.
    """
    if not frames:
        raise ValueError("a collage needs at least one frame")
    n = len(frames)
    cols = default_cols(n) if cols is None else cols
    if cols < 1:
        raise ValueError(f"columns must be >= 1, got {cols}")
    rows = math.ceil(n / cols) if rows is None else rows
    if rows < 1 or rows * cols < n:
        raise ValueError(f"{n} frames do not fit a grid of {cols} columns x {rows} rows")
    cell_w = min(f.width for f in frames)
    cell_h = min(f.height for f in frames)
    if max_side is not None:
        if max_side < max(cols, rows):
            raise ValueError(f"max side {max_side} px cannot hold {cols}x{rows} cells")
        longest = max(cell_w * cols, cell_h * rows)
        if longest > max_side:  # integer floor keeps the collage within the cap
            cell_w, cell_h = max(1, cell_w * max_side // longest), max(1, cell_h * max_side // longest)
    sheet = Image.new("RGB", (cell_w * cols, cell_h * rows), tuple(fill))
    for i, frame in enumerate(frames):
        rgb = frame if frame.mode == "RGB" else frame.convert("RGB")
        if rgb.size != (cell_w, cell_h):
            rgb = rgb.resize((cell_w, cell_h), Image.Resampling.BICUBIC)
        row, col = divmod(i, cols)
        sheet.paste(rgb, (col * cell_w, row * cell_h))
    return sheet


def collage_question(question: str) -> str:
    """The question as IG-VLM's M3 (7B) prompts put it: the prefix, ``". Question: "``, then the question.

    The prompt recipe adds the image placeholder and newline before it, as for any image question.
    """
    return f"{COLLAGE_PREFIX}. Question: {question.strip()}"
