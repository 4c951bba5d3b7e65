"""People's wording and people's pictures: the phrasings, the drawings, `m3 eval --phrasing/--drawings` and
training on both (`phrasing_rate`, `pool_drawings`)."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from m3cli.cli import cli
from m3cli.data import drawings as dr
from m3cli.data import phrasings as ph
from m3cli.data import scenes as sc
from m3cli.eval.synthetic import _items, evaluate, export_scenes


def _expansions(family: str, frames, kinds, quadrants) -> set[str]:
    """Every sentence a frame list can make (all spellings, slot values and synonyms), lower-case, no final
    punctuation."""
    out = set()
    slots = {
        "cw": ph.SPELLINGS,
        "colour": sc.COLOUR_NAMES,
        "a_colour": [f"{'an' if c[0] in 'aeiou' else 'a'} {c}" for c in sc.COLOUR_NAMES],
        "q": [w for q in sc.QUADRANTS for w in quadrants[q]],
        "kind": [w for k in sc.KINDS for w in kinds[k]],
    }
    for frame in frames:
        names = sorted(set(re.findall(r"\{(\w+)\}", frame)))
        for values in itertools.product(*(slots[n] for n in names)):
            out.add(frame.format(**dict(zip(names, values, strict=True))).rstrip("?."))
    return out


def _all_train(family):
    return _expansions(family, ph.TRAIN[family], ph.KIND_WORDS, ph.QUADRANT_WORDS)


def _normal(question: str) -> str:
    """Undo the surface variant: lower case, final punctuation (and a space before it) dropped."""
    return question.lower().rstrip("?.").rstrip()


@pytest.mark.parametrize("family", sorted(ph.TRAIN))
def test_each_family_has_many_phrasings_and_its_template_among_them(family):
    train, held = ph.counts()[family]
    assert train >= 10 and held >= 5
    assert len(set(ph.TRAIN[family])) == train and len(set(ph.HELD_OUT[family])) == held
    if family != sc.DESCRIBE:
        slots = {"cw": "colour", "a_colour": "{article} {colour}", "q": "{quadrant}", "kind": "{kind}",
                 "colour": "{colour}"}
        assert ph.TRAIN[family][0].format(**slots) == sc.TEMPLATES[family]
    else:
        assert set(sc.DESCRIBE_QUESTIONS) <= set(ph.TRAIN[family])
    words = re.sub(r"\{\w+\}", " ", " ".join(ph.TRAIN[family] + ph.HELD_OUT[family])).split()
    assert "colour" not in words and "color" not in words  # the spelling is a slot: both in every frame


@pytest.mark.parametrize("family", sorted(ph.TRAIN))
def test_held_out_sentences_never_occur_in_training(family):
    train = _all_train(family)
    held = _expansions(family, ph.HELD_OUT[family], {k: ph.KIND_WORDS[k] + ph.HELD_OUT_KINDS[k] for k in sc.KINDS},
                       {q: ph.QUADRANT_WORDS[q] + ph.HELD_OUT_QUADRANTS[q] for q in sc.QUADRANTS})
    assert held and not held & train
    # nor with a held-out synonym inside a training frame: training never uses those words
    assert not {w for ws in ph.HELD_OUT_KINDS.values() for w in ws} & {w for ws in ph.KIND_WORDS.values() for w in ws}


def test_rephrase_keeps_family_slots_and_answer():
    rng = np.random.default_rng(0)
    seen_case, seen_spelling = set(), set()
    for i in range(40):
        s = sc.sample("test", i)
        for qa in (*sc.all_questions(s.scene), s.describe):
            for held_out in (False, True):
                new = ph.rephrase(qa, rng, held_out)
                assert (new.family, new.answer) == (qa.family, qa.answer)
                text = _normal(new.question)
                if not held_out:
                    assert text in _all_train(qa.family)
                slots = ph.template_slots(qa)
                if "colour" in slots:
                    assert slots["colour"] in text
                seen_case.add("upper" if new.question.isupper() else new.question[0].isupper())
                seen_spelling.update(w for w in ph.SPELLINGS if w in text.split())
    assert seen_case == {"upper", True, False} and seen_spelling == {"colour", "color"}
    with pytest.raises(ValueError, match="template"):
        ph.template_slots(sc.QA("count", "count the shapes.", "two"))


def test_drawings_are_deterministic_scenes_at_other_sizes():
    sizes, big, coloured = set(), 0, 0
    for i in range(60):
        d = dr.drawing("train", i)
        assert d == dr.drawing("train", i)
        image = dr.render(d)
        assert image.size == (d.size, d.size) and image.mode == "RGB"
        sizes.add(d.size)
        colours = {s.colour for s in d.scene.shapes} | ({d.scene.glyph.colour} if d.scene.glyph else set())
        assert d.scene.background not in colours
        big += any(s.x1 - s.x0 > 13 for s in d.scene.shapes)
        if d.scene.background not in sc.BACKGROUNDS:
            coloured += 1
            assert not dr.drawing_labels(d.scene)["background"].any()
        s = dr.sample("train", i)
        assert s.scene == d.scene and s.qas[0] == sc.QA("background", sc.TEMPLATES["background"], d.scene.background)
    assert sizes == set(dr.SIZES) and big > 10 and coloured > 3
    assert dr.drawing("test", 0) != dr.drawing("train", 0)


def test_a_drawing_shows_its_scene():
    """A large drawing, reduced to 48 px, has the scene's colours where its 48-unit layout puts them."""
    checked = 0
    for i in range(40):
        d = dr.drawing("test", i)
        shapes = [s for s in d.scene.shapes if s.kind != "triangle"]  # a triangle's box centre may be bare
        if d.size < 224 or not shapes:
            continue
        arr = np.asarray(dr.render(d).resize((48, 48), resample=3)).astype(int)
        s = max(shapes, key=lambda s: s.x1 - s.x0)
        cx, cy = (s.x0 + s.x1) // 2, (s.y0 + s.y1) // 2
        assert np.abs(arr[cy, cx] - np.array(sc.COLOURS[s.colour])).max() < 40
        checked += 1
    assert checked >= 5


