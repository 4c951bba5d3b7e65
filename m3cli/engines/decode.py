"""One ``m3 batch`` input decoded into pictures: an image, a video's sampled frames, or its collage.

Runs ahead of the model (the local engine's prefetch thread, the Ray engine's decode tasks). Each picture
carries its identity ``key`` (the file's, plus the frame number or the collage's frames and layout), so the
questions about one picture share one encode, and what was done to its pixels (``pixels``: the rows'
``upright`` / ``alpha`` / ``decode_scale``, for an image file); nothing here knows the model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Hashable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from m3cli.answering.collage import DEFAULT_FRAMES, collage, uniform_indices
from m3cli.answering.encode_cache import file_identity
from m3cli.media import BadInput, ImageOptions, Item, MediaError, expand_video, open_image
from m3cli.media.inputs import question_ids
from m3cli.media.video import frames_at

VIDEO_MODES = ("frames", "collage")


@dataclass(frozen=True)
class Sampling:
    """How a video becomes pictures: sampled frames (``fps``/``every``/``max_frames``) or one collage."""

    fps: float | None = None
    every: int | None = None
    max_frames: int | None = None
    video_mode: str = "frames"
    collage_frames: int = DEFAULT_FRAMES
    collage_layout: tuple[int, int] | None = None


@dataclass
class Decoded:
    """One picture of an input (or the input's error): what :func:`decode_input` yields."""

    item: Item | BadInput
    image: object | None = None
    error: str | None = None
    skip: bool = False  # every row of it is already done (a resumed run): nothing was decoded
    key: Hashable | None = None
    load: Callable[[], Any] | None = None
    frames: list[int] | None = None
    pixels: dict[str, Any] | None = None  # an image file's Picture.fields(); None for video frames and errors


class RecentKeys:
    """The keys of the last ``capacity`` images decoded: a repeat is not decoded again ahead of the model,
    its encoding being expected in the cache (the unit keeps a loader in case it is not). Each key keeps
    what was done to that image's pixels, for the repeat's rows."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._keys: OrderedDict[Hashable, dict[str, Any] | None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key is not None and key in self._keys

    def pixels(self, key: Hashable) -> dict[str, Any] | None:
        """What was done to the pixels of the image ``key`` when it was decoded."""
        return self._keys.get(key)

    def add(self, key: Hashable | None, pixels: dict[str, Any] | None = None) -> None:
        """Record ``key`` as the latest image decoded (``pixels``: its fields; a repeat keeps the first's)."""
        if key is None or not self.capacity:
            return
        self._keys[key] = pixels if pixels is not None else self._keys.get(key)
        self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)


class AllDone:
    """``ident in AllDone(done, n)``: every row of the picture ``ident`` (``n`` questions) is in ``done``."""

    def __init__(self, done: Container[str], n: int) -> None:
        self.done = done
        self.n = n

    def __contains__(self, ident: object) -> bool:
        return all(row_id in self.done for row_id in question_ids(str(ident), self.n))


def _key(item: Item, *tail: Any) -> Hashable | None:
    identity = file_identity(item.source)
    return None if identity is None else (*identity, *tail)


def decode_input(
    item: Item | BadInput,
    done: Container[str],
    sampling: Sampling | None = None,
    recent: RecentKeys | None = None,
    image: ImageOptions | None = None,
) -> Iterator[Decoded]:
    """One input as its pictures, in order: an image, a video's sampled frames or its collage, or an error.

    Pictures whose id is in ``done`` (a resumed run) are skipped without decoding. A video that fails part-way
    keeps the frames already yielded and ends with an error for the video itself. An image whose key
    ``recent`` has seen is not decoded here: it carries a loader instead. ``image``: how image files become
    pixels (None: exactly as the model's original code opens them).
    """
    sampling = sampling or Sampling()
    if isinstance(item, BadInput):
        yield Decoded(item, error=item.error, skip=item.id in done)
    elif item.kind == "video" and sampling.video_mode == "collage":
        yield _collage(item, done, sampling)
    elif item.kind == "video":
        try:
            for frame_item, frame in expand_video(item, sampling.fps, sampling.every, sampling.max_frames):
                skip = frame_item.id in done
                yield Decoded(frame_item, None if skip else frame.image, skip=skip,
                              key=None if skip else _key(item, "frame", frame.index))
        except (MediaError, ValueError) as exc:
            yield Decoded(item, error=str(exc), skip=item.id in done)
    elif item.id in done:
        yield Decoded(item, skip=True)
    else:
        key = _key(item)
        if recent is not None and key in recent:
            pixels = recent.pixels(key)
            recent.add(key)
            yield Decoded(item, key=key, load=partial(_image, item.source, image), pixels=pixels)
            return
        try:
            picture = open_image(item.source, image)
        except MediaError as exc:  # not recorded: a repeat is decoded (and reported) here again
            yield Decoded(item, error=str(exc))
            return
        if recent is not None:
            recent.add(key, picture.fields())
        yield Decoded(item, picture.image, key=key, pixels=picture.fields())


def _image(source: str, options: ImageOptions | None) -> Any:
    """The pixels of an image file (a repeat's loader, when its encoding has left the cache)."""
    return open_image(source, options).image


def _collage(item: Item, done: Container[str], sampling: Sampling) -> Decoded:
    """A video as one picture: ``collage_frames`` frames sampled uniformly (IG-VLM's stride), tiled."""
    if item.id in done:
        return Decoded(item, skip=True)
    k = sampling.collage_frames
    cols, rows = sampling.collage_layout or (None, None)
    try:
        frames = frames_at(item.source, lambda n: uniform_indices(n, k))
        image = collage([f.image for f in frames], cols, rows)
    except (MediaError, ValueError) as exc:
        return Decoded(item, error=str(exc))
    used = [f.index for f in frames]
    return Decoded(item, image, key=_key(item, "collage", *used, cols or 0, rows or 0), frames=used)
