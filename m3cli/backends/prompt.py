"""The one place that turns (question, n) into a model's prompt ids with exactly n image placeholders.

Both backends answer with the same prompt: the model's chat template rendered for one user turn (the
image, then the question) with the generation prompt, tokenised, and the single image placeholder repeated
n times. Rendering and tokenising are the backend's (transformers' processor or llama.cpp's vocabulary),
passed in as callbacks; the split around the placeholder and the per-question cache live here.

A model family whose recipe tokenises differently (e.g. LLaVA-1.5's SentencePiece prompts, where the text
is split at ``<image>`` and each piece tokenised on its own, BOS once) overrides :meth:`ChatPrompt.split`.
"""

from __future__ import annotations

from collections.abc import Callable

from m3cli.backends.base import ModelLoadError

Render = Callable[[str], str]
Tokenize = Callable[[str], list[int]]


def chat_messages(question: str) -> list[dict]:
    """One user turn in the transformers messages format: the image first, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def jinja_renderer(template: str, bos_token: str, eos_token: str) -> Render:
    """Render a chat template stored as text (e.g. in a GGUF) the way transformers does, for one question.

    The template is compiled on the first call, so loading a model never pays for (or fails on) it early.
    """
    compiled = []

    def render(question: str) -> str:
        if not compiled:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            compiled.append(env.from_string(template))
        return compiled[0].render(messages=chat_messages(question), add_generation_prompt=True,
                                  bos_token=bos_token, eos_token=eos_token)

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
