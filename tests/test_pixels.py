"""The pixels a model sees equal its own recipe's, for every image a user brings (no model needed here).

Against the reference in ``pixel_cases`` (the original LLaVA code's steps: ``Image.open(p).convert('RGB')``, then
``expand2square`` / CLIP's resize and crop, or LLaVA-NeXT's anyres crops) at the real 336 px geometry with
LLaVA-1.6's pinpoints: EXIF-rotated JPEGs (orientations 2-8), RGBA / LA / palette-with-transparency PNGs, 16-bit
grey, CMYK JPEG and TIFF, and images of 2049 to 8000 px on a side. Then ``--upright``, ``--alpha-background`` and
``--fast-decode`` change exactly what they say, rows record it, and the notes come once per run. The same pixels
through both backends, on tiny real-layout models: ``test_pixels_backends.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pixel_cases as pc
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from m3cli.families.llava15 import Llava15Family
from m3cli.families.llavanext import LlavaNextFamily
from m3cli.families.preprocess import pixel_array
from m3cli.families.spec import FamilySpec, ImageSpec
from m3cli.media import PIXEL_FIELDS, ImageNotes, ImageOptions, MediaError, load_image, open_image, parse_colour
from m3cli.output import ROW_KEYS

V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # as the original config writes them
CLIP = ImageSpec(size=336, shortest_edge=336, patch_size=14)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return pc.small_cases(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return pc.large_cases(tmp_path_factory.mktemp("large"))


def _spec(preprocess: str, family: str = "llava15", **extra) -> FamilySpec:
    return FamilySpec(name=f"{family}-test", family=family, layout="hf", preprocess=preprocess, image=CLIP,
                      prompt_recipe="vicuna_v1", model_dir=Path("real-geometry"), architecture="test", **extra)


def llava15(preprocess: str) -> Llava15Family:
    """LLaVA-1.5 at CLIP-L/14-336 (``pad``: the original checkpoints and M3; ``crop``: llava-hf's processor)."""
    return Llava15Family(_spec(preprocess))


def next_family(flavour: str) -> LlavaNextFamily:
    """LLaVA-NeXT at 336 with LLaVA-1.6's pinpoints; detection turns the original's [w, h] pairs into (h, w)."""
    hw = [(a, b) for a, b in V16_PINPOINTS] if flavour == "hf" else [(b, a) for a, b in V16_PINPOINTS]
    return LlavaNextFamily(_spec("anyres", "llavanext", grid_pinpoints=tuple(hw), anyres_flavour=flavour))


def _assert_family_pixels(path, image: Image.Image) -> None:
    """``image`` (what m3 decoded from ``path``) gives the recipe's crops at 336 for pad, crop and anyres."""
    want_image = pc.recipe_image(path)
    for preprocess in ("pad", "crop"):
        got = np.asarray(llava15(preprocess).crops(image)[0])
        want = pc.tower_uint8(want_image, CLIP.mean, 336, pad=preprocess == "pad")
        np.testing.assert_array_equal(got, want, err_msg=f"{path.name} {preprocess}")
        np.testing.assert_allclose(pixel_array(Image.fromarray(got), CLIP), pc.normalise(want, CLIP.mean, CLIP.std),
                                   atol=1e-6)
    for flavour, order in (("hf", "hw"), ("original", "wh")):
        got = [np.asarray(c) for c in next_family(flavour).crops(image)]
        want = pc.next_crops_uint8(want_image, V16_PINPOINTS, order, 336)
        assert len(got) == len(want), (path.name, flavour)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=f"{path.name} anyres {flavour}")


# --------------------------------------------------------------------------- the default is the recipe


def test_every_small_kind_decodes_as_the_recipe_and_gives_its_crops(small):
    for name, path in small.items():
        picture = open_image(path)
        np.testing.assert_array_equal(np.asarray(picture.image), np.asarray(pc.recipe_image(path)), err_msg=name)
        _assert_family_pixels(path, picture.image)
        fields = picture.fields()
        assert fields["upright"] is (False if name.startswith("exif") else None), name
        assert fields["alpha"] == ("dropped" if name in ("rgba", "la", "palette") else None), name
        assert fields["decode_scale"] is None