def test_eval_items_template_default_is_unchanged_and_phrasings_ask_the_same():
    template = _items("test", 60, None)
    assert [(i.id, i.prompt) for i in template] == [
        (f"test-{s.index:05d}-{qa.family}", qa.question) for s, qa in sc.iter_questions("test", 60)]
    for phrasing in ("train", "held-out"):
        items = _items("test", 60, None, phrasing)
        assert [(i.id, i.payload.answer) for i in items] == [(i.id, i.payload.answer) for i in template]
        assert [i.prompt for i in items] == [i.prompt for i in _items("test", 60, None, phrasing)]  # deterministic
        assert sum(i.prompt != t.prompt for i, t in zip(items, template, strict=True)) > 40
    held = _items("test", 60, None, "held-out")
    assert all(_normal(i.prompt) not in _all_train(i.payload.family) for i in held)
    drawn = _items("test", 12, None, drawn=True)
    assert all(i.id.startswith("test-drawing-") for i in drawn)
    assert drawn[0].load().size == (dr.drawing("test", 0).size,) * 2


def test_evaluate_counts_capped_answers(tiny_backend):
    report = evaluate(tiny_backend, split="test", n=6, scales=[1, 9], max_new_tokens=2, phrasing="held-out",
                      drawn=True)
    assert report.questions == "held-out phrasings, drawings" and "held-out phrasings" in report.label
    counted = report.to_dict()["capped"]
    assert set(counted) == set(report.families)
    for s in (1, 9):
        capped = sum(len(r.logprobs[s]) >= 2 for r in report.records)
        assert sum(counted[f][str(s)] for f in counted) == report.capped(s) == capped


