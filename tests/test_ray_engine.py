"""The Ray Data engine gives the single-process runner's rows: order, content, resume, bad address, dead actor."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import sys
import time

import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own

from media_factory import write_video  # noqa: E402

from m3cli.engines import EngineError, EngineRunError  # noqa: E402
from m3cli.engines.local import BatchOptions, run_batch  # noqa: E402
from m3cli.engines.ray import preflight, run_ray  # noqa: E402
from m3cli.media import iter_inputs  # noqa: E402
from m3cli.output import JsonlSink, OrderedWriter, Summary, open_sink, read_done_ids  # noqa: E402

Q = "what colour is the background?"
COMPARED = ("id", "source", "frame", "time_s", "question", "answer", "tokens", "model", "backend", "error")


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (48, 48), colour)
    im.paste((255 - colour[0], colour[1], 255 - colour[2]), (8, 8, 24, 30))
    im.save(path)
    return path




@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-in")
    _img(root / "a.png", (200, 0, 0))
    _img(root / "b.png", (0, 200, 0))
    write_video(root / "c.mp4")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage" * 5)
    _img(root / "d.png", (0, 0, 200))
    _img(root / "sub" / "e.png", (120, 120, 120))
    _img(root / "sub" / "f.png", (30, 160, 90))
    return root


@pytest.fixture(scope="module")
def local_ray():
    """One small local cluster for the module; run_ray uses it and leaves it running; stopped here."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


def _opts(**kw):
    return BatchOptions(question=Q, tokens=9, batch_size=3, max_new_tokens=2, max_frames=3, **kw)


def _rows_of(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def _close(x, y):
    """Equal, except confidences: the cluster cuts batches differently, so float noise (1e-6) is allowed."""
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, float) and isinstance(y, float):
        return x == pytest.approx(y, abs=1e-4)
    return x == y


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert {k: x[k] for k in COMPARED} == {k: y[k] for k in COMPARED}
        assert _close(x["confidence"], y["confidence"]) and _close(x["scales_tried"], y["scales_tried"])
        assert x.keys() == y.keys() and (x["timings"] is None) == (y["timings"] is None)


@pytest.fixture(scope="module")
def reference(folder, tiny_backend):
    out = io.StringIO()
    run_batch(tiny_backend, iter_inputs([str(folder)]), _opts(), OrderedWriter(JsonlSink(out)), Summary())
    return _rows_of(out)


def _model_kw(tiny_model_dir):
    return {"model": str(tiny_model_dir), "backend": "auto", "device": "cpu"}


def test_missing_ray_is_one_line(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(EngineError, match=r"pip install 'm3cli\[ray\]'"):
        run_ray(_model_kw(tiny_model_dir), [], _opts(), OrderedWriter(JsonlSink(io.StringIO())), Summary(), None, 1, 0)


def test_failure_part_way_names_what_resume_must_redo():
    """Without a cluster: the driver's merge loop, fed two rows and then a Ray failure."""
    from m3cli.engines.ray import _Merger, _PipelineFailed, _plan, _run_error
    from m3cli.media import BadInput, Item
    from m3cli.output import make_row

    items = [Item("a", "a.png", "image"), Item("b", "b.png", "image"), Item("v", "v.mp4", "video"),
             BadInput("x", "x", "broken"), Item("c", "c.png", "image")]
    plan = _plan(items, BatchOptions(done_ids={"b"}))
    assert [p.descriptor is None for p in plan] == [False, True, False, False, False]

    def records():
        yield {"i": 0, "j": 0, "id": "a", "skip": False, "row": json.dumps(make_row(id="a", answer="red"))}
        yield {"i": 2, "j": 0, "id": "v#0", "skip": False, "row": json.dumps(make_row(id="v#0", frame=0))}
        raise RuntimeError("ray::MapWorker failed\nActorDiedError: the actor died unexpectedly")

    out = io.StringIO()
    writer = OrderedWriter(JsonlSink(out))
    seq = iter(range(100))
    merger = _Merger(plan, lambda ident: writer.skip(next(seq)), lambda row: writer.put(next(seq), row))
    with pytest.raises(_PipelineFailed) as failed:
        merger.run(records())
    err = _run_error(failed.value.__cause__, plan, merger.position, writer.written)
    assert isinstance(err, EngineRunError) and err.missing_ids == ["v", "x", "c"]  # v: half written
    assert "after 2 row(s)" in str(err) and "--resume" in str(err) and "\n" not in str(err)
    assert [r["id"] for r in _rows_of(out)] == ["a", "v#0"]
    setup = _run_error(RuntimeError("m3-ray-setup:model directory not found: /nope"), plan, 0, 0)
    assert isinstance(setup, EngineError) and str(setup).endswith("model directory not found: /nope")


def test_unreachable_address_fails_fast(tiny_model_dir):
    with socket.socket() as s:  # a port on this machine that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = io.StringIO()
    start = time.monotonic()
    with pytest.raises(EngineError, match=f"127.0.0.1:{port}") as err:
        run_ray(_model_kw(tiny_model_dir), iter_inputs(["nothing-here.png"]), _opts(),
                OrderedWriter(JsonlSink(out)), Summary(), f"127.0.0.1:{port}", 1, 0)
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value) and out.getvalue() == ""
    with pytest.raises(EngineError, match=f"127.0.0.1:{port}"):  # the CLI's check before it opens -o FILE
        preflight(_model_kw(tiny_model_dir), f"127.0.0.1:{port}")


