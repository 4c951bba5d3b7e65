"""The open-question family: phrasings, descriptions, their scoring, `m3 eval --family describe`, training."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from m3cli.cli import cli
from m3cli.data import describe as dsc
from m3cli.data import scenes as sc
from m3cli.eval.report import EvalReport, Record
from m3cli.eval.synthetic import evaluate, export_scenes
from m3cli.models.registry import resolve_model

# sha256 over "index|family|question|answer" lines of iter_questions(split, 600), taken before the describe
# family existed: the one-word families must keep asking exactly these.
BEFORE_DESCRIBE = {
    "val": "67d08d993fc571bf9df324a360f75268a482ca0fb1b19366a39d5eb6e0b7c7d2",
    "test": "fd6ebe509924a1a39f88a69e2ef5fa36cf9a5e0ed1a3489dec96649a3ad7d5ce",
}


def _digest(pairs) -> str:
    h = hashlib.sha256()
    for s, qa in pairs:
        h.update(f"{s.index}|{qa.family}|{qa.question}|{qa.answer}\n".encode())
    return h.hexdigest()


@pytest.mark.parametrize("split", sorted(BEFORE_DESCRIBE))
def test_one_word_families_unchanged(split):
    assert _digest(sc.iter_questions(split, 600)) == BEFORE_DESCRIBE[split]
    # naming describe too leaves every other family's questions as they were
    mixed = [(s, qa) for s, qa in sc.iter_questions(split, 700, sc.EVAL_FAMILIES) if qa.family != sc.DESCRIBE]
    assert _digest(mixed) == BEFORE_DESCRIBE[split]


def test_every_sample_has_an_open_question():
    required = {"what is this?", "what is in the picture?", "describe the image.", "what do you see?",
                "what is in this image?"}
    assert required <= set(sc.DESCRIBE_QUESTIONS)
    asked = Counter()
    for i in range(400):
        s = sc.sample("train", i)
        qa = s.describe
        assert qa.family == sc.DESCRIBE and qa.answer == sc.description(s.scene)
        assert qa.question.lower() in sc.DESCRIBE_QUESTIONS
        asked[qa.question] += 1
        assert all(q.family != sc.DESCRIBE for q in s.qas)
    assert {q.lower() for q in asked} == set(sc.DESCRIBE_QUESTIONS)
    assert any(q[0].isupper() for q in asked) and any(q[0].islower() for q in asked)
    pairs = list(sc.iter_questions("val", 5, families=[sc.DESCRIBE]))
    assert [s.index for s, _ in pairs] == [0, 1, 2, 3, 4] and all(qa == s.describe for s, qa in pairs)


def test_description_names_everything_and_fits_16_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    longest = 0
    for i in range(600):
        scene = sc.sample("test", i).scene
        text = sc.description(scene)
        words = text.split()
        assert words[:2] == [scene.background, "background"]
        pairs = list(zip(words[2::2], words[3::2], strict=True))
        expected = [(s.colour, s.kind) for s in scene.shapes]
        expected += [(scene.glyph.colour, "letter")] if scene.glyph else []
        assert pairs == expected
        ids = tok(" " + text, add_special_tokens=False).input_ids
        assert len(ids) == len(words) <= sc.DESCRIPTION_MAX_WORDS == 16  # one token per word
        longest = max(longest, len(ids))
        assert set(sc.split_words(text)) <= set(sc.vocabulary())
    assert longest == 16  # six shapes and a letter occur in 600 scenes


def test_score_counts_objects_and_background():
    gold = "gray background red circle blue square green letter"
    assert dsc.score(gold, gold) == 1.0
    assert dsc.score("gray background, blue square. red circle and a green letter.", gold) == 1.0  # order, noise
    assert dsc.score("gray background red circle blue circle green letter", gold) == 0.75  # one wrong kind
    assert dsc.score("white background red circle blue square green letter", gold) == 0.75  # wrong background
    assert dsc.score("gray background red circle", gold) == 0.5  # two of four items
    extra = "gray background red circle blue square green letter red circle yellow cross"
    assert dsc.score(extra, gold) == 4 / 6  # made-up objects cost like missing ones
    assert dsc.score("red red red", gold) == 0.0 and dsc.score("", gold) == 0.0
    assert dsc.score("gray background red circle red circle", "gray background red circle") == 2 / 3
    assert dsc.items("black background black background") == Counter({("background", "black"): 1})
    assert dsc.correct("gray background red circle blue circle green letter", gold)
    assert not dsc.correct("gray background red circle", gold)
    for i in range(50):  # the gold of every scene reads back as its own objects
        scene = sc.sample("val", i).scene
        got = dsc.items(sc.description(scene))
        assert sum(got.values()) == 1 + len(scene.shapes) + (scene.glyph is not None)


def test_report_pass_mark_and_json():
    rec = Record("describe", "what is this?", "gray background red circle", {1: "gray background", 9: "x"},
                 {1: [-0.1], 9: [-0.1]}, {1: 1.0, 9: 1.0}, 1.0, scores={1: 0.5, 9: 0.8}, pass_mark=0.75)
    one = Record("count", "q", "two", {1: "two", 9: "one"}, {1: [-0.1], 9: [-0.1]}, {1: 1.0, 9: 1.0}, 1.0)
    report = EvalReport("test", [1, 9], [rec, one], 1.0, ["count", "describe"])
    assert not rec.correct(1) and rec.correct(9)
    assert report.accuracy(9, "describe") == 0.8 and report.passed(9, "describe") == 1.0
    out = report.to_dict()
    assert out["passed"] == {"describe": {"1": 0.0, "9": 1.0}}


class _Spy:
    """Wraps a backend and keeps the max_new_tokens of every request it answers."""

    def __init__(self, backend):
        self._backend = backend
        self.asked: list[tuple[str, int]] = []
        self.encodes = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def encode(self, images):
        self.encodes += len(images)
        return self._backend.encode(images)

    def answer(self, requests):
        self.asked += [(r.question, r.max_new_tokens) for r in requests]
        return self._backend.answer(requests)


def test_evaluate_describe_family(tiny_backend):
    spy = _Spy(tiny_backend)
    report = evaluate(spy, split="test", n=14, scales=[1, 9], families=list(sc.EVAL_FAMILIES), batch_size=7,
                      max_new_tokens=4)
    assert report.families == list(sc.EVAL_FAMILIES)
    described = [r for r in report.records if r.family == sc.DESCRIBE]
    assert len(described) == 2 and all(r.pass_mark == dsc.PASS_MARK for r in described)
    for r in described:
        assert r.scores == {s: dsc.score(r.answers[s], r.truth) for s in (1, 9)}
    lengths = {q: n for q, n in spy.asked}
    assert all(lengths[r.question] == 16 for r in described)  # room for the longest description
    assert all(lengths[r.question] == 4 for r in report.records if r.family != sc.DESCRIBE)
    assert spy.encodes == len({r.id.rsplit("-", 1)[0] for r in report.records})  # one encode per scene
    plain = evaluate(tiny_backend, split="test", n=6, scales=[1], batch_size=6)
    assert plain.families == list(sc.FAMILIES)  # the default asks the one-word families only


def test_eval_cli_describe(tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--family", "describe", "--family",
                                   "count", "-n", "4", "--tokens", "1,576", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "| describe |" in res.stdout and "| count |" in res.stdout
    data = json.loads(out.read_text())
    assert set(data["by_family"]) == {"describe", "count"} and set(data["passed"]) == {"describe"}
    with pytest.raises(Exception, match="own scoring"):
        export_scenes(tmp_path / "x", families=[sc.DESCRIBE])
    res = CliRunner().invoke(cli, ["eval", "--export-data", str(tmp_path / "x"), "--family", "describe"])
    assert res.exit_code == 2 and "own scoring" in res.stderr


TINY = """
name: tiny-describe
seed: 5
model: {vision_hidden: 32, vision_layers: 2, vision_heads: 2, text_hidden: 32, text_layers: 1,
        text_heads: 2, text_kv_heads: 2, text_intermediate: 64}
