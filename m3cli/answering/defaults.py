"""Defaults every answering command shares, in a module light enough for the CLI to import at start-up."""

from __future__ import annotations

# Asked when neither -q nor an input's own row gives a question (m3 ask without QUESTION, m3 batch without -q);
# it is recorded in every row like any other question.
DEFAULT_QUESTION = "What is this?"
