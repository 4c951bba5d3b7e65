"""m3 batch with several questions per image (one encode for all of them) and the paper's video collage.

On the shipped model (models/m3-shapes). The tower is counted with a forward pre-hook on the vision tower, so
"encoded once" means the CLIP tower saw the image once, whatever path the engine took to get there.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from media_factory import write_video

import m3cli.backends
from m3cli.answering.collage import COLLAGE_PREFIX, collage_question, uniform_indices
from m3cli.backends.torch import TorchBackend
from m3cli.cli import cli
from m3cli.engines.local import BatchOptions, run_batch
from m3cli.fileio import content_hash
from m3cli.media import iter_inputs
from m3cli.models.registry import resolve_model
from m3cli.output import JsonlSink, OrderedWriter, Summary

EXAMPLES = Path(__file__).resolve().parent.parent / "models" / "examples"
QS = ("what colour is the background?", "how many shapes are there?", "is there a yellow shape?")
COMPARED = ("source", "frame", "time_s", "question", "answer", "tokens", "error")


@pytest.fixture(scope="module")
def shipped():
    return TorchBackend(resolve_model(None), device="cpu")


@pytest.fixture
def tower(shipped):
    """Counts the images that go through the vision tower (every call, whatever its batch)."""
    seen = []
    handle = shipped.model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int((args[0] if args else kwargs["pixel_values"]).shape[0])),
        with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture
def asked(shipped, monkeypatch):
    """The questions the language model is asked (after any prefix), and the pictures encoded."""
    log = {"questions": [], "images": []}
    answer, encode = shipped.answer, shipped.encode

    def spy_answer(requests):
        log["questions"].extend(r.question for r in requests)
        return answer(requests)

    def spy_encode(images):
        log["images"].extend(images)
        return encode(images)

    monkeypatch.setattr(shipped, "answer", spy_answer)
    monkeypatch.setattr(shipped, "encode", spy_encode)
    return log


@pytest.fixture
def cli_backend(shipped, monkeypatch):
    """The CLI opens the module's backend instead of loading the model again (same model, same rows)."""
    monkeypatch.setattr(m3cli.backends, "open_backend", lambda **kw: shipped)
    return shipped


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    for i in range(4):
        shutil.copy(EXAMPLES / f"scene-{i}.png", root / f"scene-{i}.png")
    return root


def _paths(root):
    return [str(root / f"scene-{i}.png") for i in range(4)]


def _batch(backend, inputs, stdin=None, **kw):
    out = io.StringIO()
    summary = Summary()
    opts = BatchOptions(**{"tokens": 9, "max_new_tokens": 3, **kw})
    run_batch(backend, iter_inputs(inputs, stdin), opts, OrderedWriter(JsonlSink(out)), summary)
    return [json.loads(line) for line in out.getvalue().splitlines()], summary


def _run(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def _rows(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- several -q ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "batch_size"), [(9, 8), (1, 2)])
def test_three_questions_four_images_encode_four_times(shipped, tower, scenes, tokens, batch_size):
    rows, summary = _batch(shipped, [str(scenes)], questions=QS, tokens=tokens, batch_size=batch_size)
    paths = _paths(scenes)
    assert [r["id"] for r in rows] == [f"{p}#q{k}" for p in paths for k in (1, 2, 3)]
    assert [r["question"] for r in rows] == list(QS) * 4 and [r["source"] for r in rows] == [p for p in paths
                                                                                          for _ in QS]
    assert sum(tower) == 4  # batches of 2 split an image's questions: the encode cache spans them
    assert summary.done == 12 and all(r["error"] is None and r["tokens"] == tokens for r in rows)

    tower.clear()
    single = {q: _batch(shipped, [str(scenes)], question=q, tokens=tokens, batch_size=batch_size)[0] for q in QS}
    assert sum(tower) == 12
    for k, q in enumerate(QS):
        mine = rows[k::3]
        assert [r["id"] for r in single[q]] == paths  # one question: today's ids
        assert [{c: r[c] for c in COMPARED} for r in mine] == [{c: r[c] for c in COMPARED} for r in single[q]]
        assert [r["confidence"] for r in mine] == pytest.approx([r["confidence"] for r in single[q]], abs=1e-3)


