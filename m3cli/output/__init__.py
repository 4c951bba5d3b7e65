"""Result rows: schema, in-order writing, JSONL/CSV/text sinks, resume from a JSONL output, run summary.

Rows come back from workers out of order; :class:`OrderedWriter` puts them back in input order and writes
and flushes each one as soon as every row before it is done, so a killed run loses at most the rows still
buffered, and :func:`read_done_ids` can resume it from the JSONL file it left behind.

``sinks`` holds the schema and formats, ``ordered`` the writer, ``resume`` the JSONL scan and repair (and the
checks ``--resume`` makes before it appends), ``target`` the output guard every file m3 writes goes through
(:class:`OutputTarget` for results written row by row, :class:`OutputFile` for files written whole),
``summary`` the end-of-run counts.
"""

from __future__ import annotations

from m3cli.output.ordered import OrderedWriter
from m3cli.output.resume import (
    BATCH_ROWS,
    ResumeState,
    RowSchema,
    looks_like,
    prepare_resume,
    read_done_ids,
    read_error_ids,
    repair_jsonl,
)
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
from m3cli.output.target import (
    FolderInput,
    OutputFile,
    OutputTarget,
    check_folder,
    check_output_dir,
    check_path,
    is_stdout,
)

__all__ = [
    "BATCH_ROWS",
    "CONFIDENCE_DIGITS",
    "ROW_KEYS",
    "CsvSink",
    "FolderInput",
    "Format",
    "JsonlSink",
    "OrderedWriter",
    "OutputFile",
    "OutputTarget",
    "OutputWriteError",
    "ResumeState",
    "RowSchema",
    "RowSink",
    "Summary",
    "TextSink",
    "check_folder",
    "check_output_dir",
    "check_path",
    "is_stdout",
    "looks_like",
    "make_row",
    "open_sink",
    "prepare_resume",
    "read_done_ids",
    "read_error_ids",
    "repair_jsonl",
    "round_confidence",
    "round_confidences",
]