def test_large_images_are_not_resized_before_the_recipe(large):
    for name, path in large.items():
        image = load_image(path)
        with Image.open(path) as im:
            assert image.size == im.size, name  # no pre-shrink, no JPEG draft decoding
        np.testing.assert_array_equal(np.asarray(image), np.asarray(pc.recipe_image(path)), err_msg=name)
        _assert_family_pixels(path, image)


def test_stored_colours_under_transparency_are_what_the_model_sees(small):
    with Image.open(small["rgba"]) as im:
        stored = np.asarray(im)[..., :3]
    np.testing.assert_array_equal(np.asarray(load_image(small["rgba"])), stored)  # alpha 0 included
    palette = np.asarray(load_image(small["palette"]))
    with Image.open(small["palette"]) as im:
        transparent = np.asarray(im) == 0
    assert transparent.any() and (palette[transparent] == (120, 0, 0)).all()  # index 0's own colour


def test_sixteen_bit_and_cmyk_convert_as_pillow_does(small):
    grey = np.asarray(load_image(small["gray16"]))
    assert list(grey[0, :8, 0]) == [0, 1, 100, 200, 255, 255, 255, 255]  # clipped at 255, as convert('RGB') does
    for name in ("cmyk-jpeg", "cmyk-tiff"):
        with Image.open(small[name]) as im:
            assert im.mode == "CMYK"
            want = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(load_image(small[name])), want)


def test_decompression_bombs_are_refused_not_resized(large, monkeypatch):
    path = large["jpeg-8000x2049"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000 * 2049 - 1)
    for options in (None, ImageOptions(fast_decode=True)):
        with pytest.raises(MediaError) as err:
            load_image(path, options)
        assert str(err.value) == f"{path}: refused, image too large (16392000 pixels > 16391999)"


# --------------------------------------------------------------------------- what the options change


@pytest.mark.parametrize("orientation", range(2, 9))
def test_upright_turns_by_the_exif_orientation_and_nothing_else(small, orientation):
    path = small[f"exif-{orientation}"]
    picture = open_image(path, ImageOptions(upright=True))
    with Image.open(path) as im:
        want = ImageOps.exif_transpose(im).convert("RGB")  # Pillow's own reading of the tag
    np.testing.assert_array_equal(np.asarray(picture.image), np.asarray(want))
    assert picture.image.size == ((36, 60) if orientation >= 5 else (60, 36))  # 5-8 swap the sides
    assert picture.fields() == {"upright": True, "alpha": None, "decode_scale": None}
    _assert_family_pixels_of(want, picture.image)


def _assert_family_pixels_of(want_image: Image.Image, image: Image.Image) -> None:
    """The families' crops of ``image`` equal the recipe's steps applied to ``want_image``."""
    for preprocess in ("pad", "crop"):
        np.testing.assert_array_equal(np.asarray(llava15(preprocess).crops(image)[0]),
                                      pc.tower_uint8(want_image, CLIP.mean, 336, pad=preprocess == "pad"))
    got = [np.asarray(c) for c in next_family("hf").crops(image)]
    want = pc.next_crops_uint8(want_image, V16_PINPOINTS, "hw", 336)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)) and len(got) == len(want)


def test_upright_leaves_other_images_alone(small):
    for name in ("rgba", "gray16", "cmyk-jpeg"):
        picture = open_image(small[name], ImageOptions(upright=True))
        np.testing.assert_array_equal(np.asarray(picture.image), np.asarray(pc.recipe_image(small[name])))
        assert picture.fields()["upright"] is None


@pytest.mark.parametrize("colour", ["white", "#204060"])
def test_alpha_background_composites_exactly_the_transparent_pixels(small, colour):
    rgb = parse_colour(colour)
    for name in ("rgba", "la", "palette"):
        path = small[name]
        picture = open_image(path, ImageOptions(alpha_background=colour))
        got = np.asarray(picture.image).astype(int)
        stored = np.asarray(pc.recipe_image(path)).astype(int)
        with Image.open(path) as im:
            fg = np.asarray(im.convert("RGBA")).astype(int)
        alpha = fg[..., 3:4]
        opaque, clear = alpha[..., 0] == 255, alpha[..., 0] == 0
        assert clear.any(), name
        np.testing.assert_array_equal(got[opaque], stored[opaque])  # opaque pixels: the recipe's
        assert (got[clear] == rgb).all(), name                       # transparent ones: the colour
        blend = (fg[..., :3] * alpha + np.asarray(rgb) * (255 - alpha)) / 255
        assert np.abs(got - blend).max() <= 1, name                  # the rest: alpha-blended
        assert picture.fields() == {"upright": None, "alpha": "#ffffff" if colour == "white" else "#204060",
                                    "decode_scale": None}
    for name in ("exif-3", "gray16", "cmyk-tiff"):  # nothing transparent: nothing changes
        picture = open_image(small[name], ImageOptions(alpha_background=colour))
        np.testing.assert_array_equal(np.asarray(picture.image), np.asarray(pc.recipe_image(small[name])))
        assert picture.fields()["alpha"] is None


