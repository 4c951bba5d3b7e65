"""Logging set-up: our messages on stderr; third-party noise silenced unless verbose."""

from __future__ import annotations

import logging
import os
import warnings

_VERBOSITY = 0


def verbosity() -> int:
    """The -v count given to the last ``configure`` call."""
    return _VERBOSITY


NOISY = ("transformers", "torch", "PIL", "huggingface_hub", "urllib3", "filelock", "av", "libav")


def configure(verbosity: int = 0) -> None:
    """0: warnings of ours only; 1 (-v): our info + third-party warnings; 2 (-vv): debug everywhere."""
    global _VERBOSITY
    _VERBOSITY = verbosity
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="m3: %(levelname)s: %(message)s", force=True)
    logging.getLogger("m3cli").setLevel(level)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    third_party = logging.ERROR if verbosity == 0 else logging.WARNING if verbosity == 1 else logging.DEBUG
    for name in NOISY:
        logging.getLogger(name).setLevel(third_party)
    if verbosity == 0:
        warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(third_party)
        if verbosity == 0:
            hf_logging.disable_progress_bar()
        else:
            hf_logging.enable_progress_bar()
    except ImportError:  # transformers is a hard dependency; tolerate a broken install at log set-up
        pass
