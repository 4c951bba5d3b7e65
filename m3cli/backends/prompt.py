"""The one place that turns (question, n) into a model's prompt ids with exactly n image placeholders.

Both backends build their prompts with :class:`FamilyPrompt`: the model family's recipe
(:mod:`m3cli.families.prompts`: ``vicuna_v1`` with the original per-piece tokenisation, the model's own
chat template, ...) tokenised through the backend's :class:`~m3cli.families.TokenizerAdapter`
(``HFTokenizerAdapter`` for transformers, the llama.cpp vocabulary's for GGUF). Every BOS, special-token
and dummy-prefix rule lives in the family layer, so the two backends give equal ids for one model; this
module only caches the ids around the image per question.

:class:`ChatPrompt` and :func:`jinja_renderer` (render a template, tokenise the whole string) are the
older, backend-supplied form, kept for callers that have not moved to :class:`FamilyPrompt`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from m3cli.backends.base import ModelLoadError

Render = Callable[[str], str]
Tokenize = Callable[[str], list[int]]


def chat_messages(question: str) -> list[dict]:
    """One user turn in the transformers messages format: the image first, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def jinja_renderer(template: str, bos_token: str, eos_token: str) -> Render:
    """Render a chat template stored as text (e.g. in a GGUF) the way transformers does, for one question.

    ``{% generation %}`` tags work (:func:`m3cli.families.render_chat_template`); a template that fails is a
    one-line :class:`~m3cli.families.TemplateError`.
    """
    from m3cli.families import render_chat_template

    def render(question: str) -> str:
        return render_chat_template(template, question, bos_token=bos_token, eos_token=eos_token)

    return render


class ChatPrompt:
    """Prompt ids of one model: ``ids(question, n)``, with the text around the image cached per question.

    ``render(question)`` gives the prompt text with one image placeholder; ``tokenize(text)`` its ids,
    special tokens parsed and BOS added as the model does. The placeholder is a special token, so its
    neighbours tokenise as in the full prompt and repeating it changes nothing else.
    """

    MAX_CACHED = 4096   # distinct questions kept; a batch over many questions clears and refills

    def __init__(self, render: Render, tokenize: Tokenize, image_token_id: int, model_id: str):
        self.render = render
        self.tokenize = tokenize
        self.image_token_id = image_token_id
        self.model_id = model_id
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def split(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the single image placeholder of the rendered prompt."""
        ids = self.tokenize(text)
        if ids.count(self.image_token_id) != 1:
            raise ModelLoadError(f"{self.model_id}: chat template must place exactly one image token")
        at = ids.index(self.image_token_id)
        return ids[:at], ids[at + 1 :]

    def parts(self, question: str) -> tuple[list[int], list[int]]:
        """``split(render(question))``, cached: the ids before and after the image placeholder."""
        parts = self._cache.get(question)
        if parts is None:
            parts = self.split(self.render(question))
            if len(self._cache) > self.MAX_CACHED:
                self._cache.clear()
            self._cache[question] = parts
        return parts

    def ids(self, question: str, n_image_tokens: int) -> list[int]:
        """The prompt ids with exactly ``n_image_tokens`` image placeholders."""
        before, after = self.parts(question)
        return before + [self.image_token_id] * n_image_tokens + after


class FamilyPrompt:
    """Prompt ids of one model from its family's recipe and the backend's tokenizer adapter.

    ``ids(question, n)`` is ``before + [image_token_id] * n + after`` with the ids around the image cached per
    question. Built at load, it tokenises one probe question, so a recipe that cannot work with this
    tokenizer (no ``<image>`` token, a template placing no image) fails before any work, in one line.
    """

    MAX_CACHED = ChatPrompt.MAX_CACHED

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