def test_rows_equal_single_process(local_ray, folder, reference, tiny_model_dir):
    out = io.StringIO()
    summary = Summary()
    seen = []
    run_ray(_model_kw(tiny_model_dir), iter_inputs([str(folder)]), _opts(), OrderedWriter(JsonlSink(out)), summary,
            None, 2, 0, on_row=seen.append)
    rows = _rows_of(out)
    _same(rows, reference)
    assert len(seen) == len(rows) and [r["id"] for r in seen] == [r["id"] for r in rows]
    assert sum(r["frame"] is not None for r in rows) == 3 and summary.failed == 1 and summary.done == len(rows) - 1
    assert ray.is_initialized()  # a connection the caller made is left to the caller


def test_resume_skips_done_ids(local_ray, folder, reference, tiny_model_dir, tmp_path):
    path = tmp_path / "out.jsonl"
    # first four rows: a, b and two frames of the video (so frame skipping is exercised); half a fifth row
    lines = [json.dumps(r) + "\n" for r in reference]
    path.write_text("".join(lines[:4]) + lines[4][:20])
    done = read_done_ids(path)
    assert len(done) == 4
    summary = Summary()
    writer = OrderedWriter(open_sink("jsonl", path, append=True))
    run_ray(_model_kw(tiny_model_dir), iter_inputs([str(folder)]), _opts(done_ids=done), writer, summary, None, 1, 0)
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    _same(rows, reference)
    assert summary.skipped == 4 and summary.done + summary.failed == len(reference) - 4


def _actor_pids():
    """Pids of the live answering actors, from their process titles (the state API needs the dashboard)."""
    pids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::MapWorker"):
                        pids.add(int(pid))
            except OSError:
                pass
    return pids


def test_killed_actor_is_replaced_and_its_batch_retried(local_ray, tmp_path, tiny_model_dir):
    for i in range(24):
        _img(tmp_path / "many" / f"{i:03d}.png", ((i * 37) % 255, (i * 91) % 255, (i * 13) % 255))
    out = io.StringIO()
    killed = []

    def kill_one(row):
        if not killed:
            pids = sorted(_actor_pids())
            assert pids, "no answering actor found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    opts = BatchOptions(question=Q, tokens=9, batch_size=2, max_new_tokens=2)
    try:
        run_ray(_model_kw(tiny_model_dir), iter_inputs([str(tmp_path / "many")]), opts,
                OrderedWriter(JsonlSink(out)), Summary(), None, 2, 0, on_row=kill_one)
    except EngineRunError as exc:  # the other acceptable outcome: a clean failure naming what --resume redoes
        rows = _rows_of(out)
        assert len(rows) + len(exc.missing_ids) == 24
        pytest.fail(f"run failed after the kill instead of retrying: {exc}")
    assert killed
    ids = [r["id"] for r in _rows_of(out)]
    assert ids == sorted(str(p) for p in (tmp_path / "many").iterdir())  # every item exactly once, in order
    assert all(r["error"] is None for r in _rows_of(out))


def test_bench_ray_times_single_process_and_each_actor_count(local_ray, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from m3cli.cli import cli

    res = CliRunner().invoke(cli, ["bench", "ray", "--model", str(tiny_model_dir), "--device", "cpu", "-n", "6",
                                   "--batch-size", "2", "--max-new-tokens", "1", "--actors", "1", "--repeat", "2",
                                   "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = [line.split("|") for line in res.stdout.splitlines() if line.startswith("| single") or
            line.startswith("| Ray")]
    assert [r[1].strip() for r in rows] == ["single process (`m3 batch`)", "Ray, 1 actor"]
    assert all(r[2].strip() == "6" for r in rows)
    for r in rows:  # rates as "median [min-max]" over the two runs
        for cell in (r[5], r[6], r[8]):
            median, low, high = (float(x) for x in re.fullmatch(r"\s*(\S+) \[(\S+)-(\S+)\]\s*", cell).groups())
            assert 0 < low <= median <= high
    assert rows[0][7].strip() == "1.00x" and rows[0][9].strip() == "1.00x"
    assert "already running" in res.stdout  # the test's cluster: not started, not timed, not stopped


def test_bench_ray_bad_actor_list_is_usage_error(tiny_model_dir):
    from click.testing import CliRunner

    from m3cli.cli import cli

    res = CliRunner().invoke(cli, ["bench", "ray", "--model", str(tiny_model_dir), "--actors", "0"])
    assert res.exit_code == 2 and "--actors" in res.stderr and "Traceback" not in res.output
