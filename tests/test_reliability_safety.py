"""Nothing unsafe is loaded, no template or file name takes over a run or a terminal: one test per defect
(numbered as in the defect list this suite answers). The cache tests go through the one cache module
(:mod:`m3cli.cache`), which both the converted-checkpoint and the corrected-mmproj caches use."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_helpers import one_error_line as _one_error_line
from cli_helpers import run_cli as _run
from PIL import Image

Q = "what colour is the background?"
TINY_TRAIN = """
name: tiny
seed: 3
model: {vision_hidden: 32, vision_layers: 1, vision_heads: 2, text_hidden: 32, text_layers: 1,
        text_heads: 2, text_kv_heads: 2, text_intermediate: 64}
pool_images: 8
checkpoint_every: 1
stages:
  vision: {kind: vision, steps: 1, batch: 2, lr: 0.001}
"""


# ------------------------------------------------------------------------------- 8: train --resume


class _Planted:
    """An object whose unpickling runs code: what a crafted checkpoint.pt holds."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_08_train_resume_never_runs_a_checkpoints_code(tmp_path):
    import torch

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_TRAIN)
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"done": [], "model": {}, "heads": {}, "payload": _Planted(str(marker))}, run / "checkpoint.pt")
    res = _run(["train", "--config", config, "--out", run, "--resume"])
    assert res.exit_code == 2, res.output
    _one_error_line(res.stderr, "cannot be loaded safely")
    assert not marker.exists()


def test_08_a_checkpoint_holds_only_plain_data_and_loads_back(tmp_path):
    import torch

    from m3cli.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters(), betas=(0.9, 0.98))
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, {"stage": "vqa", "step": 3, "done": ["vision"], "model": lin.state_dict(),
                               "heads": lin.state_dict(), "opt": opt.state_dict()})
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # what a safe loader accepts
    assert type(state["model"]) is dict and state["opt"]["param_groups"][0]["betas"] == (0.9, 0.98)
    assert load_checkpoint(tmp_path)["step"] == 3
    torch.save({"done": "vision", "model": {}, "heads": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not an m3 train checkpoint"):
        load_checkpoint(tmp_path)


# -------------------------------------------------------------------------- 9, 10, 25: the one cache


def _build(content: bytes, calls: list):
    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "model.safetensors").write_bytes(content)
        (folder / "config.json").write_text("{}")
    return build


def test_09_a_foreign_or_planted_or_linked_cache_is_never_used(tmp_path, monkeypatch):
    from m3cli.cache import CacheError, cached_entry

    root = tmp_path / "cache"
    calls: list = []
    meta = {"source_sha256": "a" * 64}
    folder, created = cached_entry("converted", "m-1", _build(b"real", calls), meta=meta, what="converted copy",
                                   root=root)
    assert created and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert cached_entry("converted", "m-1", _build(b"real", calls), meta=meta, what="c", root=root) == (folder, False)
    # planted: other weights under the key, with or without a manifest of its own making
    (folder / "model.safetensors").write_bytes(b"evil")
    folder2, created = cached_entry("converted", "m-1", _build(b"real", calls), meta=meta, what="c", root=root)
    assert created and (folder2 / "model.safetensors").read_bytes() == b"real"
    # a symbolic link in place of the entry (or of a file in it) is never followed, only replaced
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"evil")
    import shutil

    shutil.rmtree(folder)
    folder.symlink_to(elsewhere, target_is_directory=True)
    folder3, created = cached_entry("converted", "m-1", _build(b"real", calls), meta=meta, what="c", root=root)
    assert created and not folder3.is_symlink() and (elsewhere / "model.safetensors").read_bytes() == b"evil"
    (folder3 / "model.safetensors").unlink()
    (folder3 / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    _, created = cached_entry("converted", "m-1", _build(b"real", calls), meta=meta, what="c", root=root)
    assert created and not (folder3 / "model.safetensors").is_symlink()
    # a root another user owns is refused, and nothing is built
    owner = root.stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    before = len(calls)
    with pytest.raises(CacheError, match="belongs to another user") as info:
        cached_entry("converted", "m-2", _build(b"x", calls), meta=meta, what="c", root=root)
    assert "\n" not in str(info.value) and len(calls) == before


def test_09_the_converted_cache_is_keyed_by_content(tmp_path, monkeypatch):
    from m3cli.convert.original_cache import cache_folder

    monkeypatch.setenv("M3_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "ckpt"
    src.mkdir()
    weights = src / "model.safetensors"
    weights.write_bytes(b"weights one")
    (src / "config.json").write_text("{}")
    spec = SimpleNamespace(model_dir=src, source=None)
    first = cache_folder(spec, "x")
    st = weights.stat()
    weights.write_bytes(b"weights two")  # the same name, size and modification time: another checkpoint
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_folder(spec, "x") != first
    weights.write_bytes(b"weights one")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_folder(spec, "x") == first


def test_10_a_shared_cache_folder_keeps_its_mode(tmp_path, caplog):
    from m3cli.cache import cached_entry

    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o2775)
    with caplog.at_level(logging.WARNING, logger="m3cli"):
        folder, _ = cached_entry("converted", "m-1", _build(b"w", []), meta={}, what="c", root=root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o2775  # setgid and the group kept
    mine = root / f"m3cli-{os.getuid()}"
    assert mine in folder.parents and stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert sum("writable by other users" in r.getMessage() for r in caplog.records) == 1


def test_25_a_damaged_converted_entry_is_rebuilt_once_with_a_notice(tmp_path, monkeypatch, caplog):
    import m3cli.convert.original_llava as conv
    import m3cli.models.weights as weights
    from m3cli.convert.original_cache import cached_conversion

    monkeypatch.setenv("M3_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{}")
    made = []

    def convert(model_dir, out, **kw):  # a stand-in for the conversion: the cache logic is what is tested
        made.append(out)
        Path(out).mkdir(exist_ok=True)
        (Path(out) / "model.safetensors").write_bytes(b"converted")
        (Path(out) / "config.json").write_text('{"m3cli": {}}')
        return out

    monkeypatch.setattr(conv, "convert_original_to_hf", convert)
    monkeypatch.setattr(weights, "check_weight_files", lambda folder: None)
    spec = SimpleNamespace(model_dir=src, source=None, needs_conversion=True, name="llava15-original")
    folder, created = cached_conversion(spec, "ckpt")
    assert created and len(made) == 1
    (folder / "model.safetensors").write_bytes(b"truncat")
    with caplog.at_level(logging.WARNING, logger="m3cli"):
        again, created = cached_conversion(spec, "ckpt")
    assert created and again == folder and len(made) == 2
    assert (folder / "model.safetensors").read_bytes() == b"converted"
    notices = [r.getMessage() for r in caplog.records if "rebuilding it once" in r.getMessage()]
    assert len(notices) == 1 and "model.safetensors changed" in notices[0] and "\n" not in notices[0]
    assert cached_conversion(spec, "ckpt") == (folder, False) and len(made) == 2


# ------------------------------------------------------------------------------ 11: bounded templates


BOMBS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "repetition": "{{ 'x' * 10000000000 }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "block doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}"
                      "{% endset %}{% endfor %}",
    "macro fan-out": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "format width": "{{ '%999999999s'|format(1) }}",
    "method width": "{{ 'x'.ljust(999999999) }}",
    "power": "{{ 9 ** 99999999 }}",
    "replace growth": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s|replace('a', "
                      "ns.s) %}{% endfor %}",
    "huge output": "{% for i in range(100000) %}{{ 'abcdefghij' * 50 }}{% endfor %}",
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_11_a_template_cannot_hang_or_grow_without_bound(name):
    import resource

    from m3cli.families.templates import TemplateError, render_chat_template

    start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TemplateError, match="chat template stopped") as info:
        render_chat_template(BOMBS[name] + "{{ messages[0]['content'][1]['text'] }}", Q)
    assert time.monotonic() - start < 10 and "\n" not in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 400 * 1024  # KiB: under 400 MB more


def test_11_the_bound_template_renders_what_transformers_renders():
    from m3cli.families.templates import render_chat_template

    template = ("{% for m in messages %}{{ m['role']|upper ~ ': ' }}{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text']|trim }}{% endif %}{% endfor %}"
                "{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}")
    assert render_chat_template(template, Q) == f"USER: <image>\n{Q} ASSISTANT:"


def test_11_a_hostile_model_template_is_one_line_through_the_cli(tmp_path, tiny_model_dir):
    bomb = tmp_path / "bomb.jinja"
    bomb.write_text(BOMBS["nested loops"])
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 48), (9, 9, 9)).save(image)
    start = time.monotonic()
    res = _run(["ask", image, Q, "--chat-template", bomb, "--model", tiny_model_dir])
    assert time.monotonic() - start < 60
    assert res.exit_code == 2, res.output  # refused when the model loads, before any work
    _one_error_line(res.stderr, "chat template stopped")


