"""No input, file or option kills a run; an empty answer is never a silent blank.

Every per-item problem is an error row for that item alone, bad options are refused before any work, corrupt
model files are one line, AVIF/HEIC are walked, the mmproj cache trusts nothing it did not verify, the exit
path imports nothing heavy, and an empty answer is never shown as a silent blank.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from PIL import Image

from m3cli.answering.core import (
    DEFAULT_MAX_QUESTION_CHARS,
    Query,
    answer_images,
    answer_queries,
    ask_images,
    check_question,
)
from m3cli.backends.base import Encoded, Generation
from m3cli.cli import cli
from m3cli.errors import ItemError
from m3cli.matryoshka.policy import Escalate, Fixed

Q = "what colour is the background?"


def _run(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def _rows(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _img(path, colour=(200, 0, 0), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 48), colour).save(path, format=fmt)
    return path


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


class FakeBackend:
    """A backend whose answers are the question's first word; ``poison`` questions fail any batch they are in."""

    name = "fake"
    model_id = "fake"
    grid_side = 24
    scales = [576, 144, 36, 9, 1]
    context_length = 700

    def __init__(self, poison=(), empty=()):
        self.poison = set(poison)
        self.empty = set(empty)
        self.encoded = 0
        self.calls: list[list[str]] = []

    def prompt_ids(self, question, n):
        return [1] * (len(question.split()) + n + 4)

    def encode(self, images):
        self.encoded += len(images)
        return [Encoded(grid=im, side=24, encode_ms=1.0) for im in images]

    def answer(self, requests):
        self.calls.append([r.question for r in requests])
        if any(r.question in self.poison for r in requests):
            raise RuntimeError("CUDA out of memory. Tried to allocate 10.00 GiB\nmore detail")
        return [Generation("" if r.question in self.empty else r.question.split()[0], [1], [-0.01], 1.0, 1.0)
                for r in requests]

    def close(self):
        pass


# -- a question holding the image placeholder; a failing batch -----------------------------------------
def test_02_image_placeholder_fails_that_item_alone(tiny_model_dir, tmp_path):
    images = [_img(tmp_path / f"{i}.png", (60 * i, 0, 0)) for i in range(3)]
    rows_in = [{"image": str(p), "question": q} for p, q in zip(images, [Q, "what is <image> here?", Q], strict=True)]
    res = _run(["batch", "-", "-m", tiny_model_dir, "--tokens", 9, "--max-new-tokens", 2], input=_jsonl(rows_in))
    assert res.exit_code == 1, res.output  # one failed row, not a dead run
    rows = _rows(res.stdout)
    assert [r["source"] for r in rows] == [str(p) for p in images]  # ids: the image and a hash of its question
    assert rows[1]["error"] and "image placeholder <image>" in rows[1]["error"]
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert isinstance(rows[0]["answer"], str) and rows[0]["tokens"] == 9


def test_02_ask_with_placeholder_is_one_line(tiny_model_dir, scene_png):
    res = _run(["ask", scene_png, "describe <image> please", "-m", tiny_model_dir])
    assert res.exit_code in (1, 2)  # 2: refused as usage before the model loads; 1: by the item's own check
    assert res.output.strip().count("\n") == 0 and "image placeholder" in res.output and "Traceback" not in res.output


def test_02_a_failing_batch_is_retried_one_by_one():
    backend = FakeBackend(poison={"boom now"})
    questions = ["red one", "boom now", "blue two", "green three"]
    results = answer_images(backend, list(range(4)), questions, [Fixed(9)] * 4)
    assert [r.error for r in results] == [None, "model error: CUDA out of memory. Tried to allocate 10.00 GiB", None,
                                          None]
    assert [r.answer for r in results if r.error is None] == ["red", "blue", "green"]
    assert backend.calls[0] == questions and [len(c) for c in backend.calls[1:]] == [1, 1, 1, 1]
    row = results[1].to_dict()
    assert row["error"] and row["answer"] is None and row["tokens"] is None


def test_02_escalation_failure_keeps_neighbours():
    backend = FakeBackend(poison={"boom"})
    queries = [Query(Encoded(None, 24, 0.0), q, Escalate((1, 9), threshold=1.0)) for q in ["a b", "boom", "c d"]]
    results = answer_queries(backend, queries)
    assert [r.error is None for r in results] == [True, False, True]
    assert [[t.scale for t in r.scales_tried] for r in results] == [[1, 9], [], [1, 9]]


