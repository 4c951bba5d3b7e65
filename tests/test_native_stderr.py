"""Ray's C++ log lines are dropped from fd 2; everything else (logs, progress bars) passes unchanged."""

import os

from m3cli.engines.native_stderr import filter_native_stderr

RAY_LINE = (b"[2026-11-26 13:29:30,889 E 16022 16022] core_worker.cc:2465: Actor with class name: "
            b"'MapWorker(MapBatches(_Answerer))' has constructor arguments in the object store\n")


def test_native_lines_dropped_rest_kept(capfd):
    with filter_native_stderr():
        os.write(2, b"m3: WARNING: ours\n")
        os.write(2, RAY_LINE[:30])  # a native line may arrive in pieces
        os.write(2, RAY_LINE[30:])
        os.write(2, b"bar: 1item\rbar: 2item\r")
        os.write(2, b"[not a log line] kept\n")
        os.write(2, b"tail without newline")
    err = capfd.readouterr().err
    assert err == "m3: WARNING: ours\nbar: 1item\rbar: 2item\r[not a log line] kept\ntail without newline"


def test_disabled_keeps_native_lines(capfd):
    with filter_native_stderr(enabled=False):
        os.write(2, RAY_LINE)
    assert capfd.readouterr().err == RAY_LINE.decode()


def test_fd2_restored(capfd):
    with filter_native_stderr():
        pass
    os.write(2, RAY_LINE)
    assert capfd.readouterr().err == RAY_LINE.decode()
