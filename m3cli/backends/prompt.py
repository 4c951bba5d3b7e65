"""The one place that turns (question, n) into a model's prompt ids with exactly n image placeholders.

Both backends build their prompts with :class:`FamilyPrompt`: the model family's recipe
(:mod:`m3cli.families.prompts`: ``vicuna_v1`` with the original per-piece tokenisation, the model's own
chat template, ...) tokenised through the backend's :class:`~m3cli.families.TokenizerAdapter`
(``HFTokenizerAdapter`` for transformers, the llama.cpp vocabulary's for GGUF). Every BOS, special-token
and dummy-prefix rule lives in the family layer, so the two backends give equal ids for one model; this
module only caches the ids around the image per question.
"""

from __future__ import annotations

from typing import Any

from m3cli.backends.base import ModelLoadError


class FamilyPrompt:
    """Prompt ids of one model from its family's recipe and the backend's tokenizer adapter.

    ``ids(question, n)`` is ``before + [image_token_id] * n + after`` with the ids around the image cached per
    question. Built at load, it tokenises one probe question, so a recipe that cannot work with this
    tokenizer (no ``<image>`` token, a template placing no image) fails before any work, in one line.
    """

    MAX_CACHED = 4096  # questions whose ids are kept; the cache is cleared past it

    def __init__(self, family: Any, tokenizer: Any, model_id: str):
        from m3cli.families import TemplateError

        self.family = family
        self.tokenizer = tokenizer     # a TokenizerAdapter
        self.model_id = model_id
        self._cache: dict[str, tuple[list[int], list[int]]] = {}
        try:
            probe = family.prompt_parts("What is in the image?", tokenizer)
        except TemplateError as exc:
            raise ModelLoadError(f"{model_id}: {exc}") from None
        self.image_token_id: int = probe.image_token_id
        self.recipe_name: str = family.recipe.name

    def parts(self, question: str) -> tuple[list[int], list[int]]:
        """The ids before and after the image placeholders for ``question`` (cached)."""
        parts = self._cache.get(question)
        if parts is None:
            got = self.family.prompt_parts(question, self.tokenizer)
            parts = (got.before, got.after)
            if len(self._cache) > self.MAX_CACHED:
                self._cache.clear()
            self._cache[question] = parts
        return parts

    def ids(self, question: str, n_image_tokens: int) -> list[int]:
        """The prompt ids with exactly ``n_image_tokens`` image placeholders."""
        before, after = self.parts(question)
        return before + [self.image_token_id] * n_image_tokens + after
