"""Result rows: schema, in-order writing, JSONL/CSV/text sinks, resume from a JSONL output, run summary.

Rows come back from workers out of order; :class:`OrderedWriter` puts them back in input order and writes
and flushes each one as soon as every row before it is done, so a killed run loses at most the rows still
buffered, and :func:`read_done_ids` can resume it from the JSONL file it left behind.

``sinks`` holds the schema and formats, ``ordered`` the writer, ``resume`` the JSONL scan and repair,
``summary`` the end-of-run counts.
"""

from __future__ import annotations

from m3cli.output.ordered import OrderedWriter
from m3cli.output.resume import read_done_ids, read_error_ids, repair_jsonl
from m3cli.output.sinks import ROW_KEYS, CsvSink, Format, JsonlSink, RowSink, TextSink, make_row, open_sink
from m3cli.output.summary import Summary

__all__ = [
    "ROW_KEYS",
    "CsvSink",
    "Format",
    "JsonlSink",
    "OrderedWriter",
    "RowSink",
    "Summary",
    "TextSink",
    "make_row",
    "open_sink",
    "read_done_ids",
    "read_error_ids",
    "repair_jsonl",
]
