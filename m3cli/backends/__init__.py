"""Backends behind one interface (see base.Backend); ``open_backend`` resolves a model and loads one.

* ``torch``: transformers ``LlavaForConditionalGeneration`` (Hugging Face model directories, hub ids, and
  original-layout LLaVA checkpoints converted once into the cache: see ``locate``).
* ``llamacpp``: GGUF models through llama-cpp-python.
* ``prompt``: the one place that builds a model's prompt ids, shared by both (on the model family's recipe).

Every backend detects the model's family before any weights load, so a model m3 cannot run is refused in one
line (exit 2) before any work.
"""

from __future__ import annotations

from m3cli.backends.base import AnswerRequest, Backend, Encoded, Generation, ModelLoadError

__all__ = ["AnswerRequest", "Backend", "Encoded", "Generation", "ModelLoadError", "check_model", "load_backend",
           "open_backend"]

BACKENDS = ("auto", "torch", "llamacpp")
GGUF_OPTIONS = ("mmproj", "n_gpu_layers", "mmproj_offload", "ctx", "prefix_after_special")
TORCH_OPTIONS = ("vision_tower",)


def is_gguf_backend(backend: str, path: str) -> bool:
    """Whether ``backend`` (auto, torch or llamacpp) runs ``path`` on llama.cpp."""
    return backend == "llamacpp" or (backend == "auto" and str(path).lower().endswith(".gguf"))


def open_backend(model: str | None = None, backend: str = "auto", verbose: bool | None = None, **options) -> Backend:
    """Resolve ``model`` (registry name, path or hub id; None: the shipped model) and load its backend.

    ``verbose`` routes llama.cpp's own logs to stderr; None means "when the CLI runs with -v".
    ``vision_tower`` (torch; default ``$M3_VISION_TOWER``) is the CLIP directory of an original checkpoint
    that does not carry its tower; ``chat_template`` (both backends) is ``--chat-template FILE|NAME``.
    Errors are one line (:class:`ModelLoadError`, ``RegistryError``, hub and conversion errors).
    """
    from m3cli.models.registry import resolve_model

    path = resolve_model(model)
    if is_gguf_backend(backend, path):
        if verbose is None:
            from m3cli import logs

            verbose = logs.verbosity() >= 1
        options["verbose"] = verbose
    return load_backend(backend, path, **options)


def check_model(model: str | None = None, backend: str = "auto", **options) -> None:
    """Refuse, in one line, a model the torch backend cannot run, without loading or converting anything.

    For a driver that loads the model elsewhere (e.g. in Ray actors): resolution, hub lookup of the small
    files and family detection, as :func:`open_backend` does first. GGUF models are left to their backend.
    """
    from m3cli.models.registry import resolve_model

    path = resolve_model(model)
    if is_gguf_backend(backend, path):
        return
    from m3cli.backends.locate import find_model

    find_model(path, vision_tower=options.get("vision_tower"), chat_template=options.get("chat_template"))


def load_backend(name: str, model: str, **options) -> Backend:
    """Instantiate a backend; ``auto`` picks llama.cpp for ``.gguf`` files and torch otherwise.

    Options that belong to the other backend are dropped when left at their defaults (None) and
    refused when set, so ``--mmproj`` with a torch model is an error, not silently ignored.
    """
    if name == "auto":
        name = "llamacpp" if is_gguf_backend(name, model) else "torch"
    if name == "torch":
        stray = [k for k in GGUF_OPTIONS if options.get(k) is not None]
        if stray:
            raise ModelLoadError(f"{_flags(stray)} apply to GGUF models (--backend llamacpp) only")
        from m3cli.backends.torch import TorchBackend

        options.pop("verbose", None)
        return TorchBackend(model, **{k: v for k, v in options.items() if k not in GGUF_OPTIONS})
    if name == "llamacpp":
        stray = [k for k in TORCH_OPTIONS if options.get(k) is not None]
        if stray:
            raise ModelLoadError(f"{_flags(stray)} apply to original-layout LLaVA checkpoints (torch backend) only")
        options = {k: v for k, v in options.items() if k not in TORCH_OPTIONS}
        try:
            from m3cli.backends.llamacpp import load_llamacpp
        except ImportError as exc:
            raise ModelLoadError(
                f"the llama.cpp backend needs the gguf extra: pip install 'm3cli[gguf]' ({exc})"
            ) from exc
        return load_llamacpp(model, **{k: v for k, v in options.items() if v is not None})
    raise ModelLoadError(f"unknown backend {name!r} (one of {', '.join(BACKENDS)})")


def _flags(names: list[str]) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in names)
