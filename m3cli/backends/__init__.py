"""Backends behind one interface (see base.Backend); ``load_backend`` picks one by name."""

from __future__ import annotations

from m3cli.backends.base import AnswerRequest, Backend, Encoded, Generation, ModelLoadError

__all__ = ["AnswerRequest", "Backend", "Encoded", "Generation", "ModelLoadError", "load_backend"]

BACKENDS = ("auto", "torch", "llamacpp")
GGUF_OPTIONS = ("mmproj", "n_gpu_layers", "mmproj_offload", "ctx")


def load_backend(name: str, model: str, **options) -> Backend:
    """Instantiate a backend; ``auto`` picks llama.cpp for ``.gguf`` files and torch otherwise.

    Options that belong to the other backend are dropped when left at their defaults (None) and
    refused when set, so ``--mmproj`` with a torch model is an error, not silently ignored.
    """
    if name == "auto":
        name = "llamacpp" if str(model).lower().endswith(".gguf") else "torch"
    if name == "torch":
        stray = [k for k in GGUF_OPTIONS if options.get(k) is not None]
        if stray:
            flags = ", ".join("--" + k.replace("_", "-") for k in stray)
            raise ModelLoadError(f"{flags} apply to GGUF models (--backend llamacpp) only")
        from m3cli.backends.torch_backend import TorchBackend

        return TorchBackend(model, **{k: v for k, v in options.items() if k not in GGUF_OPTIONS})
    if name == "llamacpp":
        try:
            from m3cli.backends.llamacpp_backend import load_llamacpp
        except ImportError as exc:
            raise ModelLoadError(
                f"the llama.cpp backend needs the gguf extra: pip install 'm3cli[gguf]' ({exc})"
            ) from exc
        return load_llamacpp(model, **{k: v for k, v in options.items() if v is not None})
    raise ModelLoadError(f"unknown backend {name!r} (one of {', '.join(BACKENDS)})")