def test_encode_time_is_shared_and_a_cache_of_zero_shares_within_a_batch_only(shipped, tower, scenes):
    rows, _ = _batch(shipped, [str(scenes)], questions=QS, batch_size=2, encode_cache=0)
    assert sum(tower) > 4  # image 0's third question sits in the next batch: encoded again
    rows, _ = _batch(shipped, [str(scenes)], questions=QS, batch_size=12)
    shares = [r["timings"]["encode_ms"] for r in rows]
    assert all(s > 0 for s in shares) and shares[0] == shares[1] == shares[2]
    assert all(r["timings"]["total_ms"] >= r["timings"]["encode_ms"] for r in rows)


def test_stdin_rows_sharing_an_image_are_decoded_and_encoded_once(shipped, tower, scenes, monkeypatch):
    import m3cli.engines.decode as decode

    loads = []
    real = decode.open_image
    monkeypatch.setattr(decode, "open_image", lambda path, options=None: loads.append(path) or real(path, options))
    a, b = _paths(scenes)[:2]
    lines = [{"image": a, "question": QS[0]}, {"image": b, "question": QS[0]}, {"image": a, "question": QS[1]},
             {"image": a}, {"image": str(scenes / "." / "scene-0.png"), "question": QS[2]}]
    stdin = "".join(json.dumps(r) + "\n" for r in lines)
    for batch_size in (8, 1):
        tower.clear()
        loads.clear()
        rows, _ = _batch(shipped, ["-"], io.StringIO(stdin), question=QS[2], batch_size=batch_size)
        # a row with its own question is named by its image and a hash of the question, never by its position
        own = {q: "~" + content_hash(q, None, length=8) for q in QS}
        assert [r["id"] for r in rows] == [a + own[QS[0]], b + own[QS[0]], a + own[QS[1]], a,
                                           os.path.normpath(lines[4]["image"]) + own[QS[2]]]
        assert [r["question"] for r in rows] == [QS[0], QS[0], QS[1], QS[2], QS[2]]
        assert sum(tower) == 2 and len(loads) == 2, batch_size  # a (three names of one file) and b
        assert rows[3]["answer"] == rows[4]["answer"] and all(r["error"] is None for r in rows)


def test_a_jsonl_row_with_its_own_question_keeps_its_id_among_several_questions(shipped, tower, scenes):
    a = _paths(scenes)[0]
    stdin = json.dumps({"image": a, "id": "mine", "question": "what letter is written?"}) + "\n" + a + "\n"
    rows, _ = _batch(shipped, ["-"], io.StringIO(stdin), questions=QS[:2])
    assert [(r["id"], r["question"]) for r in rows] == [("mine", "what letter is written?"), (f"{a}#q1", QS[0]),
                                                        (f"{a}#q2", QS[1])]
    assert sum(tower) == 1


def test_resume_completes_a_partial_several_question_file_exactly_once(cli_backend, tower, scenes, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["batch", scenes, *sum((["-q", q] for q in QS), []), "--tokens", 9, "--max-new-tokens", 3,
            "-b", 2, "-o", out]
    assert _run(args).exit_code == 0
    full = _rows(out.read_text())
    assert len(full) == 12 and all(r["run"]["question"] == list(QS) for r in full)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:30])  # image 0 and 1 done, image 2 asked once, a cut line
    tower.clear()
    res = _run(args + ["--resume"])
    assert res.exit_code == 0, res.output
    again = _rows(out.read_text())
    assert [r["id"] for r in again] == [r["id"] for r in full]  # every row once, in input order
    assert [r["answer"] for r in again] == [r["answer"] for r in full]
    assert sum(tower) == 2 and "skipped 7" in res.stderr  # images 0 and 1 were not even decoded
    res = _run(["batch", scenes, "-q", QS[0], "--tokens", 9, "--max-new-tokens", 3, "-o", out, "--resume"])
    assert res.exit_code == 2 and "question" in res.stderr  # other questions: not this file's run


