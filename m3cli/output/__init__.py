"""Result rows: schema, in-order writing, JSONL/CSV/text sinks, resume from a JSONL output, run summary.

Rows come back from workers out of order; :class:`OrderedWriter` puts them back in input order and writes
and flushes each one as soon as every row before it is done, so a killed run loses at most the rows still
buffered, and :func:`read_done_ids` can resume it from the JSONL file it left behind.

``sinks`` holds the schema and formats, ``ordered`` the writer, ``resume`` the JSONL scan and repair (and the
checks ``--resume`` makes before it appends), ``target`` the locked ``-o`` file of a run, ``summary`` the
end-of-run counts.
"""

from __future__ import annotations

from m3cli.output.ordered import OrderedWriter
from m3cli.output.resume import ResumeState, prepare_resume, read_done_ids, read_error_ids, repair_jsonl
from m3cli.output.sinks import (
    CONFIDENCE_DIGITS,
    ROW_KEYS,
    CsvSink,
    Format,
    JsonlSink,
    OutputWriteError,
    RowSink,
    TextSink,
    make_row,
    open_sink,
    round_confidence,
    round_confidences,
)
from m3cli.output.summary import Summary
from m3cli.output.target import OutputTarget, is_stdout

__all__ = [
    "CONFIDENCE_DIGITS",
    "ROW_KEYS",
    "CsvSink",
    "Format",
    "JsonlSink",
    "OrderedWriter",
    "OutputTarget",
    "OutputWriteError",
    "ResumeState",
    "RowSink",
    "Summary",
    "TextSink",
    "is_stdout",
    "make_row",
    "open_sink",
    "prepare_resume",
    "read_done_ids",
    "read_error_ids",
    "repair_jsonl",
    "round_confidence",
    "round_confidences",
]
