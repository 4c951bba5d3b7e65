"""The tokenizer contract both backends implement, and the shared logic that turns it into prompt pieces.

A backend supplies a :class:`TokenizerAdapter`: a few facts about its vocabulary and ONE primitive,
``raw_encode(text)``, the tokenizer's plain tokenisation of a text that contains no special token. Every
rule about BOS, special tokens, and SentencePiece's dummy-prefix ``▁`` lives here, in :class:`PieceEncoder`,
so the torch (transformers) and llama.cpp backends cannot produce different ids for the same prompt as long
as their ``raw_encode`` agree, which is what a vocabulary conversion promises.

What each backend implements (exactly):

``raw_encode(text) -> list[int]``
    * transformers: ``tokenizer(text, add_special_tokens=False)["input_ids"]``.
    * llama.cpp: ``llama_tokenize(vocab, text, add_special=False, parse_special=False)``.
    No BOS/EOS. The text never holds a special token: :meth:`PieceEncoder.fragments` cuts them out first.
    Both tokenizers add their own dummy prefix to the start of the text, and that is fine: SentencePiece
    (SPM) vocabularies put a ``▁`` in front (transformers' Llama tokenizer via its Metaspace pre-tokenizer,
    llama.cpp when ``tokenizer.ggml.add_space_prefix`` is true, its SPM default), byte-level BPE ones add
    nothing. They differ on a text that starts with a space (transformers' Metaspace does not add a second
    ``▁``, llama.cpp and the sentencepiece library do), which is why :class:`PieceEncoder` never hands a
    leading space to ``raw_encode``: it tokenises behind a sentinel (``"\\n"``) and drops the sentinel's ids.
``bos_id``, ``eos_id``
    The BOS/EOS ids (None when the vocabulary has none).
``add_bos``, ``add_eos``
    Whether the tokenizer adds BOS/EOS to a prompt by itself (transformers: what ``tokenizer("a")`` adds
    around ``raw_encode("a")``; llama.cpp: ``llama_vocab_get_add_bos`` / ``llama_vocab_get_add_eos``).
``special_tokens``
    text -> id of every token the tokenizer matches as a whole inside a text: transformers' added tokens
    (``added_tokens_decoder``), llama.cpp's CONTROL, USER_DEFINED and UNKNOWN tokens. Must contain the image
    placeholder (``<image>``) and the BOS/EOS texts.

Why not tokenise the whole prompt at once: transformers (Llama tokenizer, ``legacy=false``) adds no ``▁`` to
the text right after a special token, llama.cpp's SPM tokenizer does (``is_prev_special`` in
``llama_tokenize_impl``), and the original LLaVA recipe tokenises each piece on its own (so it does): three
answers for one string. Here each rule is explicit and both backends follow it.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from functools import cached_property
from typing import Protocol, runtime_checkable

from m3cli.errors import ModelError

# Texts put in front of a piece so that it is tokenised with no dummy prefix of its own. A newline is a
# byte-fallback token in LLaMA/Mistral SPM vocabularies and no piece spans it, so nothing merges across.
SENTINELS = ("\n", "\x00", "\t")
PROBE = "a"


@runtime_checkable
class TokenizerAdapter(Protocol):
    """What a backend's tokenizer exposes to the family layer (see the module docstring for the contract)."""

    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    special_tokens: Mapping[str, int]

    def raw_encode(self, text: str) -> list[int]:
        """Plain tokenisation of ``text`` (no special tokens in it, none added)."""
        ...


