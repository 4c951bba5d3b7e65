"""Tests for the synthetic scene generator (m3cli.data.scenes)."""

from __future__ import annotations

import io
import itertools
from collections import Counter

import numpy as np
import pytest

from m3cli.data import scenes as sc

N = 300


@pytest.fixture(scope="module")
def samples() -> list[sc.Sample]:
    return [sc.sample("train", i) for i in range(N)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(name: str) -> np.ndarray:
    table = sc.COLOURS if name in sc.COLOURS else sc.BACKGROUNDS
    return np.array(table[name], dtype=np.int64)


def test_palettes_disjoint_and_distinct():
    assert not set(sc.COLOURS) & set(sc.BACKGROUNDS)
    rgbs = [np.array(c, float) for c in (*sc.COLOURS.values(), *sc.BACKGROUNDS.values())]
    assert len({tuple(c) for c in rgbs}) == len(rgbs)
    for a, b in itertools.combinations(rgbs, 2):
        assert np.linalg.norm(a - b) > 100
    assert 5 <= len(sc.COLOURS) <= 7 and 4 <= len(sc.KINDS) <= 5 and len(sc.GLYPHS) == 8
    assert sc.FAMILIES == ("background", "exists", "count", "corner", "colour_of", "letter")


def test_determinism_and_splits():
    for i in range(5):
        a, b = sc.sample("val", i), sc.sample("val", i)
        assert a == b
        assert _png(sc.render(a.scene)) == _png(sc.render(b.scene))
    train = [sc.sample("train", i).scene for i in range(10)]
    test = [sc.sample("test", i).scene for i in range(10)]
    assert train != test
    with pytest.raises(ValueError):
        sc.sample("dev", 0)


def test_render_format_and_resize():
    scene = sc.sample("test", 3).scene
    img = sc.render(scene)
    assert img.mode == "RGB" and img.size == (sc.IMAGE_SIZE, sc.IMAGE_SIZE)
    big = np.asarray(sc.render(scene, size=96))
    assert big.shape == (96, 96, 3)
    assert np.array_equal(big[::2, ::2], np.asarray(img))


def test_geometry_inside_and_non_overlapping(samples):
    counts = Counter()
    for s in samples:
        scene = s.scene
        assert 1 <= len(scene.shapes) <= sc.MAX_SHAPES
        counts[len(scene.shapes)] += 1
        boxes = []
        for sh in scene.shapes:
            assert sh.kind in sc.KINDS and sh.colour in sc.COLOURS and sh.size in sc.SIZES
            assert sh.x1 - sh.x0 == sh.y1 - sh.y0 == sc.SIZES[sh.size]
            boxes.append((sh.x0, sh.y0, sh.x1, sh.y1))
        if scene.glyph is not None:
            g = scene.glyph
            assert g.char in sc.GLYPHS and g.colour in sc.COLOURS
            boxes.append((g.x0, g.y0, g.x1, g.y1))
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= sc.IMAGE_SIZE and 0 <= y0 < y1 <= sc.IMAGE_SIZE
        for a, b in itertools.combinations(boxes, 2):
            gap_x = max(b[0] - a[2], a[0] - b[2])
            gap_y = max(b[1] - a[3], a[1] - b[3])
            assert max(gap_x, gap_y) >= 1, (s.index, a, b)
    assert set(counts) == set(range(1, 7))


def _expected_families(scene: sc.Scene) -> set[str]:
    fams = {"background", "exists", "count"}
    if any(n == 1 for n in Counter(sc.quadrant(s) for s in scene.shapes).values()):
        fams.add("corner")
    if any(n == 1 for n in Counter(s.kind for s in scene.shapes).values()):
        fams.add("colour_of")
    if scene.glyph is not None:
        fams.add("letter")
    return fams


def _quadrant(sh: sc.Shape) -> str:
    cx, cy = (sh.x0 + sh.x1 - 1) / 2, (sh.y0 + sh.y1 - 1) / 2  # centre pixel (odd sides)
    assert cx != 23.5 and cy != 23.5
    return ("top " if cy < 24 else "bottom ") + ("left" if cx < 24 else "right")


def test_answers_consistent(samples):
    numbers = ["one", "two", "three", "four", "five", "six"]
    for s in samples:
        scene = s.scene
        fams = [qa.family for qa in s.qas]
        assert fams == [f for f in sc.FAMILIES if f in fams]
        assert set(fams) == _expected_families(scene)
        for qa in s.qas:
            assert qa.question == qa.question.lower() and qa.answer in sc.answer_words(qa.family)
            assert len(qa.answer.split()) == 1
            if qa.family == "background":
                assert qa.answer == scene.background
            elif qa.family == "exists":
                colour = next(c for c in sc.COLOURS if f" {c} " in qa.question)
                present = any(sh.colour == colour for sh in scene.shapes)
                assert qa.answer == ("yes" if present else "no")
            elif qa.family == "count":
                assert qa.answer == numbers[len(scene.shapes) - 1]
            elif qa.family == "corner":
                quad = next(q for q in sc.QUADRANTS if qa.question.endswith(f"the {q}?"))
                inside = [sh for sh in scene.shapes if _quadrant(sh) == quad]
                assert len(inside) == 1 and qa.answer == inside[0].kind
            elif qa.family == "colour_of":
                kind = next(k for k in sc.KINDS if qa.question.endswith(f"the {k}?"))
                matching = [sh for sh in scene.shapes if sh.kind == kind]
                assert len(matching) == 1 and qa.answer == matching[0].colour
            elif qa.family == "letter":
                assert qa.answer == scene.glyph.char.lower()


def test_rates_and_coverage(samples):
    exists = [qa.answer for s in samples for qa in s.qas if qa.family == "exists"]
    assert 0.4 <= exists.count("yes") / len(exists) <= 0.6
    glyph_rate = sum(s.scene.glyph is not None for s in samples) / len(samples)
    assert 0.3 <= glyph_rate <= 0.5
    fams = Counter(qa.family for s in samples for qa in s.qas)
    assert set(fams) == set(sc.FAMILIES)
    answers = Counter(qa.answer for s in samples for qa in s.qas if qa.family == "corner")
    assert set(answers) == set(sc.KINDS)


def test_vocabulary_covers_text(samples):
    vocab = sc.vocabulary()
    assert vocab == sorted(set(vocab)) and vocab == sc.vocabulary()
    words = set()
    for s in samples:
        words.update(sc.split_words(sc.caption(s.scene)))
        for qa in s.qas:
            words.update(sc.split_words(qa.question))
            words.update(sc.split_words(qa.answer))
    assert words <= set(vocab)
    for fam in sc.FAMILIES:
        assert set(sc.answer_words(fam)) <= set(vocab)
    with pytest.raises(ValueError):
        sc.answer_words("nope")


def test_caption_mentions_everything():
    for i in range(20):
        scene = sc.sample("val", i).scene
        cap = sc.caption(scene)
        assert cap.startswith(f"{scene.background} background.")
        for sh in scene.shapes:
            assert f"{sh.size} {sh.colour} {sh.kind} {sc.quadrant(sh)}." in cap
        assert ("letter " in cap) == (scene.glyph is not None)


def test_pixel_labels_match_render():
    for i in range(40):
        scene = sc.sample("train", i).scene
        img = np.asarray(sc.render(scene)).astype(np.int64)
        objects = sc.object_map(scene)
        bg = _rgb(scene.background)
        for j, sh in enumerate(scene.shapes):
            mask = objects == j + 1
            assert mask.sum() >= 0.3 * (sh.x1 - sh.x0) ** 2
            assert (img[mask] == _rgb(sh.colour)).all()
        glyph_box = np.zeros_like(objects, dtype=bool)
        if scene.glyph is not None:
            g = scene.glyph
            glyph_box[g.y0 : g.y1, g.x0 : g.x1] = True
            ink = objects == len(scene.shapes) + 1
            assert ink.sum() >= 20
            col = _rgb(g.colour)
            d_ink = np.abs(img[ink] - col).sum(-1)
            d_bg = np.abs(img[ink] - bg).sum(-1)
            assert (d_ink <= d_bg).all()
        plain = (objects == 0) & ~glyph_box
        assert (img[plain] == bg).all()


def test_patch_labels_agree_with_pixels():
    names = sc.LABEL_NAMES
    for i in range(40):
        scene = sc.sample("val", i).scene
        labels = sc.patch_labels(scene)
        assert set(labels) == {"kind", "colour", "size", "glyph", "background"}
        for arr in labels.values():
            assert arr.shape == (sc.GRID, sc.GRID) and arr.dtype == np.int64
        assert (labels["background"] == names["background"].index(scene.background)).all()
        img = np.asarray(sc.render(scene)).astype(np.int64)
        patches = img.reshape(sc.GRID, 2, sc.GRID, 2, 3).transpose(0, 2, 1, 3, 4)
        patches = patches.reshape(sc.GRID, sc.GRID, 4, 3)
        bg = _rgb(scene.background)
        for r, c in itertools.product(range(sc.GRID), range(sc.GRID)):
            pix = patches[r, c]
            colour = labels["colour"][r, c]
            if colour:
                near = np.abs(pix - _rgb(names["colour"][colour])).sum(-1) < np.abs(pix - bg).sum(-1)
                assert near.sum() >= 2
            else:
                assert labels["kind"][r, c] == 0
                assert (np.abs(pix - bg).sum(-1) < 200).sum() >= 2
        kinds = {names["kind"][k] for k in np.unique(labels["kind"]) if k}
        expected = {sh.kind for sh in scene.shapes} | ({"letter"} if scene.glyph else set())
        assert kinds <= expected
        if scene.glyph is not None:
            glyph_ids = set(np.unique(labels["glyph"])) - {0}
            assert glyph_ids == {names["glyph"].index(scene.glyph.char.lower())}
            assert ((labels["glyph"] > 0) == (labels["kind"] == sc.GLYPH_KIND)).all()
        else:
            assert not labels["glyph"].any()
        assert ((labels["size"] > 0) == ((labels["kind"] > 0) & (labels["kind"] != sc.GLYPH_KIND))).all()
        for sh in scene.shapes:  # every shape (also small ones) owns at least a few patches
            cell = labels["kind"][sh.y0 // 2 : (sh.y1 + 1) // 2, sh.x0 // 2 : (sh.x1 + 1) // 2]
            assert (cell == sc.KINDS.index(sh.kind) + 1).sum() >= 4


def test_patch_labels_other_resolution():
    scene = sc.sample("train", 7).scene
    a = sc.patch_labels(scene)
    b = sc.patch_labels(scene, grid=24, size=96)
    for key in a:
        assert np.array_equal(a[key], b[key])
    with pytest.raises(ValueError):
        sc.patch_labels(scene, grid=25)


def test_iter_questions_balanced_and_stable():
    pairs = list(sc.iter_questions("val", 60))
    assert len(pairs) == 60
    fams = Counter(qa.family for _, qa in pairs)
    assert all(fams[f] == 10 for f in sc.FAMILIES)
    assert [(s.index, qa) for s, qa in pairs] == [(s.index, qa) for s, qa in sc.iter_questions("val", 60)]
    for s, qa in pairs:
        assert qa in s.qas and s == sc.sample("val", s.index)
    assert len({(s.index, qa.family) for s, qa in pairs}) == 60
    only = list(sc.iter_questions("test", 10, families=["letter", "count"]))
    assert [qa.family for _, qa in only] == ["letter", "count"] * 5
    with pytest.raises(ValueError):
        list(sc.iter_questions("test", 3, families=["bogus"]))