def test_02_ask_images_raises_the_item_error():
    with pytest.raises(ItemError, match="model error"):
        ask_images(FakeBackend(poison={"boom"}), [0], ["boom"], [Fixed(9)])


# -- oversized questions are refused before the model runs ---------------------------------------------
def test_06_oversized_question_is_refused_before_the_model_runs(tiny_model_dir, tmp_path):
    images = [_img(tmp_path / f"{i}.png") for i in range(3)]
    huge = "what colour " * 9000  # ~100 kB
    long_for_context = "red " * 450  # under the character limit, over the tiny model's 1024 positions at 576
    rows_in = [{"image": str(images[0]), "question": huge}, {"image": str(images[1]), "question": Q},
               {"image": str(images[2]), "question": long_for_context}]
    res = _run(["batch", "-", "-m", tiny_model_dir, "--tokens", 576, "--max-new-tokens", 2], input=_jsonl(rows_in))
    assert res.exit_code == 1, res.output
    rows = _rows(res.stdout)
    assert len(rows) == 3
    assert "question too long" in rows[0]["error"] and str(DEFAULT_MAX_QUESTION_CHARS) in rows[0]["error"]
    assert rows[1]["error"] is None and rows[1]["tokens"] == 576
    assert "context is 1024" in rows[2]["error"]


def test_06_limits_are_checked_without_touching_the_model():
    backend = FakeBackend()
    too_many_words = " ".join(["w"] * 200)  # 200 + 576 + 4 + 16 > 700 positions, but fits at 9 tokens
    results = answer_images(backend, [0, 1, 2], ["x" * 501, too_many_words, too_many_words],
                            [Fixed(9), Fixed(576), Escalate((9, 144), threshold=1.0)], max_question_chars=500)
    assert "501 characters > 500" in results[0].error
    assert "needs 780 positions + 16 new tokens" in results[1].error and "context is 700" in results[1].error
    assert results[2].error is None and results[2].tokens == 144  # 200 + 144 + 4 fits
    assert backend.encoded == 1  # refused questions cost no encode
    assert check_question(backend, "fine", Fixed(576), 16) is None
    assert check_question(backend, "x" * 3000, Fixed(1), 16, max_question_chars=None) is None


def test_06_a_run_question_no_item_could_be_asked_is_one_usage_error():
    import click

    from m3cli.cli.options import check_run_question

    check_run_question("what colour?", 2000)
    check_run_question(None, 10)
    with pytest.raises(click.UsageError, match="over --max-question-chars 10"):
        check_run_question("x" * 11, 10)
    with pytest.raises(click.UsageError, match="image placeholder"):
        check_run_question("what is <image>?", 2000)


@pytest.mark.parametrize("command", ["batch", "ask"])
def test_06_oversized_run_question_refused_before_any_work(tmp_path, scene_png, command):
    missing_model = tmp_path / "no-such-model"
    question = "why " * 600
    head = ["batch", scene_png, "-q", question] if command == "batch" else ["ask", scene_png, question]
    res = _run([*head, "-m", missing_model, "--max-question-chars", 100])
    assert res.exit_code == 2, res.output
    assert "over --max-question-chars 100" in res.output and res.output.strip().count("\n") == 0


def test_06_option_default_matches_the_core():
    from m3cli.cli.options import MAX_QUESTION_CHARS

    assert MAX_QUESTION_CHARS == DEFAULT_MAX_QUESTION_CHARS


def test_06_gguf_context_error_is_that_item_alone(tiny_model_dir, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from m3cli.convert.gguf_writer import convert_to_gguf

    lm, _ = convert_to_gguf(tiny_model_dir, tmp_path / "gguf", "f32", name="tiny")
    images = [_img(tmp_path / f"{i}.png", (0, 70 * i, 0)) for i in range(4)]
    questions = [Q, "red " * 300, "what is <image>?", Q]
    rows_in = [{"image": str(p), "question": q} for p, q in zip(images, questions, strict=True)]
    res = _run(["batch", "-", "-m", lm, "--tokens", 576, "--ctx", 800, "--max-new-tokens", 2, "--threads", 1],
               input=_jsonl(rows_in))
    rows = _rows(res.stdout)
    assert len(rows) == 4, res.output
    assert [r["error"] is None for r in rows] == [True, False, False, True]
    assert "context is 800" in rows[1]["error"] and "image placeholder" in rows[2]["error"]


# -- corrupt model files -------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "pickle"])
def test_08_corrupt_model_file_is_one_line_exit_2(tiny_model_dir, tmp_path, scene_png, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "empty":
        weights.write_bytes(b"")
    else:  # a pickle that would run code: torch refuses it (weights_only); we must say so in one line
        import torch

        weights.unlink()

        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))

        torch.save({"x": Evil()}, bad / "pytorch_model.bin")
    res = _run(["ask", scene_png, Q, "-m", bad])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m3: error:") and "internal error" not in lines[0], res.output
    assert "pwned" not in res.output and len(lines[0]) < 300