class PieceEncoder:
    """Prompt pieces from a :class:`TokenizerAdapter`, with the dummy-prefix rules made explicit.

    * :meth:`plain`: the text with no dummy prefix (what follows a special token in transformers'
      ``legacy=false`` Llama tokenizer, and every piece of a byte-level BPE vocabulary).
    * :meth:`spm_piece`: the text as the sentencepiece library encodes a fresh string: a ``▁`` is always put in
      front (the original LLaVA's per-piece tokenisation, llama.cpp's raw text).
    * :meth:`metaspace`: a ``▁`` in front unless the text starts with a space (transformers' Metaspace
      pre-tokenizer at the start of a string).
    For a vocabulary without a dummy prefix (byte-level BPE) all three are the same.
    """

    def __init__(self, tok: TokenizerAdapter):
        self.tok = tok
        self._special_re = _special_pattern(tok.special_tokens)
        self._id_text = {i: t for t, i in tok.special_tokens.items()}
        self._heads: dict[str, list[int]] = {}

    def _head(self, sentinel: str) -> list[int]:
        head = self._heads.get(sentinel)
        if head is None:
            head = self._heads[sentinel] = list(self.tok.raw_encode(sentinel))
        return head

    # -- facts -------------------------------------------------------------------------------------------
    @cached_property
    def has_dummy_prefix(self) -> bool:
        """Whether ``raw_encode`` puts something (SPM's ``▁``) in front of a text."""
        alone = self.tok.raw_encode(PROBE)
        for sentinel in SENTINELS:
            head = self._head(sentinel)
            both = self.tok.raw_encode(sentinel + PROBE)
            if both[: len(head)] == head:
                return both[len(head):] != alone
        raise ModelError("cannot tell whether the tokenizer adds a dummy prefix (no usable sentinel)")

    def token_text(self, token_id: int | None) -> str | None:
        """The text of a special token (e.g. the BOS text a chat template writes), or None."""
        return None if token_id is None else self._id_text.get(token_id)

    # -- pieces -------------------------------------------------------------------------------------------
    def plain(self, text: str) -> list[int]:
        """``text`` tokenised with no dummy prefix (its own leading spaces are kept as text)."""
        if not text:
            return []
        if not self.has_dummy_prefix:
            return list(self.tok.raw_encode(text))
        for sentinel in SENTINELS:
            head = self._head(sentinel)
            both = self.tok.raw_encode(sentinel + text)
            if both[: len(head)] == head:
                return list(both[len(head):])
        raise ModelError(f"cannot tokenise {text[:40]!r} without a dummy prefix (no usable sentinel)")

    def spm_piece(self, text: str) -> list[int]:
        """``text`` as SentencePiece encodes a fresh string: the dummy ``▁`` always in front (none if empty)."""
        if not text:
            return []
        return self.plain(" " + text) if self.has_dummy_prefix else self.plain(text)

    def metaspace(self, text: str) -> list[int]:
        """``text`` as transformers' Metaspace encodes a string start: ``▁`` in front unless it starts with one."""
        if not text:
            return []
        if self.has_dummy_prefix and not text.startswith(" "):
            return self.plain(" " + text)
        return self.plain(text)

    def encode(self, text: str, *, bos: bool = False, dummy_prefix: bool = True) -> list[int]:
        """One piece of raw text: BOS if asked, then :meth:`spm_piece` (or :meth:`plain` without dummy prefix)."""
        ids = [self.bos()] if bos else []
        return ids + (self.spm_piece(text) if dummy_prefix else self.plain(text))

    # -- special tokens -----------------------------------------------------------------------------------
    def fragments(self, text: str) -> list[str | int]:
        """``text`` cut at special tokens (leftmost, longest first): raw strings and special token ids."""
        if self._special_re is None:
            return [text] if text else []
        out: list[str | int] = []
        at = 0
        for m in self._special_re.finditer(text):
            if m.start() > at:
                out.append(text[at:m.start()])
            out.append(self.tok.special_tokens[m.group(0)])
            at = m.end()
        if at < len(text):
            out.append(text[at:])
        return out

    def encode_with_specials(self, text: str, *, start_prefix: str, after_special_prefix: bool) -> list[int]:
        """``text`` with its special tokens as single ids.

        ``start_prefix`` says how a raw fragment at the very start is prefixed ("spm", "metaspace" or
        "plain"); a fragment right after a special token gets :meth:`metaspace` when ``after_special_prefix``
        (transformers' legacy Llama tokenizer) and :meth:`plain` otherwise.
        """
        ids: list[int] = []
        for i, frag in enumerate(self.fragments(text)):
            if isinstance(frag, int):
                ids.append(frag)
            elif i == 0:
                ids += {"spm": self.spm_piece, "metaspace": self.metaspace, "plain": self.plain}[start_prefix](frag)
            else:
                ids += self.metaspace(frag) if after_special_prefix else self.plain(frag)
        return ids

    def bos(self) -> int:
        """The BOS id (a ModelError when the vocabulary has none)."""
        if self.tok.bos_id is None:
            raise ModelError("the tokenizer has no BOS token")
        return self.tok.bos_id


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encoder_for(tok: TokenizerAdapter) -> PieceEncoder:
    """The :class:`PieceEncoder` of ``tok``, kept while the adapter lives (its probes run once)."""
    try:
        enc = _ENCODERS.get(tok)
    except TypeError:  # an adapter that cannot be weakly referenced: no cache
        return PieceEncoder(tok)
    if enc is None or enc.tok is not tok:
        enc = PieceEncoder(tok)
        _ENCODERS[tok] = enc
    return enc


def _special_pattern(special: Mapping[str, int]) -> re.Pattern[str] | None:
    texts = sorted((t for t in special if t), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in texts)) if texts else None
