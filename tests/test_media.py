"""Tests for m3cli.media: image decoding edge cases, video sampling and input enumeration."""

from __future__ import annotations

import io
import json
import logging
import os
import sys

import av
import numpy as np
import pytest
from PIL import Image

from m3cli import media
from m3cli.fileio import content_hash
from m3cli.media import (
    DEFAULT_MAX_FRAMES,
    BadInput,
    Item,
    MediaError,
    expand_video,
    iter_inputs,
    load_image,
    sample_frames,
)
from m3cli.media import image as media_image
from m3cli.media import inputs as media_inputs
from m3cli.media import video as media_video

# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _save(im: Image.Image, path, **kw) -> str:
    im.save(path, **kw)
    return str(path)


def _assert_one_line(err: MediaError, name: str) -> None:
    msg = str(err)
    assert "\n" not in msg and "Traceback" not in msg
    assert name in msg


# ----------------------------------------------------------------------------------------------------------
# images: modes
# ----------------------------------------------------------------------------------------------------------


def test_rgba_alpha_dropped_by_default_composited_on_request(tmp_path):
    im = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.putpixel((1, 0), (0, 0, 0, 128))
    path = _save(im, tmp_path / "a.png")
    out = load_image(path)  # the recipe's convert("RGB"): the stored colours, alpha dropped
    assert out.mode == "RGB" and out.size == (4, 2)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (0, 0, 0)
    out = load_image(path, media.ImageOptions(alpha_background="white"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 2 for c in out.getpixel((1, 0)))  # half black over white
    assert out.getpixel((3, 1)) == (255, 0, 0)


def test_la_alpha_dropped_by_default_composited_on_request(tmp_path):
    im = Image.new("LA", (2, 1), (10, 255))
    im.putpixel((0, 0), (0, 0))
    path = _save(im, tmp_path / "la.png")
    out = load_image(path)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (10, 10, 10)
    out = load_image(path, media.ImageOptions(alpha_background="#ffffff"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (10, 10, 10)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([0, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (253 * 3))
    im.putdata([0, 1, 2])
    im.info["transparency"] = 0
    path = _save(im, tmp_path / "p.png", transparency=0)
    assert Image.open(path).mode == "P"
    out = load_image(path)  # the palette colours, as the recipe's convert("RGB") gives them
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (0, 0, 255), (0, 255, 0)]
    out = load_image(path, media.ImageOptions(alpha_background="white"))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (0, 0, 255), (0, 255, 0)]


def test_palette_without_transparency_and_gif(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([200, 10, 10, 10, 200, 10] + [0] * (254 * 3))
    im.putdata([0, 1])
    out = load_image(_save(im, tmp_path / "p.gif"))
    assert out.getpixel((0, 0)) == (200, 10, 10) and out.getpixel((1, 0)) == (10, 200, 10)


def test_16bit_gray_converted_as_the_recipe_does(tmp_path):
    arr = np.array([[0, 32768, 65535, 257, 200]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    path = _save(im, tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)  # Pillow's convert("RGB") clips to 0..255, as the original code feeds it
    px = [out.getpixel((x, 0)) for x in range(5)]
    assert px == [(0, 0, 0), (255, 255, 255), (255, 255, 255), (255, 255, 255), (200, 200, 200)]
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(path).convert("RGB")))


def test_32bit_int_and_float_modes_converted_as_the_recipe_does():
    arr = np.array([[0, 1000, 65535, 100]], dtype=np.int32)
    buf = io.BytesIO()
    Image.fromarray(arr, "I").save(buf, format="TIFF")
    out = load_image(buf.getvalue())
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (255, 255, 255), (255, 255, 255),
                                                         (100, 100, 100)]
    buf = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 99.6]], dtype=np.float32), "F").save(buf, format="TIFF")
    out = load_image(buf.getvalue())
    expected = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert out.getpixel((3, 0)) == (99, 99, 99)  # truncated, not rounded


def test_cmyk_cyan(tmp_path):
    im = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    for name in ("c.jpg", "c.tif"):
        path = _save(im, tmp_path / name)
        assert Image.open(path).mode == "CMYK"
        r, g, b = load_image(path).getpixel((4, 4))
        assert r <= 10 and g >= 245 and b >= 245, (name, (r, g, b))


