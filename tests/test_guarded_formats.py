"""The benchmark and OpenAI formats go through the shared mechanisms: the output guard (OpenAI Batch output, LLaVA
answer files, lmms-eval samples, --export-data in every layout), the bounded line reader (OpenAI Batch files,
MMBench TSVs), the input-path check by type (Batch files, the server's local media, m3 ask --server,
--image-folder) and resume by content (Batch lines without a custom_id, MMBench rows, CircularEval rounds)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from serve_live import EXAMPLES, data_url, messages
from test_eval_formats import TSV_ROWS, Scripted, _png_b64, _write_tsv

from m3cli.cli import cli
from m3cli.errors import UsageError

OPENAI = ["batch", "--input-format", "openai", "--format", "openai", "--max-new-tokens", "2"]


def _run(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def _fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(path)
    return path


def _request(custom_id: str | None, scene: int = 0, question: str = "what colour is the background?") -> bytes:
    body = {"model": "m3-shapes", "messages": messages(question, data_url(EXAMPLES / f"scene-{scene}.png")),
            "max_tokens": 2, "m3": {"tokens": 1}}
    line = {"method": "POST", "url": "/v1/chat/completions", "body": body}
    if custom_id is not None:
        line["custom_id"] = custom_id
    return json.dumps(line).encode()


def _ids(path: Path) -> list[str]:
    out = []
    for raw in path.read_bytes().splitlines():
        line = json.loads(raw)
        out.append(line["custom_id"] or line["m3"]["id"])
    return out


@pytest.fixture
def no_model(monkeypatch):
    """open_backend that fails the test: what is refused must be refused before any model loads."""
    import m3cli.backends

    def refuse(**kw):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(m3cli.backends, "open_backend", refuse)


@pytest.fixture
def scripted(monkeypatch):
    import m3cli.backends

    backends: list[Scripted] = []

    def make(**kw):
        backends.append(Scripted())
        return backends[-1]

    monkeypatch.setattr(m3cli.backends, "open_backend", make)
    return backends


# ------------------------------------------------------------------------------------------ OpenAI Batch files


def test_openai_batch_output_goes_through_the_output_guard(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(_request("a") + b"\n" + _request("b", 1) + b"\n")
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my own notes\n")
    res = _run([*OPENAI, requests, "-o", notes])
    assert res.exit_code == 2 and "not written by m3 batch" in res.stderr, res.output
    assert notes.read_text() == "my own notes\n"
    res = _run([*OPENAI, requests, "-o", requests])
    assert res.exit_code == 2 and "also an input" in res.stderr, res.output
    res = _run([*OPENAI, _fifo(tmp_path / "fifo.jsonl"), "-o", tmp_path / "x.jsonl"])
    assert res.exit_code == 2 and "is a FIFO (named pipe), not a regular file" in res.stderr, res.output

    out = tmp_path / "out.jsonl"
    assert _run([*OPENAI, requests, "-o", out]).exit_code == 0
    first = out.read_bytes()
    res = _run([*OPENAI, requests, "-o", out])  # Batch output lines are recognised as m3 batch results
    assert res.exit_code == 2 and "already holds m3 batch results" in res.stderr, res.output
    assert out.read_bytes() == first
    res = _run([*OPENAI, requests, "-o", out, "--resume"])
    assert res.exit_code == 0 and "skipped 2" in res.stderr, res.output
    assert _run([*OPENAI, requests, "-o", out, "--overwrite"]).exit_code == 0
    assert _ids(out) == ["a", "b"]


def test_openai_batch_lines_without_custom_id_resume_by_content(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\n".join([_request("a"), b"not json", _request(None, 1)]) + b"\n")
    out = tmp_path / "out.jsonl"
    res = _run([*OPENAI, requests, "-o", out])
    assert res.exit_code == 1, res.output  # two lines are no request (no JSON; no custom_id)
    before = _ids(out)
    assert before[0] == "a" and all(i.startswith(f"{requests}:") and i != f"{requests}:2" for i in before[1:])
    # lines inserted above them: each line keeps its id, only the new ones are answered
    requests.write_bytes(b"\n".join([b"also not json", _request("c", 2), _request("a"), b"not json",
                                     _request(None, 1)]) + b"\n")
    res = _run([*OPENAI, requests, "-o", out, "--resume"])
    assert res.exit_code == 1 and "skipped 3" in res.stderr, res.output
    after = _ids(out)
    assert after[:3] == before and len(after) == 5 and len(set(after)) == 5 and "c" in after


def test_openai_batch_lines_go_through_the_bounded_reader(tmp_path, monkeypatch):
    from m3cli.answering.chat_request import MAX_REQUEST_BYTES, ChatDefaults
    from m3cli.engines import openai_batch
    from m3cli.engines.openai_batch import OpenAIBatchInput
    from m3cli.engines.units import BatchOptions

    assert MAX_REQUEST_BYTES >= 32 << 20  # a line holds its images: as large as the server's largest request
    monkeypatch.setattr(openai_batch, "MAX_REQUEST_BYTES", 4096)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n" + b"x" * 100_000)  # no newline in sight
    units = list(OpenAIBatchInput([str(path)], 24, ChatDefaults(), "m3-shapes").units(BatchOptions()))
    assert len(units) == 1 and units[0].id == f"{path}:line-2"
    assert "longer than 4096 bytes" in units[0].error and "not read further" in units[0].error


# ------------------------------------------------------------------------------- local media, image folders


def test_a_fifo_among_the_servers_media_is_a_400_not_a_hang(tmp_path, monkeypatch):
    from m3cli.answering.chat_request import MediaAccess, RequestError, parse_chat_request

    allowed = tmp_path / "media"
    allowed.mkdir()
    _fifo(allowed / "pipe.png")
    body = {"model": "m", "messages": messages("what colour?", "pipe.png")}
    outcome: list = []

    def ask(access) -> None:
        try:
            parse_chat_request(body, 24, access=access)
        except RequestError as exc:
            outcome.append(exc)

    monkeypatch.chdir(allowed)  # m3 batch's access: a relative path from the working folder
    for access in (MediaAccess(local_dirs=(str(allowed),)), MediaAccess(local_dirs=None)):
        thread = threading.Thread(target=ask, args=(access,), daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "reading a FIFO hung the request"
        err = outcome.pop()
        assert err.status == 400 and "is a FIFO (named pipe), not a regular file" in str(err)
        assert str(tmp_path) not in str(err)  # named as the request gave it, not where it lies on the server


def test_ask_server_refuses_a_fifo_before_any_call(tmp_path):
    res = _run(["ask", _fifo(tmp_path / "p.png"), "what?", "--server", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "is a FIFO" in res.stderr and "cannot reach" not in res.stderr, res.output


def test_image_folder_and_its_images_are_checked_by_type(tmp_path, no_model):
    from m3cli.eval.data import BadRow, read_eval_data

    images = tmp_path / "images"
    images.mkdir()
    _fifo(images / "pipe.png")
    q = tmp_path / "llava_q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "pipe.png", "text": "How many?"}) + "\n")
    rows = list(read_eval_data(q, image_folder=images))
    assert isinstance(rows[0], BadRow) and "is a FIFO (named pipe)" in rows[0].reason
    for folder, needle in ((q, "is a file"), ("", "is empty"), (images / "pipe.png", "is a FIFO")):
        res = _run(["eval", "--data", q, "--image-folder", folder])
        assert res.exit_code == 2 and "--image-folder" in res.stderr and needle in res.stderr, res.output
    with pytest.raises(UsageError, match="is a FIFO"):
        list(read_eval_data(q, image_folder=images / "pipe.png"))


# ------------------------------------------------------------------------------------------ eval outputs


def test_answer_files_go_through_the_output_guard(tmp_path, no_model, monkeypatch):
    import m3cli.backends

    tsv = _write_tsv(tmp_path / "mm-9.tsv")
    base = ["eval", "--data", tsv, "--tokens", "1,9"]
    res = _run([*base, "--answers-out", tmp_path / "mm.tsv"])  # the 9-token file would be the data
    assert res.exit_code == 2 and "also an input" in res.stderr, res.output
    (tmp_path / "a-9.jsonl").write_text("my notes\n")
    res = _run([*base, "--answers-out", tmp_path / "a.jsonl"])
    assert res.exit_code == 2 and "a-9.jsonl exists and was not written by m3" in res.stderr, res.output
    res = _run(["eval", "--data", tsv, "--answers-out", tmp_path / "a.jsonl"])  # no --tokens: what exists now
    assert res.exit_code == 2 and "a-9.jsonl exists" in res.stderr, res.output
    assert (tmp_path / "a-9.jsonl").read_text() == "my notes\n"

    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: Scripted())
    res = _run([*base, "--answers-out", tmp_path / "a.jsonl", "--overwrite"])
    assert res.exit_code == 0, res.output
    written = (tmp_path / "a-9.jsonl").read_text()
    assert json.loads(written.splitlines()[0])["question_id"] == 1
    res = _run([*base, "--answers-out", tmp_path / "a.jsonl"])  # answers are results: kept unless asked
    assert res.exit_code == 2 and "already exists; --overwrite replaces it" in res.stderr, res.output
    samples = tmp_path / "s.jsonl"
    assert _run([*base, "--samples", samples]).exit_code == 0
    res = _run([*base, "--samples", samples, "--resume", "--answers-out", tmp_path / "a.jsonl"])
    assert res.exit_code == 0, res.output  # --resume writes them again from every sample
    assert (tmp_path / "a-9.jsonl").read_text() == written


def test_lmms_eval_samples_are_guarded_and_resume_by_content(tmp_path, scripted):
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv")
    samples = tmp_path / "s.jsonl"
    run = ["eval", "--data", tsv, "--tokens", "1,9", "--samples", samples, "--samples-format", "lmms-eval"]
    assert _run(run).exit_code == 0
    first = samples.read_bytes()
    res = _run(run)
    assert res.exit_code == 2 and "already holds m3 eval results" in res.stderr, res.output
    res = _run(["eval", "--data", tsv, "--tokens", "1,9", "--samples", samples, "--resume"])  # the m3 layout
    assert res.exit_code == 2 and "not m3 eval samples" in res.stderr, res.output
    assert samples.read_bytes() == first and len(scripted) == 1  # both refused before the model loaded

    # the rows reordered and the shared picture changed: only the rows showing it are asked again
    rows = list(reversed(TSV_ROWS))
    rows[-1] = (*rows[-1][:-1], _png_b64((10, 200, 10)))  # row 1's picture, which row 4 names too
    _write_tsv(tsv, rows)
    res = _run([*run, "--resume", "--json", tmp_path / "r.json"])
    assert res.exit_code == 0, res.output
    asked = {q for q, _scale in scripted[-1].prompts}
    assert len(scripted[-1].prompts) == 2 * 2 and len(asked) == 2  # rows 1 and 4, at two scales
    assert any("What colour is it?" in q for q in asked) and any("Is it bright?" in q for q in asked)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["resumed"] == 3 and report["n"] == 5


def test_mmbench_content_keys(tmp_path, monkeypatch):
    from m3cli.eval import circular, mmbench
    from m3cli.eval.data import read_eval_data

    keys = {r.id: r.key for r in read_eval_data(_write_tsv(tmp_path / "a.tsv"))}
    moved = {r.id: r.key for r in read_eval_data(_write_tsv(tmp_path / "b.tsv", list(reversed(TSV_ROWS))))}
    assert keys == moved and len(set(keys.values())) == 5  # by content, not by place or file
    asked = [(*r[:3], ["x", *r[3][1:]], *r[4:]) if r[0] == 2 else r for r in TSV_ROWS]
    changed = {r.id: r.key for r in read_eval_data(_write_tsv(tmp_path / "c.tsv", asked))}
    assert [i for i in keys if keys[i] != changed[i]] == ["2"]
    rounds = circular.expand(list(read_eval_data(tmp_path / "a.tsv")))
    assert len({r.key for r in rounds}) == len(rounds) == 16

    # a real MMBench row holds a picture of up to a few MB in one line: read; a line past the limit: one line
    big = [(*TSV_ROWS[0][:-1], "A" * (3 << 20))]
    rows = list(read_eval_data(_write_tsv(tmp_path / "big.tsv", big)))
    assert len(rows) == 1 and rows[0].id == "1" and rows[0].key
    monkeypatch.setattr(mmbench, "MAX_TSV_LINE_BYTES", 1 << 20)
    with pytest.raises(UsageError, match="longer than 1 MiB"):
        list(read_eval_data(tmp_path / "big.tsv"))


@pytest.mark.parametrize(("fmt", "name"), [("jsonl", "test.jsonl"), ("mmbench", "test.tsv"),
                                           ("llava", "llava_test.jsonl")])
def test_export_data_is_guarded_in_every_layout(tmp_path, fmt, name):
    out = tmp_path / "export"
    args = ["eval", "--export-data", out, "-n", "4", "--export-format", fmt]
    assert _run(args).exit_code == 0 and (out / name).exists()
    assert _run(args).exit_code == 0  # an earlier export is replaced
    (out / name).write_text("my own data\n")
    res = _run(args)
    assert res.exit_code == 2 and "not written by m3" in res.stderr, res.output
    assert (out / name).read_text() == "my own data\n"
    assert _run([*args, "--overwrite"]).exit_code == 0
