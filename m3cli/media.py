"""Media loading and input enumeration: images (Pillow), videos (PyAV), folders and stdin pipelines.

Everything that can go wrong with a user's file is reported as a one-line :class:`MediaError`
(or a :class:`BadInput` row during enumeration) so the CLI can write an error row and carry on.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import IO, Literal, TextIO

import av
import av.error
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "IMAGE_EXTS",
    "VIDEO_EXTS",
    "BadInput",
    "Frame",
    "Item",
    "MediaError",
    "VideoInfo",
    "expand_video",
    "iter_inputs",
    "load_image",
    "media_kind",
    "probe_video",
    "sample_frames",
]

# Lower-case, with the leading dot. GIF is an image on purpose: animated GIFs use their first frame.
IMAGE_EXTS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".webp",
        ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k",
    }
)  # fmt: skip
# ".ts" is deliberately absent: walking a source tree would pick up TypeScript files.
VIDEO_EXTS: frozenset[str] = frozenset(
    {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv"}
)
DEFAULT_MAX_FRAMES = 8

# Catch-all for decoder failures on damaged files; Pillow and its plugins raise a mix of these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError)


class MediaError(Exception):
    """A user-facing, one-line problem with one input file (message names the file)."""

    def __init__(self, message: str) -> None:
        # Collapse whitespace so wrapped library messages never break the one-line contract.
        super().__init__(" ".join(str(message).split()))


def _one_line(exc: BaseException) -> str:
    """Short single-line description of a library exception."""
    msg = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(msg).split())


def media_kind(path: str | os.PathLike[str]) -> Literal["image", "video"] | None:
    """Classify a path by its (case-insensitive) extension; None when it is not media."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def _check_readable_file(name: str) -> None:
    """Turn missing/directory/empty/unreadable paths into MediaError before a decoder sees them."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise MediaError(f"{name}: file not found") from None
    except PermissionError:
        raise MediaError(f"{name}: permission denied") from None
    except OSError as e:
        raise MediaError(f"{name}: cannot access ({_one_line(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(f"{name}: is a directory, not a file")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise MediaError(f"{name}: empty file")
    if not os.access(name, os.R_OK):
        raise MediaError(f"{name}: permission denied")


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _bomb_error(name: str, exc: BaseException | None, pixels: int | None = None) -> MediaError:
    if pixels is None and exc is not None:
        m = _BOMB_PIXELS.search(str(exc))
        pixels = int(m.group(1)) if m else None
    n = str(pixels) if pixels is not None else "?"
    return MediaError(f"{name}: refused, image too large ({n} pixels > {Image.MAX_IMAGE_PIXELS})")


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Scale high-bit-depth single-channel images (I;16*, I, F) to 8-bit without clipping."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        # Full 16-bit range maps onto 0..255 with rounding: 65535 -> 255, 32768 -> 128.
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535
    else:
        a = arr.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0  # float images in [0, 1] are the common convention
        elif im.mode == "I" and lo >= 0 and hi <= 255:
            scaled = a  # already 8-bit values stored in 32-bit ints
        elif im.mode == "I" and lo >= 0 and hi <= 65535:
            scaled = a * (255.0 / 65535.0)  # 16-bit data that Pillow widened to "I"
        elif hi > lo:
            scaled = (a - lo) * (255.0 / (hi - lo))  # arbitrary range: stretch rather than clip
        else:
            scaled = np.zeros_like(a)
        out = np.nan_to_num(np.rint(scaled), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _to_8bit_gray(im).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    # convert() returns a fresh copy even for RGB input, so the result never references a file.
    return im.convert("RGB")


def load_image(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes], max_side: int = 2048
) -> Image.Image:
    """Decode an image to a fully loaded RGB ``PIL.Image`` whose longer side is at most ``max_side``.

    Raises MediaError (one line, naming the file) for anything that is not a readable, sane image.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        data = bytes(path_or_bytes)
        if not data:
            raise MediaError(f"{name}: empty input")
        return _decode_image(io.BytesIO(data), name, max_side)
    if hasattr(path_or_bytes, "read"):
        name = str(getattr(path_or_bytes, "name", "<stream>"))
        return _decode_image(path_or_bytes, name, max_side)  # type: ignore[arg-type]

    name = os.fspath(path_or_bytes)  # type: ignore[arg-type]
    _check_readable_file(name)
    try:
        fh = open(name, "rb")  # closed by the with-block below
    except IsADirectoryError:
        raise MediaError(f"{name}: is a directory, not a file") from None
    except PermissionError:
        raise MediaError(f"{name}: permission denied") from None
    except OSError as e:
        raise MediaError(f"{name}: cannot open ({_one_line(e)})") from None
    with fh:
        return _decode_image(fh, name, max_side)