def test_shards_keep_an_images_questions_together_and_merge_to_the_single_run(cli_backend, scenes, tmp_path):
    common = ["batch", scenes, "-q", QS[0], "-q", QS[1], "--tokens", 1, "--max-new-tokens", 2]
    single = _rows(_run(common).stdout)
    outs = []
    for k in range(3):
        outs.append(tmp_path / f"s{k}.jsonl")
        assert _run(common + ["--shard", f"{k}/3", "-o", outs[-1]]).exit_code == 0
        ids = [r["id"] for r in _rows(outs[-1].read_text())]
        images = list(dict.fromkeys(i.rsplit("#q", 1)[0] for i in ids))
        assert ids == [f"{image}#q{k}" for image in images for k in (1, 2)]  # both questions, in this shard
    res = _run(["merge", *outs, "-o", tmp_path / "all.jsonl"])
    assert res.exit_code == 0, res.output
    merged = _rows((tmp_path / "all.jsonl").read_text())
    assert [(r["id"], r["answer"]) for r in merged] == [(r["id"], r["answer"]) for r in single]


def test_several_questions_are_checked_up_front(tmp_path):
    res = _run(["batch", tmp_path, "-q", QS[0], "-q", " ", "--model", tmp_path / "no-model"])
    assert res.exit_code == 2 and "empty" in res.stderr and res.stdout == ""


# --- --video-mode collage --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    write_video(root / "clip.mp4", n=12)  # frame i: flat grey (20 * i)
    shutil.copy(EXAMPLES / "scene-1.png", root / "still.png")
    return root


def _cells(image, cols, rows):
    """The mean grey of each cell of a collage, row by row."""
    import numpy as np

    arr = np.asarray(image.convert("L"), dtype=np.float64)
    h, w = arr.shape[0] // rows, arr.shape[1] // cols
    return [arr[r * h:(r + 1) * h, c * w:(c + 1) * w].mean() for r in range(rows) for c in range(cols)]


@pytest.mark.parametrize(("extra", "k", "cols", "rows"), [([], 6, 2, 3), (["--collage-layout", "3x2"], 6, 3, 2),
                                                        (["--collage-frames", 4], 4, 2, 2)])
def test_collage_is_one_row_per_video_with_the_papers_frames_layout_and_prefix(cli_backend, asked, clip, extra, k,
                                                                               cols, rows):
    res = _run(["batch", clip, "--video-mode", "collage", "-q", QS[0], "--tokens", 9, "--max-new-tokens", 2,
                *extra])
    assert res.exit_code == 0, res.output
    video, still = _rows(res.stdout)
    used = uniform_indices(12, k)  # IG-VLM's stride: 12 frames, 6 -> 0, 2, ..., 10
    assert video["id"] == video["source"] == str(clip / "clip.mp4")
    assert video["frame"] is None and video["time_s"] is None and video["frames"] == used
    assert video["question"] == QS[0] and video["error"] is None  # the user's question is recorded
    assert asked["questions"] == [collage_question(QS[0]), QS[0]]  # the prefix reaches the model, for the video only
    assert asked["questions"][0].startswith(COLLAGE_PREFIX + ". Question: ")
    sheet = asked["images"][0]
    assert sheet.size == (48 * cols, 48 * rows)
    # each cell shows its frame, row-major (mpeg4 keeps a flat grey within a few levels)
    assert _cells(sheet, cols, rows)[:k] == pytest.approx([20.0 * i for i in used], abs=6)
    assert still["id"] == str(clip / "still.png") and still["frames"] is None and still["question"] == QS[0]
    assert video["run"]["video_mode"] == "collage" and video["run"]["collage_frames"] == k