def test_both_options_on_a_turned_transparent_png(tmp_path):
    rgba = Image.fromarray(np.dstack([pc.pattern(30, 20), np.where(pc.pattern(30, 20)[..., 0] > 128, 255, 0)])
                           .astype(np.uint8), "RGBA")
    exif = Image.Exif()
    exif[pc.ORIENTATION] = 6
    path = tmp_path / "turned.png"
    rgba.save(path, exif=exif)
    assert open_image(path).fields() == {"upright": False, "alpha": "dropped", "decode_scale": None}
    picture = open_image(path, ImageOptions(upright=True, alpha_background="black"))
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    np.testing.assert_array_equal(np.asarray(picture.image), np.asarray(flat.transpose(Image.Transpose.ROTATE_270)))
    assert picture.fields() == {"upright": True, "alpha": "#000000", "decode_scale": None}


def test_fast_decode_reduces_large_jpegs_only_and_says_so(small, large):
    for name, path in large.items():
        picture = open_image(path, ImageOptions(fast_decode=True))
        with Image.open(path) as im:
            w, h = im.size
        if name.startswith("jpeg"):  # both short sides (2049) are over twice the 1008 px floor: halved
            assert picture.fields()["decode_scale"] == 0.5 and picture.image.size == ((w + 1) // 2, (h + 1) // 2)
        else:  # a PNG is decoded whole
            assert picture.fields()["decode_scale"] is None
            np.testing.assert_array_equal(np.asarray(picture.image), np.asarray(pc.recipe_image(path)))
        assert min(picture.image.size) >= 1008
    for path in (small["exif-6"], small["cmyk-jpeg"]):  # small JPEGs: decoded whole
        picture = open_image(path, ImageOptions(fast_decode=True))
        np.testing.assert_array_equal(np.asarray(picture.image), np.asarray(pc.recipe_image(path)))


def test_colours_and_options_objects():
    assert parse_colour("white") == (255, 255, 255) and parse_colour(" #0a0B0c ") == (10, 11, 12)
    assert parse_colour("grey") == (128, 128, 128) and parse_colour("#fff") == (255, 255, 255)
    for bad in ("nope", "#12345", "#11223344", ""):
        with pytest.raises(ValueError):
            parse_colour(bad)
    assert ImageOptions().exact and ImageOptions().record() == {}
    opts = ImageOptions(upright=True, alpha_background="white", fast_decode=True)
    assert not opts.exact and opts.alpha_background == (255, 255, 255)
    assert opts.record() == {"upright": True, "alpha_background": "#ffffff", "fast_decode": True}
    assert ImageOptions(alpha_background=(1, 2, 3)) == ImageOptions(alpha_background="#010203")
    with pytest.raises(ValueError):
        ImageOptions(alpha_background=(1, 2, 300))
    assert set(PIXEL_FIELDS) <= set(ROW_KEYS)


def test_notes_once_per_kind():
    said: list[str] = []
    notes = ImageNotes(said.append)
    notes.see({"upright": None, "alpha": None}, "plain.png")
    assert said == []
    notes.see({"upright": False, "alpha": "dropped"}, "a.jpg")
    notes.see({"upright": False, "alpha": "dropped"}, "b.png")
    notes.see({"upright": True, "alpha": "#ffffff"}, "c.png")
    assert len(said) == 2 and "a.jpg" in said[0] and "--upright" in said[0] and "--alpha-background" in said[1]
    ImageNotes(None).see({"upright": False}, "quiet.jpg")  # no sink: nothing to say, nothing raised


# --------------------------------------------------------------------------- the commands


def _run(*args, input=None):
    return CliRunner().invoke(__import__("m3cli.cli", fromlist=["cli"]).cli, [str(a) for a in args], input=input,
                              catch_exceptions=False)


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "noted once per run" in line]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two turned JPEGs, two transparent PNGs, a plain PNG."""
    root = tmp_path_factory.mktemp("inputs")
    pc.exif_jpeg(root, 6)
    pc.exif_jpeg(root, 3)
    pc.rgba_png(root)
    pc.palette_png(root)
    Image.fromarray(pc.pattern(30, 30)).save(root / "plain.png")
    return root


def test_batch_rows_record_what_was_done_and_the_notes_come_once(folder, tiny_model_dir, tmp_path):
    args = ["batch", folder, "-m", tiny_model_dir, "--tokens", 1, "--max-new-tokens", 1]
    res = _run(*args)
    assert res.exit_code == 0, res.output
    rows = {Path(r["source"]).name: r for r in map(json.loads, res.stdout.splitlines())}
    assert [(rows[n]["upright"], rows[n]["alpha"], rows[n]["decode_scale"]) for n in sorted(rows)] == [
        (False, None, None), (False, None, None), (None, "dropped", None), (None, None, None),
        (None, "dropped", None)]  # exif-3, exif-6, palette, plain, rgba
    notes = _notes(res.stderr)
    assert len(notes) == 2 and "--upright" in notes[0] and "--alpha-background" in notes[1]
    assert "upright" not in rows["plain.png"]["run"]

    out = tmp_path / "rows.jsonl"
    res = _run(*args, "--upright", "--alpha-background", "white", "-o", out)
    assert res.exit_code == 0, res.output
    rows = {Path(r["source"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["exif-6.jpg"]["upright"] is True and rows["rgba.png"]["alpha"] == "#ffffff"
    assert rows["plain.png"]["upright"] is None and rows["plain.png"]["alpha"] is None
    assert rows["plain.png"]["run"]["upright"] is True and rows["plain.png"]["run"]["alpha_background"] == "#ffffff"
    assert _notes(res.stderr) == []
    res = _run(*args, "--resume", "-o", out)  # the same rows without the options would be other pixels
    assert res.exit_code == 2 and "--upright true (this run: none)" in res.stderr


def test_ask_json_records_the_options_and_notes(folder, tiny_model_dir):
    base = ["ask", folder / "rgba.png", "what is this?", "-m", tiny_model_dir, "--tokens", 1, "--max-new-tokens", 1,
            "--json"]
    res = _run(*base)
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)
    assert (row["upright"], row["alpha"], row["decode_scale"]) == (None, "dropped", None)
    assert len(_notes(res.stderr)) == 1
    res = _run(*base, "--alpha-background", "#00ff00")
    assert json.loads(res.stdout)["alpha"] == "#00ff00" and _notes(res.stderr) == []
    res = _run(*base, "--alpha-background", "greenish")
    assert res.exit_code == 2 and "unknown colour 'greenish'" in res.stderr


def test_eval_data_samples_record_the_options(folder, tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": str(folder / name), "question": "what is this?", "answer": "x"})
                            + "\n" for name in ("exif-6.jpg", "exif-3.jpg", "rgba.png", "plain.png")))
    samples = tmp_path / "samples.jsonl"
    base = ["eval", "--data", data, "-m", tiny_model_dir, "--tokens", "1,9", "--max-new-tokens", 1,
            "--samples", samples]
    res = _run(*base)
    assert res.exit_code == 0, res.output
    assert len(_notes(res.stderr)) == 2
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(s["upright"], s["alpha"]) for s in lines] == [(False, None), (False, None), (None, "dropped"),
                                                             (None, None)]
    assert all("image_options" not in s for s in lines)
    res = _run(*base, "--resume", "--upright")
    assert res.exit_code == 2 and "other image options (none; this run: --upright)" in res.stderr
    res = _run(*base, "--upright")  # the samples hold results: replaced only on request
    assert res.exit_code == 2 and "--overwrite replaces it" in res.stderr
    res = _run(*base, "--upright", "--overwrite")
    assert res.exit_code == 0 and _notes(res.stderr)[0].count("--alpha-background") == 1
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert lines[0]["upright"] is True and lines[0]["image_options"] == {"upright": True}
