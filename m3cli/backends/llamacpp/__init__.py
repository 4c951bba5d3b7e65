"""llama.cpp backend (GGUF LLaVA through llama-cpp-python's low-level API).

* ``backend``: :class:`LlamaCppBackend` (encode with mtmd, pool in NumPy, decode greedily) and
  :func:`load_llamacpp`, the entry point that maps the shared ``--device/--dtype/--threads`` options.
* ``family``: the pair's model family from its metadata (recipe, ``--chat-template``, pad/crop) and the exact
  tower-size bitmap handed to mtmd.
* ``tokenizer``: llama.cpp's vocabulary as the family layer's tokenizer adapter (so prompt ids equal the
  torch backend's).
* ``probe``: the start-up probe of how the linked build orders LLaVA encoder rows.
* ``native``: every ctypes call (libraries, logging, vocabulary, batches, the mtmd encode).
* ``files``: locating and checking the GGUF pair (language model + mmproj).

llama-cpp-python itself is imported only when a backend is created or the probe runs.
"""

from m3cli.backends.llamacpp.backend import PATCH0_MODES, LlamaCppBackend, LlamaEncoded, fill_patch0, load_llamacpp
from m3cli.backends.llamacpp.files import find_mmproj
from m3cli.backends.llamacpp.probe import SIG_BUGGY, SIG_FIXED, ProbeResult, probe_llamacpp
from m3cli.backends.llamacpp.tokenizer import LlamaCppAdapter

__all__ = ["PATCH0_MODES", "SIG_BUGGY", "SIG_FIXED", "LlamaCppAdapter", "LlamaCppBackend", "LlamaEncoded",
           "ProbeResult", "fill_patch0", "find_mmproj", "load_llamacpp", "probe_llamacpp"]