def test_collage_with_several_questions_and_resume(cli_backend, tower, clip, tmp_path):
    out = tmp_path / "c.jsonl"
    args = ["batch", clip / "clip.mp4", "--video-mode", "collage", "-q", QS[0], "-q", QS[1], "--tokens", 1,
            "--max-new-tokens", 2, "-o", out]
    assert _run(args).exit_code == 0
    rows = _rows(out.read_text())
    assert [r["id"] for r in rows] == [f"{clip / 'clip.mp4'}#q1", f"{clip / 'clip.mp4'}#q2"]
    assert sum(tower) == 1  # one collage, encoded once for both questions
    res = _run(["batch", clip / "clip.mp4", "-q", QS[0], "-q", QS[1], "--tokens", 1, "--max-new-tokens", 2, "-o", out,
                "--resume"])  # a frames run is not this file's run
    assert res.exit_code == 2 and "video_mode" in res.stderr


@pytest.mark.parametrize(("flags", "message"), [(["--fps", 1], "--fps"), (["--max-frames", 3], "--max-frames"),
                                                (["--collage-layout", "2x2"], "4 cells"),
                                                (["--collage-layout", "2by3"], "COLSxROWS")])
def test_collage_refuses_frame_sampling_flags_and_small_layouts(tmp_path, flags, message):
    res = _run(["batch", tmp_path, "--video-mode", "collage", *flags, "--model", tmp_path / "no-model"])
    assert res.exit_code == 2 and message in res.stderr and res.stdout == ""


# --- the Ray engine ---------------------------------------------------------------------------------------------


def test_metadata_with_undecodable_names_crosses_arrow(tmp_path):
    """Names that are not valid UTF-8 hold lone surrogates: the decode task's records must still be Arrow text."""
    pa = pytest.importorskip("pyarrow")
    from m3cli.engines.decode import Sampling
    from m3cli.engines.ray_workers import decode_item, decode_task, encode_item

    odd = os.path.join(os.fsencode(tmp_path), b"sc\xffene.png")
    shutil.copy(EXAMPLES / "scene-0.png", odd)
    item = next(iter(iter_inputs([os.fsdecode(odd)])))
    records = decode_task({"i": 0, "d": json.dumps({"item": encode_item(item)})}, Sampling())
    table = pa.Table.from_pylist([{"meta": r["meta"]} for r in records])  # ensure_ascii=False would fail here
    meta = json.loads(table.column("meta")[0].as_py())
    assert decode_item(meta["item"]).source == item.source and meta["error"] is None
    with pytest.raises((UnicodeEncodeError, pa.ArrowException)):
        pa.array([json.dumps(meta, ensure_ascii=False)])


def test_ray_note_on_a_rounded_budget_is_told_once():
    from m3cli.engines.ray import _noting

    notes = []
    records = [{"i": 0, "grid": 24}, {"i": 1, "grid": 24}]
    assert list(_noting(iter(records), 10, notes.append)) == records
    assert notes == ["--tokens 10 rounded down to 9, the largest nested scale <= it"]
    notes.clear()
    list(_noting(iter(records), 9, notes.append))
    assert notes == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own
def test_ray_engine_gives_the_local_rows_for_several_questions_and_collages(shipped, clip, scenes):
    ray = pytest.importorskip("ray")
    from m3cli.engines.ray import run_ray

    inputs = [str(clip / "clip.mp4"), *_paths(scenes)[:2]]
    kw = {"questions": QS[:2], "tokens": 10, "batch_size": 3, "max_new_tokens": 2, "video_mode": "collage"}
    local, _ = _batch(shipped, inputs, **kw)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        out, notes = io.StringIO(), []
        run_ray({"model": resolve_model(None), "backend": "auto", "device": "cpu"}, iter_inputs(inputs),
                BatchOptions(**kw), OrderedWriter(JsonlSink(out)), Summary(), None, 1, 0, notes=notes.append)
    finally:
        ray.shutdown()
    rows = _rows(out.getvalue())
    assert [r["id"] for r in rows] == [r["id"] for r in local] and len(rows) == 6
    assert [{c: r[c] for c in (*COMPARED, "frames")} for r in rows] == [{c: r[c] for c in (*COMPARED, "frames")}
                                                                        for r in local]
    assert notes == ["--tokens 10 rounded down to 9, the largest nested scale <= it"]
