"""The :class:`~m3cli.families.tokenizing.TokenizerAdapter` of a transformers tokenizer (the torch backend's).

Only needs the tokenizer object; transformers itself is not imported here.
"""

from __future__ import annotations

from typing import Any

from m3cli.errors import ModelError

_UNSET = object()


class HFTokenizerAdapter:
    """A transformers tokenizer seen through the family layer's tokenizer contract."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int | None = tokenizer.eos_token_id
        self.special_tokens: dict[str, int] = _special_tokens(tokenizer)
        self._after_special: object = _UNSET
        # what tokenizer(text) adds around the plain ids, found by looking (templates differ per tokenizer)
        raw = self.raw_encode("a")
        full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        self.add_bos = self.bos_id is not None and full[:1] == [self.bos_id] and raw[:1] != [self.bos_id]
        self.add_eos = (self.eos_id is not None and full[-1:] == [self.eos_id] and raw[-1:] != [self.eos_id]
                        and len(full) > len(raw))

    @property
    def prefix_after_special(self) -> bool | None:
        """Whether this tokenizer puts the dummy-prefix "▁" on text right after a special token, as measured.

        None when it cannot tell (no dummy prefix at all, e.g. byte-level BPE, or no special token to try).
        transformers runs a ``tokenizer.json`` pipeline as written, so this can differ from the ``legacy``
        flag; the ``hf_template`` recipe follows what the tokenizer does.
        """
        if self._after_special is _UNSET:
            self._after_special = self._measure_after_special()
        return self._after_special  # type: ignore[return-value]

    def _measure_after_special(self) -> bool | None:
        from m3cli.families.tokenizing import encoder_for

        enc = encoder_for(self)
        if not enc.has_dummy_prefix:
            return None
        token = "<image>" if "<image>" in self.special_tokens else next(
            (t for t in (self.tokenizer.eos_token, self.tokenizer.bos_token) if t in self.special_tokens), None)
        if token is None:
            return None
        ids = self.raw_encode(token + "a")
        if ids[:1] != [self.special_tokens[token]]:
            return None
        rest = ids[1:]
        if rest == enc.plain("a"):
            return False
        if rest == enc.metaspace("a"):
            return True
        return None

    def raw_encode(self, text: str) -> list[int]:
        """``tokenizer(text, add_special_tokens=False)["input_ids"]``."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def processor_ids(self, text: str) -> list[int]:
        """The ids transformers' processor gives a rendered prompt (for checking a recipe against it).

        ``ProcessorMixin.apply_chat_template`` tokenises with ``add_special_tokens`` unless the text already
        starts with the BOS text.
        """
        bos = self.tokenizer.bos_token
        add = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add)["input_ids"])


def _special_tokens(tokenizer: Any) -> dict[str, int]:
    """Every token transformers matches as a whole inside a text: the added tokens (special or not)."""
    out: dict[str, int] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token_id, token in decoder.items():
        text = getattr(token, "content", str(token))
        if text:
            out[text] = int(token_id)
    for text in getattr(tokenizer, "all_special_tokens", []) or []:
        if text and text not in out:
            token_id = tokenizer.convert_tokens_to_ids(text)
            if token_id is None:
                raise ModelError(f"tokenizer special token {text!r} has no id")
            out[text] = int(token_id)
    return out