# -- bad options are usage errors before any work ------------------------------------------------------
BAD_OPTIONS = [
    ("--threshold", ["--auto-scale", "--threshold", "1.5"]),
    ("--threshold", ["--auto-scale", "--threshold", "-1"]),
    ("--threshold", ["--auto-scale", "--threshold", "nan"]),
    ("--threshold", ["--auto-scale", "--threshold", "inf"]),
    ("--threads", ["--threads", "-1"]),
    ("--threads", ["--threads", "0"]),
    ("--ctx", ["--ctx", "10"]),
    ("--n-gpu-layers", ["--n-gpu-layers", "-2"]),
    ("--dtype", ["--dtype", "fp8"]),
    ("--device", ["--device", "gpu0"]),
]


@pytest.mark.parametrize(("name", "args"), BAD_OPTIONS)
@pytest.mark.parametrize("command", ["batch", "ask"])
def test_09_bad_options_refused_up_front(tmp_path, scene_png, command, name, args):
    missing_model = tmp_path / "no-such-model"  # parsing must fail before the model is even looked for
    head = ["batch", scene_png, "-q", Q] if command == "batch" else ["ask", scene_png, Q]
    res = _run([*head, "-m", missing_model, *args])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{name}'" in res.output and "Traceback" not in res.output
    assert res.output.strip().count("\n") == 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-2"])
def test_09_bad_fps_refused_up_front(tmp_path, scene_png, value):
    res = _run(["batch", scene_png, "-q", Q, "-m", tmp_path / "no-such-model", "--fps", value])
    assert res.exit_code == 2, res.output
    assert "Invalid value for '--fps'" in res.output


def test_09_option_types():
    import click

    from m3cli.cli.options import ALL_GPU_LAYERS, POSITIVE, THRESHOLD, NumberList

    assert THRESHOLD.convert("0.25", None, None) == 0.25
    assert POSITIVE.convert("2.5", None, None) == 2.5
    for bad in ("nan", "inf", "-inf", "1.01"):
        with pytest.raises(click.BadParameter):
            THRESHOLD.convert(bad, None, None)
    with pytest.raises(click.BadParameter):
        NumberList(float).convert("0.5,nan", None, None)

    from m3cli.cli.options import model_options

    seen = {}

    @click.command()
    @model_options
    def models(**kw):
        seen.update(kw)

    CliRunner().invoke(models, ["--n-gpu-layers", "-1"], catch_exceptions=False)
    assert seen["n_gpu_layers"] == ALL_GPU_LAYERS