def _decode_image(fh: IO[bytes], name: str, max_side: int) -> Image.Image:
    try:
        # Pillow only *warns* between 1x and 2x MAX_IMAGE_PIXELS; we refuse above 1x.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_error(name, e) from None
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not a recognised image format") from None
    except _DECODE_ERRORS as e:
        raise MediaError(f"{name}: cannot read image ({_one_line(e)})") from None

    with im:
        w, h = im.size
        if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
            raise _bomb_error(name, None, w * h)  # belt and braces if a plugin skipped the check
        try:
            if im.format == "JPEG" and max(w, h) > max_side:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: far cheaper than full decode + resize.
                s = max_side / max(w, h)
                im.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb_error(name, e) from None
        except _DECODE_ERRORS as e:
            raise MediaError(f"{name}: corrupt or truncated image ({_one_line(e)})") from None

        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception as e:  # broken EXIF must not cost us an otherwise good image
            log.debug("%s: ignoring unusable EXIF orientation: %s", name, e)
            oriented = im
        try:
            rgb = _to_rgb(oriented)
        except (ValueError, OSError) as e:
            raise MediaError(f"{name}: unsupported image mode {im.mode} ({_one_line(e)})") from None

    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb


# ----------------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """Cheap container-level facts about a video's first video stream."""

    duration_s: float | None
    fps: float | None
    n_frames_estimate: int | None


@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded video frame: its number in the video, presentation time (s) and RGB image."""

    index: int
    time_s: float
    image: Image.Image


def _open_video(name: str) -> av.container.InputContainer:
    _check_readable_file(name)
    try:
        return av.open(name, mode="r")
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: not a readable video ({_one_line(e)})") from None
    except OSError as e:
        raise MediaError(f"{name}: cannot open video ({_one_line(e)})") from None


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError(f"{name}: no video stream")
    return container.streams.video[0]


def _stream_facts(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None
    duration: float | None = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base  # container duration is in microseconds
    n = stream.frames or None
    if n is None and duration is not None and fps:
        n = max(1, round(duration * fps))
    if duration is None and n and fps:
        duration = n / fps
    return VideoInfo(duration_s=duration, fps=fps, n_frames_estimate=n)


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read duration, frame rate and an estimated frame count from the container header (no decoding)."""
    name = os.fspath(path)
    with _open_video(name) as container:
        return _stream_facts(container, _video_stream(container, name))


def _count_packets(name: str) -> int:
    """Exact-ish frame count by demuxing without decoding, for containers with no frame count (mkv/webm)."""
    try:
        with av.open(name, mode="r") as container:
            stream = container.streams.video[0]
            return sum(1 for p in container.demux(stream) if p.size)
    except (av.error.FFmpegError, OSError, IndexError):
        return 0


