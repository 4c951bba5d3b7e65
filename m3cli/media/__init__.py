"""Media: what the user points at, turned into work items and RGB pixels.

``files`` says which paths are media, ``image`` decodes images (Pillow; by default exactly as the models'
original code opens them, :class:`ImageOptions` for what a user asks instead), ``video`` samples frames (the only
PyAV user, imported lazily), ``inputs`` lists files, folders and stdin as :class:`Item` / :class:`BadInput`.
Everything that can go wrong with a user's file is a one-line :class:`MediaError` (or a BadInput row during
enumeration) so a batch can write an error row and carry on.
"""

from __future__ import annotations

from m3cli.errors import MediaError
from m3cli.media.files import IMAGE_EXTS, VIDEO_EXTS, media_kind
from m3cli.media.image import PIXEL_FIELDS, ImageNotes, ImageOptions, Picture, load_image, open_image, parse_colour
from m3cli.media.inputs import BadInput, Item, iter_inputs, unique_ids
from m3cli.media.video import DEFAULT_MAX_FRAMES, Frame, expand_video, sample_frames

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "IMAGE_EXTS",
    "PIXEL_FIELDS",
    "VIDEO_EXTS",
    "BadInput",
    "Frame",
    "ImageNotes",
    "ImageOptions",
    "Item",
    "MediaError",
    "Picture",
    "expand_video",
    "iter_inputs",
    "load_image",
    "media_kind",
    "open_image",
    "parse_colour",
    "sample_frames",
    "unique_ids",
]
