"""Logging set-up: our messages on stderr; third-party noise silenced unless verbose.

Nothing here imports a third-party library: transformers and huggingface_hub read their verbosity from
environment variables when they are first imported, so a command that never loads a model (``m3 merge``,
``m3 --help``) never pays for importing them. Only a library that is already imported is set directly.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_VERBOSITY = 0


def verbosity() -> int:
    """The -v count given to the last ``configure`` call."""
    return _VERBOSITY


NOISY = ("transformers", "torch", "PIL", "huggingface_hub", "urllib3", "filelock", "av", "libav")
# The names transformers and huggingface_hub accept in TRANSFORMERS_VERBOSITY / HF_HUB_VERBOSITY.
_LEVEL_NAMES = {logging.ERROR: "error", logging.WARNING: "warning", logging.INFO: "info", logging.DEBUG: "debug"}


def configure(verbosity: int = 0) -> None:
    """0: warnings of ours only; 1 (-v): our info + third-party warnings; 2 (-vv): debug everywhere."""
    global _VERBOSITY
    _VERBOSITY = verbosity
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="m3: %(levelname)s: %(message)s", force=True)
    logging.getLogger("m3cli").setLevel(level)
    third_party = logging.ERROR if verbosity == 0 else logging.WARNING if verbosity == 1 else logging.DEBUG
    # Read at import time by the libraries themselves (and inherited by worker processes).
    if verbosity == 0:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TRANSFORMERS_VERBOSITY"] = _LEVEL_NAMES[third_party]
    os.environ["HF_HUB_VERBOSITY"] = _LEVEL_NAMES[third_party]
    for name in NOISY:
        logging.getLogger(name).setLevel(third_party)
    if verbosity == 0:
        warnings.filterwarnings("ignore")
    if "transformers" in sys.modules:  # already imported (a second configure in one process): set it now
        _set_transformers(third_party, verbosity)


def _set_transformers(level: int, verbosity: int) -> None:
    """transformers' own logger and progress bars, for a library that is already imported."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # a broken install: nothing to silence
        return
    hf_logging.set_verbosity(level)
    if verbosity == 0:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()