def _even_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over 0..n-1, first and last included (fewer if n < k)."""
    if n <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _frame_image(frame: av.VideoFrame) -> Image.Image:
    img = frame.to_image()  # always rgb24 -> RGB
    rotation = 0
    try:
        rotation = round(frame.rotation or 0) % 360
    except (AttributeError, TypeError, ValueError):
        pass
    # Honour the display matrix (phone videos) so frames look like they do in a player.
    # PyAV reports the counter-clockwise angle, which is what Pillow's ROTATE_* constants mean too.
    if rotation == 90:
        img = img.transpose(Image.Transpose.ROTATE_90)
    elif rotation == 180:
        img = img.transpose(Image.Transpose.ROTATE_180)
    elif rotation == 270:
        img = img.transpose(Image.Transpose.ROTATE_270)
    return img


def sample_frames(
    path: str | os.PathLike[str],
    fps: float | None = None,
    every: int | None = None,
    max_frames: int | None = None,
) -> Iterator[Frame]:
    """Stream sampled frames from a video in one forward decode pass.

    ``every=N`` keeps frames 0, N, 2N, ...; ``fps=F`` keeps the first frame at/after each multiple of 1/F s;
    ``max_frames=K`` alone spreads K frames evenly (default ``DEFAULT_MAX_FRAMES``), otherwise it caps the
    count. Frames decoded before damage are yielded, then MediaError is raised.
    """
    if fps is not None and every is not None:
        raise ValueError("fps and every are mutually exclusive")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    if every is not None and every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    name = os.fspath(path)
    return _sample(name, fps, every, max_frames)


def _sample(name: str, fps: float | None, every: int | None, max_frames: int | None) -> Iterator[Frame]:
    spread = fps is None and every is None
    cap = max_frames if max_frames is not None else (DEFAULT_MAX_FRAMES if spread else None)

    with _open_video(name) as container:
        stream = _video_stream(container, name)
        info = _stream_facts(container, stream)
        stream.thread_type = "AUTO"  # frame threading: big win on long videos, harmless on short ones
        time_base = stream.time_base
        start_pts = stream.start_time or 0
        native_fps = info.fps or 25.0  # only used when a frame has no pts

        targets: list[int] = []
        if spread:
            assert cap is not None
            # stream.frames is exact for mp4/mov; other containers need a (cheap) demux-only count.
            n_total = stream.frames or _count_packets(name) or (info.n_frames_estimate or 0)
            targets = _even_indices(n_total, cap)
            if not targets:
                targets = list(range(cap))  # unknown length: fall back to the first frames
        target_pos = 0
        next_time = 0.0

        emitted = 0
        decoded = 0
        packets = 0
        last: tuple[int, float, av.VideoFrame] | None = None
        last_emitted_index = -1

        def decoded_frames() -> Iterator[av.VideoFrame]:
            nonlocal packets
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
                yield from packet.decode()

        try:
            for vframe in decoded_frames():
                index = decoded
                decoded += 1
                if vframe.pts is not None and time_base is not None:
                    t_exact = float((vframe.pts - start_pts) * time_base)
                else:
                    t_exact = index / native_fps
                t = round(t_exact, 3)  # reported value only; sampling decisions use the exact time

                if spread:
                    keep = index == targets[target_pos]
                elif every is not None:
                    keep = index % every == 0
                else:
                    assert fps is not None
                    keep = t_exact >= next_time - 1e-9

                if not keep:
                    if spread:
                        last = (index, t, vframe)
                    continue

                yield Frame(index=index, time_s=t, image=_frame_image(vframe))
                emitted += 1
                last_emitted_index = index
                if fps is not None:
                    # Next target strictly after this frame, so one frame never fills two slots.
                    next_time = (math.floor(t_exact * fps + 1e-9) + 1) / fps
                if spread:
                    target_pos += 1
                    if target_pos >= len(targets):
                        return  # every target served: stop decoding early
                if cap is not None and emitted >= cap:
                    return
        except av.error.FFmpegError as e:
            where = f"after {decoded} frames" if decoded else "no frame decoded"
            raise MediaError(f"{name}: corrupt or truncated video ({where}: {_one_line(e)})") from None

        if decoded == 0:
            raise MediaError(f"{name}: corrupt or truncated video (no frame could be decoded)")
        if stream.frames and packets < stream.frames:
            # The demuxer stops silently at a cut-off mdat; the header's sample count gives it away.
            raise MediaError(f"{name}: truncated video (only {packets} of {stream.frames} frames present)")
        if spread and target_pos < len(targets) and last is not None and last[0] > last_emitted_index:
            # The frame count was an over-estimate: give the caller the final frame instead of nothing.
            index, t, vframe = last
            yield Frame(index=index, time_s=t, image=_frame_image(vframe))


# ----------------------------------------------------------------------------------------------------------
# Input enumeration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """A cheap descriptor of one unit of work; pixels are loaded later by the caller."""

    id: str
    source: str
    kind: Literal["image", "video", "frame"]
    frame: int | None = None
    time_s: float | None = None
    question: str | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class BadInput:
    """An input that could not become an Item; the caller writes it as an error row."""

    id: str
    source: str
    error: str


def _walk(root: str, visited: set[tuple[int, int]]) -> Iterator[tuple[str, str] | BadInput]:
    """Yield (path, kind) for media under ``root`` depth-first with names sorted at every level.

    Sorting siblings by name in a depth-first walk orders files by their path components.
    """
    try:
        st = os.stat(root)
        key = (st.st_dev, st.st_ino)
        if key in visited:
            log.debug("skipped directory already visited (symlink loop?): %s", root)
            return
        visited.add(key)
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        error = f"{root}: cannot read directory ({_one_line(e)})"
        yield BadInput(id=os.path.normpath(root), source=root, error=error)
        return
    for entry in entries:
        if entry.name.startswith("."):
            log.debug("skipped hidden path: %s", entry.path)
            continue
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and entry.is_file()
        except OSError:
            is_dir = is_file = False
        if is_dir:
            yield from _walk(entry.path, visited)
        elif is_file:
            kind = media_kind(entry.name)
            if kind is None:
                log.debug("skipped non-media file: %s", entry.path)
                continue
            yield entry.path, kind
        else:
            log.debug("skipped special file or broken link: %s", entry.path)


def _expand_path(
    path: str, *, item_id: str | None = None, question: str | None = None, tokens: int | None = None
) -> Iterator[Item | BadInput]:
    """Items for one explicitly named path (file, video or directory)."""
    norm = os.path.normpath(path)
    if not os.path.exists(path):
        yield BadInput(id=item_id or norm, source=path, error=f"{path}: no such file or directory")
        return
    if os.path.isdir(path):
        root_id = item_id if item_id is not None else norm
        for found in _walk(path, set()):
            if isinstance(found, BadInput):
                yield found
                continue
            fpath, kind = found
            rel = os.path.relpath(fpath, path)
            yield Item(
                id=os.path.normpath(os.path.join(root_id, rel)),
                source=fpath,
                kind=kind,  # type: ignore[arg-type]
                question=question,
                tokens=tokens,
            )
        return
    # An explicitly named file with an unknown extension is still tried as an image: the user asked for
    # it, and load_image gives a precise error if it is not one.
    kind = media_kind(path) or "image"
    yield Item(id=item_id or norm, source=path, kind=kind, question=question, tokens=tokens)


def _jsonl_row(line: str, lineno: int) -> Iterator[Item | BadInput]:
    where = f"stdin line {lineno}"
    bad_id = f"stdin:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        yield BadInput(id=bad_id, source="-", error=f"{where}: invalid JSON ({e.msg} at column {e.colno})")
        return
    if not isinstance(row, dict):
        yield BadInput(id=bad_id, source="-", error=f"{where}: expected a JSON object")
        return
    raw_id = row.get("id")
    item_id = str(raw_id) if raw_id is not None and not isinstance(raw_id, (dict, list)) else None
    image = row.get("image")
    if not isinstance(image, str) or not image:
        yield BadInput(id=item_id or bad_id, source="-", error=f"{where}: missing or non-string 'image'")
        return
    question = row.get("question")
    tokens = row.get("tokens")
    problem = None
    if question is not None and not isinstance(question, str):
        problem = "'question' must be a string"
    elif tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        problem = "'tokens' must be a positive integer"
    if problem:
        yield BadInput(id=item_id or os.path.normpath(image), source=image, error=f"{where}: {problem}")
        return
    yield from _expand_path(image, item_id=item_id, question=question, tokens=tokens)


def _read_stdin(stdin: TextIO) -> Iterator[Item | BadInput]:
    for lineno, raw in enumerate(stdin, 1):
        line = raw.strip()
        if lineno == 1:
            line = line.lstrip("\ufeff")  # tolerate a UTF-8 BOM from Windows tools
        if not line:
            continue
        if line.startswith("{"):
            yield from _jsonl_row(line, lineno)
        else:
            yield from _expand_path(line)


def _unique(items: Iterable[Item | BadInput]) -> Iterator[Item | BadInput]:
    """Suffix repeated ids with ~2, ~3, ... in stream order so every row id is unique."""
    used: set[str] = set()
    counts: dict[str, int] = {}
    for it in items:
        new_id = it.id
        if new_id in used:
            n = counts.get(it.id, 1)
            while True:
                n += 1
                new_id = f"{it.id}~{n}"
                if new_id not in used:
                    break
            counts[it.id] = n
            it = replace(it, id=new_id)
        used.add(new_id)
        yield it


def iter_inputs(paths: Sequence[str], stdin: TextIO | None = None) -> Iterator[Item | BadInput]:
    """Enumerate files, directories (recursive, sorted) and ``-`` (stdin paths or JSONL) as unique Items.

    Problems with a single input become BadInput rows; enumeration never stops early.
    """

    def gen() -> Iterator[Item | BadInput]:
        for p in paths:
            if p == "-":
                yield from _read_stdin(stdin if stdin is not None else sys.stdin)
            else:
                yield from _expand_path(p)

    return _unique(gen())


def expand_video(
    item: Item, fps: float | None = None, every: int | None = None, max_frames: int | None = None
) -> Iterator[tuple[Item, Frame]]:
    """Turn a video Item into (frame Item, Frame) pairs; raises MediaError part-way on damaged video."""
    if item.kind != "video":
        raise ValueError(f"expand_video needs a video item, got kind={item.kind!r}")
    for fr in sample_frames(item.source, fps=fps, every=every, max_frames=max_frames):
        yield replace(item, id=f"{item.id}#{fr.index}", kind="frame", frame=fr.index, time_s=fr.time_s), fr
