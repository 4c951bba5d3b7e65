"""Backends behind one interface (see base.Backend); ``load_backend`` picks one by name."""

from __future__ import annotations

from m3cli.backends.base import AnswerRequest, Backend, Encoded, Generation, ModelLoadError

__all__ = ["AnswerRequest", "Backend", "Encoded", "Generation", "ModelLoadError", "load_backend"]

BACKENDS = ("auto", "torch")


def load_backend(name: str, model: str, **options) -> Backend:
    """Instantiate a backend; ``auto`` means torch (GGUF files will pick llama.cpp)."""
    if name in ("auto", "torch"):
        from m3cli.backends.torch_backend import TorchBackend

        return TorchBackend(model, **options)
    raise ModelLoadError(f"unknown backend {name!r} (one of {', '.join(BACKENDS)})")
