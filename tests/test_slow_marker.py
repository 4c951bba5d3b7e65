"""The ``slow`` marker: every test SLOW_TESTS names exists, so a renamed test does not silently join the quick
subset, and the marker is registered."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import SLOW_TESTS

TESTS = Path(__file__).resolve().parent


def test_every_slow_entry_names_an_existing_test():
    missing = []
    for file, names in SLOW_TESTS.items():
        path = TESTS / file
        if not path.is_file():
            missing.append(file)
            continue
        text = path.read_text(encoding="utf-8")
        missing += [f"{file}::{n}" for n in names or () if not re.search(rf"^def {re.escape(n)}\(", text, re.M)]
    assert not missing, missing


def test_the_marker_is_registered():
    pyproject = (TESTS.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^markers = \[\n\s+"slow: ', pyproject, re.M)
