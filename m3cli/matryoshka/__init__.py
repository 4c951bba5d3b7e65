"""The M3 maths, model-free: nested scales and pooling (``scales``), scale policies (``policy``) and the
confidence measures that drive escalation (``confidence``).

Nothing here imports another m3cli layer except the leaf ``errors``; torch is imported lazily by ``pool``, so
the llama.cpp backend and the CLI use this package without torch.
"""
