"""Video sampling: frames picked by count, stride or rate in one forward decode pass.

This is the only module that uses PyAV, and it imports ``av`` inside the functions that decode, so
listing inputs or loading an image (``m3 ask x.png``) never pays for loading FFmpeg.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from PIL import Image

from m3cli.errors import MediaError, describe
from m3cli.media.files import check_readable_file
from m3cli.media.inputs import Item

if TYPE_CHECKING:
    import av
    import av.container
    import av.video.stream

DEFAULT_MAX_FRAMES = 8


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
    import av.error

    check_readable_file(name)
    try:
        return av.open(name, mode="r")
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: not a readable video ({describe(e)})") from None
    except OSError as e:
        raise MediaError(f"{name}: cannot open video ({describe(e)})") from None


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError(f"{name}: no video stream")
    return container.streams.video[0]


def _stream_facts(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> VideoInfo:
    import av

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


def _count_packets(name: str) -> int:
    """Exact-ish frame count by demuxing without decoding, for containers with no frame count (mkv/webm)."""
    import av.error

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


def frames_at(path: str | os.PathLike[str], pick: Callable[[int], Sequence[int]]) -> list[Frame]:
    """The frames numbered ``pick(n)`` (``n``: the video's frame count), in that order, in one forward decode pass.

    Numbers may repeat (the same :class:`Frame` is returned for each). A number past the real end of a video
    whose header over-counts gets the last frame there is, so the list always has ``len(pick(n))`` frames;
    each Frame's ``index`` says which frame it really is. A video whose length cannot be told, or that has no
    frame, is a MediaError, as is damage before the last picked frame.
    """
    name = os.fspath(path)
    picked: list[int] = []

    def targets(n: int) -> list[int]:
        if n < 1:
            raise MediaError(f"{name}: cannot tell how many frames the video has")
        picked.extend(int(i) for i in pick(n))
        if not picked or min(picked) < 0:
            raise ValueError(f"frame numbers must be >= 0, got {picked}")
        return sorted(set(picked))

    decoded = list(_sample(name, None, None, None, targets))
    if not decoded:
        raise MediaError(f"{name}: corrupt or truncated video (no frame could be decoded)")
    out = []
    for want in picked:
        # the frame itself, else the last one before it (the video ended early)
        before = [f for f in decoded if f.index <= want]
        out.append(before[-1] if before else decoded[0])
    return out


def _sample(name: str, fps: float | None, every: int | None, max_frames: int | None,
            pick: Callable[[int], list[int]] | None = None) -> Iterator[Frame]:
    """The sampling loop; ``pick(n)`` (sorted, unique frame numbers for a video of ``n`` frames) replaces the
    even spread of ``max_frames`` when given."""
    import av.error

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
            # stream.frames is exact for mp4/mov; other containers need a (cheap) demux-only count.
            n_total = stream.frames or _count_packets(name) or (info.n_frames_estimate or 0)
            if pick is not None:
                targets = pick(n_total)
                cap = len(targets)
            else:
                assert cap is not None
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
            raise MediaError(f"{name}: corrupt or truncated video ({where}: {describe(e)})") from None

        if decoded == 0:
            raise MediaError(f"{name}: corrupt or truncated video (no frame could be decoded)")
        if stream.frames and packets < stream.frames:
            # The demuxer stops silently at a cut-off mdat; the header's sample count gives it away.
            raise MediaError(f"{name}: truncated video (only {packets} of {stream.frames} frames present)")
        if spread and target_pos < len(targets) and last is not None and last[0] > last_emitted_index:
            # The frame count was an over-estimate: give the caller the final frame instead of nothing.
            index, t, vframe = last
            yield Frame(index=index, time_s=t, image=_frame_image(vframe))


def expand_video(
    item: Item, fps: float | None = None, every: int | None = None, max_frames: int | None = None
) -> Iterator[tuple[Item, Frame]]:
    """Turn a video Item into (frame Item, Frame) pairs; raises MediaError part-way on damaged video."""
    if item.kind != "video":
        raise ValueError(f"expand_video needs a video item, got kind={item.kind!r}")
    for fr in sample_frames(item.source, fps=fps, every=every, max_frames=max_frames):
        yield replace(item, id=f"{item.id}#{fr.index}", kind="frame", frame=fr.index, time_s=fr.time_s), fr
