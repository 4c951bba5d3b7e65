"""llama.cpp's vocabulary seen through the family layer's tokenizer contract (:mod:`m3cli.families.tokenizing`).

The one primitive is ``raw_encode(text) = llama_tokenize(vocab, text, add_special=False, parse_special=False)``;
every rule about BOS, special tokens and SentencePiece's dummy-prefix ``▁`` is the family layer's
(:class:`~m3cli.families.tokenizing.PieceEncoder`), so the ids equal the torch backend's whenever the two
tokenizers' plain tokenisations agree, which is what converting a vocabulary to GGUF promises.

* ``special_tokens``: every CONTROL, USER_DEFINED and UNKNOWN token (what llama.cpp matches as a whole).
  A vocabulary without the image placeholder (the LM GGUF of an original LLaVA-1.5 checkpoint has the
  32000 LLaMA tokens only) gets a virtual ``<image>`` with the original's ``IMAGE_TOKEN_INDEX`` (-200): the
  placeholder only marks where the image embeddings go, llama.cpp never sees it as a token.
* ``bos_id`` / ``eos_id``: None when the GGUF names none (llama.cpp itself falls back to a default id for
  some vocabularies, e.g. 11 for ``gpt2``, that the transformers tokenizer does not have).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from m3cli.backends.llamacpp import native

IMAGE_PLACEHOLDER = "<image>"
VIRTUAL_IMAGE_ID = -200   # haotian-liu/LLaVA's IMAGE_TOKEN_INDEX


class LlamaCppAdapter:
    """A loaded llama.cpp vocabulary as a :class:`~m3cli.families.tokenizing.TokenizerAdapter`."""

    def __init__(self, llama_cpp: Any, vocab: Any, metadata: Mapping[str, Any], *,
                 image_token: str = IMAGE_PLACEHOLDER, image_token_id: int | None = None):
        L = llama_cpp
        self._llama, self._vocab = L, vocab
        self.bos_id = _token_or_none(L.llama_vocab_bos(vocab)) if "tokenizer.ggml.bos_token_id" in metadata \
            else None
        self.eos_id = _token_or_none(L.llama_vocab_eos(vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(vocab)) and self.bos_id is not None
        self.add_eos = bool(L.llama_vocab_get_add_eos(vocab)) and self.eos_id is not None
        wanted = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED | L.LLAMA_TOKEN_ATTR_UNKNOWN
        special: dict[str, int] = {}
        for i in range(int(L.llama_vocab_n_tokens(vocab))):
            if L.llama_vocab_get_attr(vocab, i) & wanted:
                text = native.token_piece(L, vocab, i, special=True)
                if text:
                    special.setdefault(text, i)
        if image_token not in special:
            special[image_token] = int(image_token_id) if image_token_id is not None else VIRTUAL_IMAGE_ID
        self.special_tokens: dict[str, int] = special
        self.image_token_id = special[image_token]

    def raw_encode(self, text: str) -> list[int]:
        """``llama_tokenize(vocab, text, add_special=False, parse_special=False)``."""
        return native.tokenize(self._llama, self._vocab, text, add_special=False, parse_special=False)


def _token_or_none(token: int) -> int | None:
    return None if token is None or int(token) < 0 else int(token)