def test_eval_cli_phrasing_and_drawings(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "-n", "6", "--tokens", "1",
                                   "--phrasing", "held-out", "--drawings", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "(held-out phrasings, drawings)" in res.stdout
    data = json.loads(out.read_text())
    assert data["questions"] == "held-out phrasings, drawings" and "capped" in data
    res = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--phrasing", "nope"])
    assert res.exit_code == 2
    res = CliRunner().invoke(cli, ["eval", "--data", str(tmp_path / "x.jsonl"), "--phrasing", "train"])
    assert res.exit_code == 2 and "--data" in res.stderr
    path, rows, images = export_scenes(tmp_path / "exp", n=12, phrasing="train", drawn=True)
    lines = [json.loads(line) for line in open(path)]
    assert rows == 12 and images == len({r["image"] for r in lines})
    assert all(r["image"].startswith("images/test-drawing-") for r in lines)
    assert (tmp_path / "exp" / lines[0]["image"]).is_file()


TINY = """
name: tiny-phrasings
seed: 5
model: {vision_hidden: 32, vision_layers: 2, vision_heads: 2, text_hidden: 32, text_layers: 1,
        text_heads: 2, text_kv_heads: 2, text_intermediate: 64}
pool_images: 8
pool_drawings: 6
checkpoint_every: 1
stages:
  m3: {kind: m3, steps: 2, batch: 4, lr: 0.001, scales: [576, 9, 1], describe_rate: 0.5, phrasing_rate: 0.7}
"""


def test_training_pools_drawings_and_asks_in_training_phrasings(tmp_path):
    import torch

    from m3cli.train.config import ConfigError, load_config
    from m3cli.train.trainer import Trainer

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    config = load_config(path)
    assert config.pool_drawings == 6 and config.stages["m3"].phrasing_rate == 0.7
    trainer = Trainer(config, tmp_path / "run")
    trainer.ensure_features()
    assert trainer.features.shape[0] == 14 and len(trainer.pool_qas) == 14
    d = dr.drawing("train", 3)
    assert trainer.pool_qas[8 + 3] == sc.all_questions(d.scene)
    assert trainer.pool_descriptions[8 + 3] == sc.description(d.scene)
    idx = np.array([0, 9, 12])
    # rate 0 draws nothing more: the packs of earlier recipes are unchanged
    assert trainer.step_questions(idx, np.random.default_rng(1), 0.0, 0.0) == [list(trainer.pool_qas[i]) for i in idx]
    qas = trainer.step_questions(idx, np.random.default_rng(1), 1.0, 0.7)
    templates = [q for i in idx for q in trainer.pool_qas[i]]
    asked = [q for image_qas in qas for q in image_qas if q.family != sc.DESCRIBE]
    assert [(q.family, q.answer) for q in asked] == [(q.family, q.answer) for q in templates]
    rephrased = [q for q, t in zip(asked, templates, strict=True) if q.question != t.question]
    assert len(rephrased) > len(asked) // 3
    assert all(_normal(q.question) in _all_train(q.family) for q in rephrased)
    res = CliRunner().invoke(cli, ["train", "--config", str(path), "--out", str(tmp_path / "b"), "--no-progress"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["drawings"] == 6 and log[-1]["stage"] == "m3"
    # a drawing reaches the tower as the trained model's own image processor brings any user image to it
    from m3cli.backends.torch import TorchBackend
    from m3cli.train.trainer import to_pixels

    backend = TorchBackend(str(tmp_path / "b" / "final"), device="cpu")
    for i in range(6):
        image = dr.render(dr.drawing("train", i))
        served = backend.pixel_values([image])
        assert torch.allclose(to_pixels([trainer.tower_input(image)], trainer.spec), served, atol=1e-6)
    path.write_text(TINY.replace("phrasing_rate: 0.7", "phrasing_rate: 1.5"))
    with pytest.raises(ConfigError, match="phrasing_rate must be between 0 and 1"):
        load_config(path)