def test_gray_and_bilevel(tmp_path):
    out = load_image(_save(Image.new("L", (3, 3), 77), tmp_path / "l.png"))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (77, 77, 77)
    bw = Image.new("1", (3, 3), 0)
    bw.putpixel((0, 0), 1)
    out = load_image(_save(bw, tmp_path / "b.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 0)


def test_bytes_and_file_handles_closed(tmp_path):
    path = _save(Image.new("RGB", (5, 4), (1, 2, 3)), tmp_path / "x.png")
    with open(path, "rb") as fh:
        data = fh.read()
    out = load_image(data)
    assert out.size == (5, 4) and out.getpixel((0, 0)) == (1, 2, 3)
    out = load_image(path)
    assert getattr(out, "fp", None) is None  # fully loaded, detached from the file
    if sys.platform.startswith("linux"):
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            load_image(path)
            with pytest.raises(MediaError):
                load_image(data[: len(data) // 2])
        assert len(os.listdir("/proc/self/fd")) == before


def test_exif_orientation_kept_as_stored_unless_upright(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW for display
    path = _save(im, tmp_path / "o.jpg", exif=exif, quality=95)
    assert load_image(path).size == (40, 20)  # the recipe feeds the pixels as stored
    out = load_image(path, media.ImageOptions(upright=True))
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 3))  # left strip ends up at the top
    assert r > 200 and b < 60


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = str(tmp_path / "anim.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    r, g, b = load_image(path).getpixel((3, 3))
    assert r > 240 and g < 20 and b < 20


def test_large_image_kept_at_full_size_fast_decode_reduces_jpegs(tmp_path):
    png = _save(Image.new("RGB", (3000, 1000), (9, 9, 9)), tmp_path / "big.png")
    assert load_image(png).size == (3000, 1000)  # the family's own resize is the only one
    assert load_image(png, media.ImageOptions(fast_decode=True)).size == (3000, 1000)  # JPEGs only
    jpg = _save(Image.new("RGB", (2200, 4500), (9, 9, 9)), tmp_path / "big.jpg")
    assert load_image(jpg).size == (2200, 4500)
    picture = media.open_image(jpg, media.ImageOptions(fast_decode=True))  # libjpeg's 1/2 scale
    assert picture.image.size == (1100, 2250) and picture.fields()["decode_scale"] == 0.5
    small = _save(Image.new("RGB", (2000, 4500), (9, 9, 9)), tmp_path / "small.jpg")
    assert load_image(small, media.ImageOptions(fast_decode=True)).size == (2000, 4500)  # 1000 < 1008


@pytest.mark.parametrize("pixels", [99, 40])  # warning zone (1x..2x limit) and hard-error zone (>2x)
def test_decompression_bomb_refused(tmp_path, monkeypatch, pixels):
    path = _save(Image.new("RGB", (10, 10)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(MediaError) as ei:
        load_image(path)
    _assert_one_line(ei.value, "bomb.png")
    assert f"refused, image too large (100 pixels > {pixels})" in str(ei.value)


# ----------------------------------------------------------------------------------------------------------
# images: failures
# ----------------------------------------------------------------------------------------------------------


def test_empty_truncated_corrupt_missing_dir(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good_jpg = _save(noisy, tmp_path / "good.jpg")
    good_png = _save(noisy, tmp_path / "good.png")
    trunc_jpg = tmp_path / "trunc.jpg"
    trunc_jpg.write_bytes(open(good_jpg, "rb").read()[:1500])
    trunc_png = tmp_path / "trunc.png"
    trunc_png.write_bytes(open(good_png, "rb").read()[:3000])
    corrupt = tmp_path / "corrupt.png"
    data = bytearray(open(good_png, "rb").read())
    data[100:400] = b"\x00" * 300  # CRC and zlib stream both broken
    corrupt.write_bytes(bytes(data))
    text = tmp_path / "notes.png"
    text.write_text("hello, not an image\n")
    (tmp_path / "adir.jpg").mkdir()
    expect = {
        empty: "empty",
        trunc_jpg: "truncated",
        trunc_png: "truncated",
        corrupt: "",
        text: "not a recognised image",
        tmp_path / "missing.jpg": "not found",
        tmp_path / "adir.jpg": "directory",
    }
    for path, words in expect.items():
        with pytest.raises(MediaError) as ei:
            load_image(path)
        _assert_one_line(ei.value, path.name)
        assert words in str(ei.value)
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")


def test_unreadable_file(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "secret.png")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root ignores file modes
        os.chmod(path, 0)
        try:
            with pytest.raises(MediaError, match="secret.png: permission denied"):
                load_image(path)
        finally:
            os.chmod(path, 0o644)

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(media_image, "open", deny, raising=False)  # shadows the builtin inside the module
    with pytest.raises(MediaError, match="secret.png: permission denied"):
        load_image(path)


# ----------------------------------------------------------------------------------------------------------
# video
# ----------------------------------------------------------------------------------------------------------

N_FRAMES, RATE = 20, 10


def _codec() -> str:
    for name in ("libx264", "mpeg4"):
        if name in av.codecs_available:
            return name
    pytest.skip("no usable video encoder in this av build")


def _level(i: int) -> int:
    return i * 12  # gray level that encodes the frame index


def _write_video(path: str, frames, faststart: bool = False) -> str:
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(path, "w", options=opts) as out:
        stream = out.add_stream(_codec(), rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("vid") / "clip.mp4")
    return _write_video(path, (np.full((48, 64, 3), _level(i), np.uint8) for i in range(N_FRAMES)))


def _check(frames, indices):
    assert [f.index for f in frames] == indices
    for f in frames:
        assert f.time_s == round(f.index / RATE, 3)
        assert f.image.mode == "RGB" and f.image.size == (64, 48)
        assert abs(f.image.getpixel((32, 24))[0] - _level(f.index)) <= 8


def test_stream_facts(video):
    """The container-level facts sampling relies on (read from the header, no decoding)."""
    with media_video._open_video(video) as container:
        info = media_video._stream_facts(container, media_video._video_stream(container, video))
    assert info.fps == pytest.approx(RATE)
    assert info.duration_s == pytest.approx(2.0, abs=0.11)
    assert info.n_frames_estimate == N_FRAMES


def test_sample_every(video):
    _check(list(sample_frames(video, every=3)), [0, 3, 6, 9, 12, 15, 18])
    _check(list(sample_frames(video, every=3, max_frames=2)), [0, 3])
    _check(list(sample_frames(video, every=1)), list(range(N_FRAMES)))


def test_sample_fps(video):
    _check(list(sample_frames(video, fps=2)), [0, 5, 10, 15])
    _check(list(sample_frames(video, fps=3)), [0, 4, 7, 10, 14, 17])  # first frame at/after k/3 s
    _check(list(sample_frames(video, fps=100)), list(range(N_FRAMES)))  # faster than the video: all
    _check(list(sample_frames(video, fps=1, max_frames=1)), [0])


def test_sample_even_spread_and_default(video):
    _check(list(sample_frames(video, max_frames=4)), [0, 6, 13, 19])
    frames = list(sample_frames(video))
    assert len(frames) == DEFAULT_MAX_FRAMES
    _check(frames, [0, 3, 5, 8, 11, 14, 16, 19])
    _check(list(sample_frames(video, max_frames=50)), list(range(N_FRAMES)))


def test_sample_bad_arguments(video):
    for kw in ({"fps": 0}, {"every": 0}, {"max_frames": 0}, {"fps": 1, "every": 2}):
        with pytest.raises(ValueError):
            sample_frames(video, **kw)


def test_truncated_and_broken_videos(tmp_path):
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(N_FRAMES)]
    # faststart puts the index first, so half a file still opens and decodes its first frames
    full = _write_video(str(tmp_path / "noise.mp4"), noise, faststart=True)
    data = open(full, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(MediaError) as ei:
        for fr in sample_frames(str(cut), every=1):
            got.append(fr.index)
    _assert_one_line(ei.value, "cut.mp4")
    assert "truncated" in str(ei.value)
    assert 0 < len(got) < N_FRAMES and got == list(range(len(got)))

    # default muxing puts the index at the end: half a file is unreadable from the start
    plain = _write_video(str(tmp_path / "plain.mp4"), noise)
    half = tmp_path / "half.mp4"
    half.write_bytes(open(plain, "rb").read()[: os.path.getsize(plain) // 2])
    for path in (half, tmp_path / "none.mp4"):
        with pytest.raises(MediaError) as ei:
            list(sample_frames(str(path)))
        _assert_one_line(ei.value, path.name)
    text = tmp_path / "fake.mp4"
    text.write_text("not a video at all" * 10)
    with pytest.raises(MediaError, match="fake.mp4"):
        list(sample_frames(str(text)))


def test_mkv_without_frame_count_and_rotation(tmp_path):
    frames = [np.full((48, 64, 3), _level(i), np.uint8) for i in range(N_FRAMES)]
    mkv = _write_video(str(tmp_path / "clip.mkv"), frames)
    _check(list(sample_frames(mkv, max_frames=4)), [0, 6, 13, 19])  # count comes from a demux pass

    strip = np.zeros((48, 64, 3), np.uint8)
    strip[:, :16] = 255  # white strip on the left
    path = str(tmp_path / "rot.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream(_codec(), rate=RATE)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise, like a phone held sideways
        for packet in stream.encode(av.VideoFrame.from_ndarray(strip, format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    (fr,) = list(sample_frames(path, every=1))
    assert fr.image.size == (48, 64)
    assert fr.image.getpixel((24, 60))[0] > 200 and fr.image.getpixel((24, 3))[0] < 50  # left -> bottom


def test_expand_video(video):
    item = Item(id="clips/clip.mp4", source=video, kind="video", question="what?")
    pairs = list(expand_video(item, every=10))
    assert [it.id for it, _ in pairs] == ["clips/clip.mp4#0", "clips/clip.mp4#10"]
    it, fr = pairs[1]
    assert (it.kind, it.frame, it.time_s, it.question, it.source) == ("frame", 10, 1.0, "what?", video)
    assert fr.index == 10
    with pytest.raises(ValueError):
        list(expand_video(Item(id="x", source="x.png", kind="image")))


# ----------------------------------------------------------------------------------------------------------
# input enumeration
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A small photo tree; cwd is tmp_path so relative paths work."""
    monkeypatch.chdir(tmp_path)
    files = [
        "data/b.jpg",
        "data/a/Z.PNG",
        "data/a.jpg",
        "data/é/ünï.webp",
        "data/clip.MP4",
        "data/notes.txt",
        "data/.hidden.jpg",
        "data/.cache/x.jpg",
        "data/sub/deep/c.gif",
    ]
    for f in files:
        os.makedirs(os.path.dirname(f), exist_ok=True)
        with open(f, "wb") as fh:
            fh.write(b"x")  # enumeration never decodes
    return tmp_path


def _ids(rows):
    return [r.id for r in rows]


def test_walk_sorted_filtered(tree, caplog):
    with caplog.at_level(logging.DEBUG, logger="m3cli.media"):
        rows = list(iter_inputs(["data"]))
    assert _ids(rows) == [
        "data/a/Z.PNG",  # path-component order: "a" < "a.jpg"
        "data/a.jpg",
        "data/b.jpg",
        "data/clip.MP4",
        "data/sub/deep/c.gif",
        "data/é/ünï.webp",
    ]
    assert all(isinstance(r, Item) for r in rows)
    assert [r.kind for r in rows] == ["image", "image", "image", "video", "image", "image"]
    assert rows[0].source == os.path.join("data", "a", "Z.PNG")
    assert "skipped non-media file" in caplog.text and "notes.txt" in caplog.text
    assert _ids(iter_inputs(["./data/"])) == _ids(rows)  # normalised
    assert _ids(iter_inputs([str(tree / "data")]))[0] == str(tree / "data/a/Z.PNG")


def test_mixed_paths_missing_and_duplicates(tree):
    rows = list(iter_inputs(["data/b.jpg", "nope.jpg", "data/sub", "./data/b.jpg", "data/b.jpg"]))
    assert _ids(rows) == ["data/b.jpg", "nope.jpg", "data/sub/deep/c.gif", "data/b.jpg~2", "data/b.jpg~3"]
    bad = rows[1]
    assert isinstance(bad, BadInput) and "nope.jpg" in bad.error and "\n" not in bad.error
    # explicitly named non-media and hidden files are still attempted (as images)
    rows = list(iter_inputs(["data/notes.txt", "data/.hidden.jpg"]))
    assert [(r.id, r.kind) for r in rows] == [("data/notes.txt", "image"), ("data/.hidden.jpg", "image")]


def test_stdin_paths(tree):
    stdin = io.StringIO("data/b.jpg\n\n   \ndata/sub\ndata/clip.MP4\nmissing.png\ndata/b.jpg\n")
    rows = list(iter_inputs(["-"], stdin=stdin))
    assert _ids(rows) == ["data/b.jpg", "data/sub/deep/c.gif", "data/clip.MP4", "missing.png", "data/b.jpg~2"]
    assert rows[2].kind == "video" and isinstance(rows[3], BadInput)


def test_stdin_jsonl(tree):
    lines = [
        json.dumps({"image": "data/a.jpg", "question": "What is it?", "tokens": 36, "id": "q1"}),
        json.dumps({"image": "data/b.jpg"}),
        '{"image": "data/b.jpg", "question": ',  # malformed
        json.dumps({"image": "data/b.jpg", "id": "q1"}),  # duplicate explicit id
        json.dumps({"question": "no image"}),
        json.dumps({"image": "data/b.jpg", "tokens": "many"}),
        json.dumps({"image": "data/sub", "question": "Q", "id": "set"}),
    ]
    rows = list(iter_inputs(["data/a.jpg", "-"], stdin=io.StringIO("\n".join(lines) + "\n")))
    # ids by content: a bad line by a hash of the line, a row with its own budget by the image and a hash of it
    assert _ids(rows) == ["data/a.jpg", "q1", "data/b.jpg", media_inputs.line_id(lines[2]), "q1~2",
                          media_inputs.line_id(lines[4]), "data/b.jpg~" + content_hash(None, "many", length=8),
                          "set/deep/c.gif"]  # fmt: skip
    q1 = rows[1]
    assert isinstance(q1, Item)
    assert (q1.source, q1.question, q1.tokens, q1.kind) == ("data/a.jpg", "What is it?", 36, "image")
    assert isinstance(rows[3], BadInput) and "line 3" in rows[3].error and "JSON" in rows[3].error
    assert isinstance(rows[5], BadInput) and "image" in rows[5].error
    assert isinstance(rows[6], BadInput) and "tokens" in rows[6].error
    assert rows[7].question == "Q" and rows[7].source == os.path.join("data/sub", "deep", "c.gif")


def test_unreadable_directory_is_bad_input(tree, monkeypatch):
    real = os.scandir

    def scandir(path):
        if os.path.basename(path) == "deep":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(media_inputs.os, "scandir", scandir)
    rows = list(iter_inputs(["data/sub", "data/b.jpg"]))
    assert _ids(rows) == ["data/sub/deep", "data/b.jpg"]
    assert isinstance(rows[0], BadInput) and "Permission denied" in rows[0].error


def test_id_suffix_never_collides():
    rows = [Item(id=i, source=i, kind="image") for i in ["a", "a~2", "a", "a"]]
    assert _ids(media_inputs.unique_ids(rows)) == ["a", "a~2", "a~3", "a~4"]


def test_media_kind():
    assert media.media_kind("x/Y.JPEG") == "image"
    assert media.media_kind("x.gif") == "image"
    assert media.media_kind("x.MkV") == "video"
    assert media.media_kind("x.ts") is None and media.media_kind("README") is None


def test_media_import_leaves_pyav_unloaded_and_errors_are_m3_errors():
    import subprocess

    code = "import sys, m3cli.media; m3cli.media.load_image; print('av' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `m3 ask x.png` must not pay for loading FFmpeg
    from m3cli import errors

    assert issubclass(MediaError, errors.M3Error) and MediaError is errors.MediaError
    assert str(MediaError("a.png:\n  broken\tfile")) == "a.png: broken file"
