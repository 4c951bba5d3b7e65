"""``m3 models``: a header, the default marked, each model's policy, and whether and where a copy is local."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from m3cli.cli import cli


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A registry with a shipped model, a converted hub model, a hub model in the HF cache and an absent one."""
    models = tmp_path / "models"
    (models / "shipped").mkdir(parents=True)
    (models / "shipped" / "model.safetensors").write_bytes(b"\0" * 2500)
    (models / "registry.yaml").write_text(
        "models:\n"
        "  m3-shapes:\n    path: shipped\n    format: hf\n    scales: [576, 144, 36, 9, 1]\n"
        "    policy: {tokens: 144, auto_scale: true, threshold: 0.7, measure: sequence}\n"
        "  conv:\n    hub: org/conv-m3\n    format: llava-original\n    scales: [576, 144, 36, 9, 1]\n"
        "  cached:\n    hub: org/cached\n    format: hf\n"
        "  absent:\n    hub: org/absent\n    format: hf\n")
    monkeypatch.setenv("M3CLI_MODELS_DIR", str(models))
    cache = tmp_path / "m3-cache"
    (cache / "converted" / "org-conv-m3-0123456789abcdef").mkdir(parents=True)
    (cache / "converted" / "org-conv-m3-0123456789abcdef" / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    monkeypatch.setenv("M3_CACHE_DIR", str(cache))
    hub = tmp_path / "hub"
    snap = hub / "models--org--cached" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"\0" * 40_000)
    (hub / "models--org--cached" / "refs").mkdir()
    (hub / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return models


def test_table_has_a_header_marks_the_default_and_says_what_is_local(registry):
    res = CliRunner().invoke(cli, ["models"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["name", "format", "local", "copy", "size", "default", "policy", "source"]
    by_name = {ln.split()[1] if ln.startswith("*") else ln.split()[0]: ln for ln in lines[1:5]}
    assert by_name["m3-shapes"].startswith("*") and not by_name["conv"].startswith("*")
    assert "shipped" in by_name["m3-shapes"] and "2.5 kB" in by_name["m3-shapes"]
    assert "--tokens 144 --auto-scale --threshold 0.7 --measure sequence" in by_name["m3-shapes"]
    assert "converted (m3 cache)" in by_name["conv"] and "3.0 MB" in by_name["conv"]
    assert "none: the full grid (576), fixed" in by_name["conv"]
    assert "Hugging Face cache" in by_name["cached"] and "40.0 kB" in by_name["cached"]
    assert "not downloaded" in by_name["absent"]
    assert "* the default" in res.stdout


def test_json_lines(registry):
    res = CliRunner().invoke(cli, ["models", "--json"])
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["m3-shapes", "conv", "cached", "absent"]
    assert [r["default"] for r in rows] == [True, False, False, False]
    assert rows[0]["bytes"] == 2500 and rows[3]["bytes"] is None and rows[1]["source"] == "org/conv-m3"


def test_the_shipped_registry_lists_the_shipped_model_as_default():
    res = CliRunner().invoke(cli, ["models"])
    default = next(ln for ln in res.stdout.splitlines() if ln.startswith("*"))
    assert default.split()[1] == "m3-shapes" and "shipped" in default