# --------------------------------------------------------------------- 12: terminals and spreadsheets


def test_12_text_output_escapes_control_characters_and_csv_cells_are_safe(tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    evil = folder / "a\x1b]0;owned\x07\x1b[2J.png"
    formula = folder / "=HYPERLINK(\"x\",\"y\").png"
    for path in (evil, formula):
        Image.new("RGB", (48, 48), (200, 0, 0)).save(path, format="PNG")
    monkeypatch.chdir(folder)  # names as given: the id and source cells start with the name itself
    base = ["batch", evil.name, formula.name, "-q", Q, "--tokens", "1", "--max-new-tokens", "1", "--model",
            tiny_model_dir]
    res = _run(base + ["--format", "text"])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout
    assert "a\\x1b]0;owned\\x07\\x1b[2J.png" in res.stdout
    res = _run(base + ["--format", "csv"])
    assert res.exit_code == 0, res.output
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    cells = [c for r in rows for c in r.values() if c]
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells), cells
    assert any(c.startswith("'=HYPERLINK(") for c in cells)


def test_12_one_line_errors_escape_control_characters():
    from m3cli.errors import M3Error

    assert str(M3Error("x\x1b[31my\u202ez")) == "x\\x1b[31my\\u202ez"


# ------------------------------------------------------------------------------ 24: an address that lies


def test_24_an_address_that_is_no_ray_cluster_fails_fast_in_one_line():
    from m3cli.engines import EngineError
    from m3cli.engines.ray_cluster import check_reachable, ray_error_line

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []
    stop = threading.Event()

    def accept():  # accepts and then says nothing, like a black hole or another service
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(EngineError, match="does not answer as a Ray cluster") as info:
            check_reachable(f"127.0.0.1:{server.getsockname()[1]}", timeout=1.0)
        assert time.monotonic() - start < 5 and "\n" not in str(info.value)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    folded = RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                          '  File "gcs.py", line 3, in connect\n    raise ConnectionError("GCS down")\n'
                          "ConnectionError: GCS down")
    line = ray_error_line(folded)
    assert "Traceback" not in line and line.endswith("ConnectionError: GCS down")


def test_24_unreachable_ray_address_through_the_cli(tmp_path):
    pytest.importorskip("ray")
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    image = tmp_path / "a.png"
    Image.new("RGB", (48, 48), (9, 9, 9)).save(image)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "m3cli", "batch", str(image), "--engine", "ray", "--ray-address",
                           f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, "no Ray cluster reachable")
    assert json.dumps(proc.stdout) == '""'