pool_images: 12
checkpoint_every: 1
stages:
  m3: {kind: m3, steps: 2, batch: 4, lr: 0.001, scales: [576, 9, 1], describe_rate: 1.0}
"""


def test_step_questions_pack_a_description(tmp_path):
    from m3cli.train.config import load_config
    from m3cli.train.trainer import Trainer

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    trainer = Trainer(load_config(path), tmp_path / "run")
    trainer.ensure_features()
    idx = np.array([0, 3])
    qas = trainer.step_questions(idx, np.random.default_rng(0), 1.0)
    for i, image_qas in zip(idx, qas, strict=True):
        assert image_qas[:-1] == list(trainer.pool_qas[i])
        last = image_qas[-1]
        assert last.family == sc.DESCRIBE and last.answer == sc.description(sc.sample("train", int(i)).scene)
        assert last.question.lower() in sc.DESCRIBE_QUESTIONS
    assert trainer.step_questions(idx, np.random.default_rng(0), 0.0) == [list(trainer.pool_qas[i]) for i in idx]
    # the open question's whole description is trained: more answer tokens, a different loss
    with_d = trainer.lm_losses(idx, [9], qas)[9].item()
    without = trainer.lm_losses(idx, [9])[9].item()
    assert np.isfinite(with_d) and with_d != pytest.approx(without)


def test_train_continues_from_a_model_directory(tmp_path):
    """`init` in the YAML (or --init) starts from a saved model directory, e.g. the shipped models/m3-shapes."""
    from m3cli.train.trainer import TrainError, resolve_init

    first = tmp_path / "first.yaml"
    first.write_text(TINY)
    res = CliRunner().invoke(cli, ["train", "--config", str(first), "--out", str(tmp_path / "a"), "--no-progress"])
    assert res.exit_code == 0, res.output
    start = tmp_path / "a" / "final"
    second = tmp_path / "second.yaml"
    second.write_text(TINY.replace("seed: 5", f"seed: 6\ninit: {start}"))
    res = CliRunner().invoke(cli, ["train", "--config", str(second), "--out", str(tmp_path / "b"), "--no-progress"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["features", "m3"]  # no vision stage: the tower came with the model
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "b" / "final").get_vocab() == \
        AutoTokenizer.from_pretrained(start).get_vocab()
    # the shipped model by its registry name; sizes that do not match the config are refused in one line
    assert resolve_init("m3-shapes").resolve() == __import__("pathlib").Path(resolve_model(None)).resolve()
    with pytest.raises(TrainError, match="not a model directory"):
        resolve_init(tmp_path / "nowhere")
    res = CliRunner().invoke(cli, ["train", "--config", str(first), "--init", resolve_model(None),
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "sizes differ" in res.stderr and "Traceback" not in res.output