# -- AVIF and HEIC in folder walks --------------------------------------------------------------------
def test_11_avif_and_heic_are_walked_and_answered(tiny_model_dir, tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    folder = tmp_path / "photos"
    _img(folder / "a.png")
    _img(folder / "b.avif", (0, 200, 0), fmt="AVIF")
    _img(folder / "c.heic", (0, 0, 200), fmt="HEIF")
    res = _run(["batch", folder, "-q", Q, "-m", tiny_model_dir, "--tokens", 1, "--max-new-tokens", 1])
    assert res.exit_code == 0, res.output
    rows = _rows(res.stdout)
    assert [os.path.basename(r["id"]) for r in rows] == ["a.png", "b.avif", "c.heic"]
    assert all(r["error"] is None for r in rows)


def test_11_heic_without_its_plugin_says_what_to_install(tmp_path, monkeypatch):
    from m3cli.errors import MediaError
    from m3cli.media import image as image_mod

    path = tmp_path / "c.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    monkeypatch.setattr(image_mod, "_PLUGINS", {})
    with pytest.raises(MediaError, match=r"pillow-heif.*m3cli\[heif\]"):
        image_mod.load_image(path)


def test_11_a_heic_named_jpg_is_recognised(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    from m3cli.media import image as image_mod

    buf = tmp_path / "phone.jpg"  # some phone exports keep a HEIC payload under a .jpg name
    pillow_heif.from_pillow(Image.new("RGB", (32, 32), (10, 200, 10))).save(buf, format="HEIF")
    assert image_mod.load_image(buf).getpixel((5, 5))[1] > 150


def test_11_walk_warns_once_per_unknown_type(tmp_path, caplog):
    from m3cli.media import iter_inputs

    folder = tmp_path / "mixed"
    _img(folder / "a.png")
    for name in ("x.xyz", "y.xyz", "notes.txt"):
        (folder / name).write_text("not media")
    with caplog.at_level(logging.WARNING, logger="m3cli"):
        items = list(iter_inputs([str(folder)]))
    assert [os.path.basename(i.id) for i in items] == ["a.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per unknown extension, not per file
    assert any("notes.txt" in w for w in warnings) and any("x.xyz" in w for w in warnings)


# -- the mmproj cache ----------------------------------------------------------------------------------
@pytest.fixture
def fake_fix(monkeypatch):
    """fix_mmproj replaced by a deterministic stand-in (the cache logic is what is tested here)."""
    from m3cli.gguf import cache

    made = []

    def fix(src, out_dir):
        data = open(src, "rb").read()
        out = out_dir / (src.name[: -len(".gguf")] + "-fixed.gguf")
        out.write_bytes(b"FIXED" + data)
        (out_dir / (out.name[: -len(".gguf")] + ".rot180.gguf")).write_bytes(b"ROT" + data)
        made.append(src)
        return out

    monkeypatch.setattr(cache, "fix_mmproj", fix)
    return made


def test_13_cache_is_keyed_by_content_and_private(tmp_path, fake_fix):
    from m3cli.gguf.cache import cached_fixed_mmproj

    root = tmp_path / "cache"
    src = tmp_path / "a" / "mmproj-legacy.gguf"
    src.parent.mkdir()
    src.write_bytes(b"legacy projector " * 100)
    path, created = cached_fixed_mmproj(src, root)
    assert created and path.read_bytes() == b"FIXED" + src.read_bytes()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    again, created = cached_fixed_mmproj(src, root)
    assert (again, created) == (path, False) and len(fake_fix) == 1
    copy = tmp_path / "b" / "mmproj-legacy.gguf"  # same bytes elsewhere: same entry, by content
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    assert cached_fixed_mmproj(copy, root) == (path, False)
    st = src.stat()  # new bytes, same size and mtime: a new entry, never the old one
    src.write_bytes(b"LEGACY PROJECTOR " * 100)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    other, created = cached_fixed_mmproj(src, root)
    assert created and other != path and other.read_bytes() == b"FIXED" + src.read_bytes()


@pytest.mark.parametrize("plant", ["no-manifest", "tampered-after"])
def test_13_a_planted_entry_is_never_loaded(tmp_path, fake_fix, plant):
    from m3cli.gguf.cache import cache_key, cached_fixed_mmproj, file_sha256

    root = tmp_path / "cache"
    src = tmp_path / "mmproj-legacy.gguf"
    src.write_bytes(b"real projector " * 64)
    folder = root / "mmproj" / cache_key(file_sha256(src))
    main = folder / "mmproj-legacy-fixed.gguf"
    if plant == "no-manifest":  # what a stat-computable key let anyone do: a zeroed projector under the key
        folder.mkdir(parents=True)
        main.write_bytes(b"\0" * 100)
        (folder / "mmproj-legacy-fixed.rot180.gguf").write_bytes(b"\0" * 100)
    else:
        cached_fixed_mmproj(src, root)
        main.write_bytes(b"\0" * len(main.read_bytes()))  # the projector zeroed after the entry was made
    path, created = cached_fixed_mmproj(src, root)
    assert created and path == main
    assert path.read_bytes() == b"FIXED" + src.read_bytes()


def test_13_a_cache_root_open_to_others_keeps_its_mode_and_gets_a_private_folder(tmp_path, fake_fix, caplog):
    """(Changed: an existing folder is never chmodded; m3's entries go in an owner-only folder inside it.)"""
    from m3cli.gguf.cache import cached_fixed_mmproj

    root = tmp_path / "cache"
    root.mkdir()
    os.chmod(root, 0o777)
    src = tmp_path / "mmproj-legacy.gguf"
    src.write_bytes(b"p" * 10)
    with caplog.at_level(logging.WARNING, logger="m3cli"):
        path, _ = cached_fixed_mmproj(src, root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o777
    mine = root / f"m3cli-{os.getuid()}"
    assert mine in path.parents and stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert any("writable by other users" in r.getMessage() for r in caplog.records)


def test_13_a_cache_root_of_another_user_is_refused(tmp_path, fake_fix, monkeypatch):
    from m3cli.gguf import cache
    from m3cli.gguf.mmproj import MmprojError

    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    src = tmp_path / "mmproj-legacy.gguf"
    src.write_bytes(b"p" * 10)
    owner = root.stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    with pytest.raises(MmprojError, match="belongs to another user") as info:
        cache.cached_fixed_mmproj(src, root)
    assert "\n" not in str(info.value) and not fake_fix


# -- the exit path ------------------------------------------------------------------------------------
def _python(code, *args, timeout=60):
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_15_merge_imports_nothing_heavy(tmp_path):
    out = _python(f"""
        import sys
        from m3cli.cli import main
        sys.argv = ["m3", "-v", "merge", {str(tmp_path / 'none.jsonl')!r}, "-o", {str(tmp_path / 'all.jsonl')!r}]
        try:
            main()
        finally:
            heavy = sorted(m for m in ("torch", "transformers", "ray", "av", "llama_cpp") if m in sys.modules)
            print("HEAVY", heavy, file=sys.stderr)
        """)
    assert "HEAVY []" in out.stderr, out.stderr
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_15_transformers_is_still_silenced_when_imported_later():
    out = _python("""
        from m3cli import logs
        logs.configure(0)
        from transformers.utils import logging as hf_logging
        import logging
        print(hf_logging.get_verbosity() == logging.ERROR)
        """)
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.parametrize("when", ["reporting", "atexit"])
def test_15_second_ctrl_c_during_exit_is_no_traceback(when):
    out = _python(f"""
        import atexit, os, signal, sys, time
        import click
        from m3cli.cli import app

        @app.cli.command()
        def boom():
            raise KeyboardInterrupt  # the first Ctrl-C

        def again():
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
            time.sleep(1)

        if {when!r} == "reporting":
            echo = click.echo
            def slow_echo(message=None, **kw):
                if message and "interrupted" in str(message):
                    again()
                echo(message, **kw)
            app.click.echo = slow_echo
        else:
            atexit.register(again)
        sys.argv = ["m3", "boom"]
        app.main()
        """)
    assert out.returncode == 130, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr, out.stderr


# -- an empty generation is never a silent blank ----------------------------------------------------------------
def test_16_empty_answer_has_confidence_0_and_a_note():
    backend = FakeBackend(empty={"say nothing"})
    fixed, = answer_images(backend, [0], ["say nothing"], [Fixed(9)])
    assert fixed.answer == "" and fixed.confidence == 0.0 and fixed.empty
    assert fixed.note == "empty answer: the model generated no text at 9 visual tokens"
    assert answer_images(backend, [0], ["say something"], [Fixed(9)])[0].note is None


def test_16_auto_scale_climbs_past_an_empty_answer():
    class EmptyBelow36(FakeBackend):
        def answer(self, requests):
            return [Generation("" if r.scale < 36 else "red", [5], [-0.0001], 1.0, 1.0) for r in requests]

    result, = answer_images(EmptyBelow36(), [0], ["q"], [Escalate((1, 9, 36, 144), threshold=0.0)])
    assert [r.scale for r in result.scales_tried] == [1, 9, 36]  # threshold 0 would stop at once on an answer
    assert [r.confidence for r in result.scales_tried][:2] == [0.0, 0.0]
    assert result.answer == "red" and result.tokens == 36 and result.note is None


def _empty_generations(monkeypatch):
    from m3cli.backends.torch import TorchBackend

    monkeypatch.setattr(TorchBackend, "answer",
                        lambda self, requests: [Generation("", [], [], 1.0, 1.0) for _ in requests])


def test_16_ask_says_an_empty_answer_on_stderr(tiny_model_dir, scene_png, monkeypatch):
    _empty_generations(monkeypatch)
    res = _run(["ask", scene_png, "What is this?", "-m", tiny_model_dir, "--tokens", 9])
    assert res.exit_code == 0
    assert res.stdout.strip() == ""
    notes = [line for line in res.stderr.splitlines() if "empty answer" in line]
    assert len(notes) == 1 and notes[0].startswith("m3: note:")
    row = json.loads(_run(["ask", scene_png, "What is this?", "-m", tiny_model_dir, "--json"]).stdout)
    assert row["answer"] == "" and row["confidence"] == 0.0 and "empty answer" in row["note"]


def test_16_batch_rows_carry_an_empty_answer_explicitly(tiny_model_dir, scene_png, monkeypatch):
    _empty_generations(monkeypatch)
    res = _run(["batch", scene_png, "-q", "What is this?", "-m", tiny_model_dir, "--tokens", 9])
    row, = _rows(res.stdout)
    assert row["error"] is None and row["answer"] == "" and "empty answer" in row["note"]
