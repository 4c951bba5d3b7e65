"""m3 convert and the llamacpp backend through the CLI (skipped without the gguf extra)."""

import json

import pytest
from click.testing import CliRunner

from m3cli.cli import cli

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def gguf_pair(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    res = _run("convert", tiny_model_dir, "--to", "gguf", out)
    assert res.exit_code == 0, res.output
    lm, mmproj = res.stdout.split()
    return lm, mmproj


def test_ask_with_gguf_model_every_scale(gguf_pair, tiny_model_dir, scene_png):
    lm, _ = gguf_pair
    for tokens in (576, 36, 1):
        res = _run("ask", scene_png, "what colour is the background?", "--model", lm, "--tokens", tokens, "--json",
                   "--max-new-tokens", 3)
        assert res.exit_code == 0, res.output
        row = json.loads(res.stdout)
        assert row["backend"] == "llamacpp" and row["tokens"] == tokens
        torch_row = json.loads(_run("ask", scene_png, "what colour is the background?", "--model", tiny_model_dir,
                                    "--tokens", tokens, "--json", "--max-new-tokens", 3).stdout)
        assert row["answer"] == torch_row["answer"]


def _one_line_exit_2(res):
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_bad_gguf_inputs(gguf_pair, tmp_path, scene_png):
    lm, mmproj = gguf_pair
    _one_line_exit_2(_run("ask", scene_png, "q?", "--model", tmp_path / "nope.gguf"))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 20)
    _one_line_exit_2(_run("ask", scene_png, "q?", "--model", bogus))
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "lm.gguf").write_bytes(open(lm, "rb").read())
    _one_line_exit_2(_run("ask", scene_png, "q?", "--model", alone / "lm.gguf"))  # no mmproj beside it
    _one_line_exit_2(_run("ask", scene_png, "q?", "--model", lm, "--mmproj", lm))  # an LM is not an mmproj


def test_gguf_flags_refused_for_torch(tiny_model_dir, scene_png):
    _one_line_exit_2(_run("ask", scene_png, "q?", "--model", tiny_model_dir, "--n-gpu-layers", 3))


def test_convert_usage_errors(tmp_path):
    _one_line_exit_2(_run("convert", tmp_path, tmp_path / "o"))
    _one_line_exit_2(_run("convert", tmp_path / "missing", tmp_path / "o", "--to", "hf"))
    _one_line_exit_2(_run("convert", tmp_path / "missing", tmp_path / "o", "--to", "gguf"))


def test_shipped_model_converts_and_agrees(tmp_path):
    """The shipped model converts to GGUF and answers the example scenes as the torch backend does."""
    from m3cli.answering.core import ask_images
    from m3cli.backends.llamacpp import LlamaCppBackend
    from m3cli.backends.torch import TorchBackend
    from m3cli.convert.gguf_writer import convert_to_gguf
    from m3cli.data.scenes import render, sample
    from m3cli.matryoshka.policy import Fixed
    from m3cli.models.registry import resolve_model

    lm, _ = convert_to_gguf(resolve_model(None), tmp_path, "f32")
    cpp, ref = LlamaCppBackend(str(lm)), TorchBackend(resolve_model(None), device="cpu")
    samples = [sample("test", i) for i in range(4)]
    images = [render(s.scene) for s in samples]
    questions = [s.qas[i % len(s.qas)].question for i, s in enumerate(samples)]
    for scale in (576, 9, 1):
        ours = ask_images(cpp, images, questions, [Fixed(scale)] * 4, max_new_tokens=3)
        theirs = ask_images(ref, images, questions, [Fixed(scale)] * 4, max_new_tokens=3)
        assert [r.answer for r in ours] == [r.answer for r in theirs]
    cpp.close()
