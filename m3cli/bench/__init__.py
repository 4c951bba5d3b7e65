"""The measurements behind ``m3 bench``: pure measurement, one module per kind; ``report`` formats the tables.

A leaf package: only the CLI imports it. ``latency`` times each scale, ``throughput`` the batch engine against
a naive loop, ``escalation`` ``--auto-scale`` against a fixed pass, ``memory`` the peak RSS of a long stream,
``gguf`` our llama.cpp backend against the stock handler, ``ray`` the Ray engine against the single process,
``decode`` exact image decoding against ``--fast-decode`` (no model). ``--shape`` runs them on paper-scale
architectures with random weights: ``shapes`` sizes them (and refuses what will not fit), ``shape_model``
builds one in memory, ``shape_bench`` runs the benches on it, ``shape_gguf`` writes its GGUF pair, and
``profile`` shows where a small prefill's time goes.
"""
