"""The measurements behind ``m3 bench``: pure measurement, one module per kind; ``report`` formats the tables.

A leaf package: only the CLI imports it. ``latency`` times each scale, ``throughput`` the batch engine
against a naive loop, ``escalation`` ``--auto-scale`` against a fixed pass, ``memory`` the peak RSS of a
long stream, ``gguf`` our llama.cpp backend against the stock handler, ``ray`` the Ray engine against the
single process.
"""
