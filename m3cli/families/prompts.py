"""Prompt recipes: a question becomes (ids before the image, ids after the image) for one model.

The final prompt is ``before + [image_token_id] * n + after``. Two kinds of recipe:

* The original LLaVA conversations (haotian-liu/LLaVA ``llava/conversation.py``), tokenised the original way
  (``tokenizer_image_token`` in ``llava/mm_utils.py``): the prompt text is split at ``<image>``, each piece is
  tokenised on its own by the SentencePiece tokenizer (so each piece starts with the dummy-prefix ``▁``), BOS
  once at the very start:

  - ``vicuna_v1`` (``conv_vicuna_v1``, separator style TWO, what the LLaVA-1.5 and M3 evaluations use)::

      A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
      detailed, and polite answers to the user's questions. USER: <image>\\n{question} ASSISTANT:

    (one line: system, " ", "USER: " + message, " ", "ASSISTANT:").
  - ``mistral_instruct`` (``conv_mistral_instruct``, style LLAMA_2 with an empty system and separator):
    ``[INST] <image>\\n{question} [/INST]``.
  - ``chatml_direct`` (``conv_chatml_direct``, style MPT): ``<|im_start|>system\\nAnswer the questions.<|im_end|>``
    ``<|im_start|>user\\n<image>\\n{question}<|im_end|><|im_start|>assistant\\n``.

* ``hf_template``: the model's own jinja chat template, rendered for one user turn (the image, then the
  question) with ``add_generation_prompt=True``, ``{% generation %}`` blocks rendered as plain text (they only
  mark assistant tokens for training masks), and tokenised as transformers' processor tokenises the rendered
  string: BOS added unless the text already starts with the BOS text, special tokens (``<image>``) as single
  ids, a ``▁`` at the start of the text (Metaspace) but none after a special token (``legacy=false``, the
  llava-hf tokenizers; a ``legacy=true`` Llama tokenizer prefixes there too).

Tokenisation goes through :class:`m3cli.families.tokenizing.PieceEncoder`, so both backends give equal ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from m3cli.errors import UsageError, describe
from m3cli.families.spec import QuestionError, TemplateError
from m3cli.families.templates import check_template, render_chat_template
from m3cli.families.tokenizing import PieceEncoder, TokenizerAdapter, encoder_for
from m3cli.fileio import input_problem

IMAGE = "<image>"

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CHATML_DIRECT_SYSTEM = "<|im_start|>system\nAnswer the questions."

# GGUF metadata key where m3's own GGUF writer records the recipe (llama.cpp ignores unknown keys).
GGUF_RECIPE_KEY = "m3cli.prompt_recipe"
GGUF_TEMPLATE_KEY = "tokenizer.chat_template"


@dataclass(frozen=True)
class PromptParts:
    """Token ids around the image: the prompt is ``before + [image_token_id] * n + after``."""

    before: list[int]
    after: list[int]
    image_token_id: int

    def ids(self, n_visual: int) -> list[int]:
        """The full prompt with ``n_visual`` image placeholders."""
        return self.before + [self.image_token_id] * n_visual + self.after


class PromptRecipe(Protocol):
    """A way of turning a question into prompt ids for one model."""

    name: str

    def text(self, question: str, *, bos_token: str | None = None, eos_token: str | None = None) -> str:
        """The prompt as text, with one ``<image>`` (for logs and ``--dry-run`` style output)."""
        ...

    def parts(self, question: str, tok: TokenizerAdapter, image_token: str = IMAGE) -> PromptParts:
        """Ids before and after the image for ``question``."""
        ...


def _check_question(question: str, image_token: str) -> None:
    if image_token in question:
        raise QuestionError(f"the question contains the image placeholder {image_token}; remove it")


class ConversationRecipe:
    """An original LLaVA conversation with the original per-piece tokenisation (``tokenizer_image_token``)."""

    def __init__(self, name: str, before: str, after: str, *, prefix_after_special: bool = False):
        self.name = name
        self._before = before          # text before <image>
        self._after = after            # text after <image>, with {question}
        self.prefix_after_special = prefix_after_special

    def text(self, question: str, *, bos_token: str | None = None, eos_token: str | None = None) -> str:
        return self._before + IMAGE + self._after.format(question=question)

    def parts(self, question: str, tok: TokenizerAdapter, image_token: str = IMAGE) -> PromptParts:
        _check_question(question, image_token)
        enc = encoder_for(tok)
        image_id = _image_id(tok, image_token)
        # tokenizer(chunk).input_ids for each chunk, BOS (and EOS, if the tokenizer adds one) per chunk, the
        # chunks' own BOS dropped after the first: the same as BOS once, then each piece with its own "▁"
        before = [enc.bos()] if tok.add_bos else []
        before += self._piece(enc, self._before)
        after = self._piece(enc, self._after.format(question=question))
        return PromptParts(before=before, after=after, image_token_id=image_id)

    def _piece(self, enc: PieceEncoder, text: str) -> list[int]:
        ids = enc.encode_with_specials(text, start_prefix="spm", after_special_prefix=self.prefix_after_special)
        if enc.tok.add_eos and enc.tok.eos_id is not None:
            ids.append(enc.tok.eos_id)
        return ids


class TemplateRecipe:
    """A jinja chat template (the model's own), tokenised as transformers' processor tokenises its output."""

    name = "hf_template"

    def __init__(self, template: str, *, prefix_after_special: bool = False):
        if not template or not template.strip():
            raise TemplateError("empty chat template")
        self.template = template
        self.prefix_after_special = prefix_after_special
        check_template(template)  # a broken template fails at load, in one line, not per item

    def text(self, question: str, *, bos_token: str | None = None, eos_token: str | None = None) -> str:
        return render_chat_template(self.template, question, bos_token=bos_token or "", eos_token=eos_token or "")

    def parts(self, question: str, tok: TokenizerAdapter, image_token: str = IMAGE) -> PromptParts:
        _check_question(question, image_token)
        enc = encoder_for(tok)
        image_id = _image_id(tok, image_token)
        bos_text = enc.token_text(tok.bos_id)
        rendered = self.text(question, bos_token=bos_text, eos_token=enc.token_text(tok.eos_id))
        # transformers' processor: add_special_tokens unless the rendered text already starts with the BOS text
        add_special = not (bos_text and rendered.startswith(bos_text))
        ids = [enc.bos()] if add_special and tok.add_bos else []
        ids += enc.encode_with_specials(rendered, start_prefix="metaspace",
                                        after_special_prefix=self.prefix_after_special)
        if add_special and tok.add_eos and tok.eos_id is not None:
            ids.append(tok.eos_id)
        if ids.count(image_id) != 1:
            raise TemplateError(f"the chat template places {ids.count(image_id)} image tokens ({image_token}), "
                                "not exactly one")
        at = ids.index(image_id)
        return PromptParts(before=ids[:at], after=ids[at + 1:], image_token_id=image_id)


def _image_id(tok: TokenizerAdapter, image_token: str) -> int:
    image_id = tok.special_tokens.get(image_token)
    if image_id is None:
        raise TemplateError(f"the tokenizer has no {image_token} token")
    return image_id


# -- the named recipes -------------------------------------------------------------------------------------
def vicuna_v1(*, prefix_after_special: bool = False) -> ConversationRecipe:
    """``conv_vicuna_v1``: the LLaVA-1.5 / M3 evaluation prompt."""
    return ConversationRecipe("vicuna_v1", VICUNA_V1_SYSTEM + " USER: ", "\n{question} ASSISTANT:",
                              prefix_after_special=prefix_after_special)


def mistral_instruct(*, prefix_after_special: bool = False) -> ConversationRecipe:
    """``conv_mistral_instruct``: LLaVA-NeXT Mistral."""
    return ConversationRecipe("mistral_instruct", "[INST] ", "\n{question} [/INST]",
                              prefix_after_special=prefix_after_special)


def chatml_direct(*, prefix_after_special: bool = False) -> ConversationRecipe:
    """``conv_chatml_direct``: LLaVA-NeXT 34B (Nous-Hermes-2-Yi)."""
    return ConversationRecipe(
        "chatml_direct", CHATML_DIRECT_SYSTEM + "<|im_end|><|im_start|>user\n",
        "\n{question}<|im_end|><|im_start|>assistant\n", prefix_after_special=prefix_after_special)


CONVERSATIONS = {"vicuna_v1": vicuna_v1, "mistral_instruct": mistral_instruct, "chatml_direct": chatml_direct}
RECIPE_NAMES = (*CONVERSATIONS, "hf_template")


def recipe_named(name: str, *, template: str | None = None, prefix_after_special: bool = False) -> PromptRecipe:
    """The recipe called ``name``; ``hf_template`` needs ``template``."""
    if name in CONVERSATIONS:
        return CONVERSATIONS[name](prefix_after_special=prefix_after_special)
    if name == "hf_template":
        if not template:
            raise TemplateError("the hf_template recipe needs a chat template and the model has none")
        return TemplateRecipe(template, prefix_after_special=prefix_after_special)
    raise UsageError(f"unknown prompt recipe {name!r} (known: {', '.join(RECIPE_NAMES)})")


def recipe_for_template(template: str | None, *, fallback: str | None = None,
                        prefix_after_special: bool = False) -> PromptRecipe:
    """The recipe for a chat template found in a model's files or a GGUF's ``tokenizer.chat_template``.

    m3's own vicuna_v1 template (what ``m3 convert`` writes) maps back to the ``vicuna_v1`` recipe; any other
    template is used as it is; no template gives the ``fallback`` recipe (or a :class:`TemplateError`).
    """
    if template and template.strip():
        from m3cli.families.converted import recipe_of_template

        known = recipe_of_template(template)
        if known:
            return recipe_named(known, prefix_after_special=prefix_after_special)
        return TemplateRecipe(template, prefix_after_special=prefix_after_special)
    if fallback:
        return recipe_named(fallback, prefix_after_special=prefix_after_special)
    raise TemplateError("no chat template and no prompt recipe to fall back on; pass --chat-template FILE|NAME")


def recipe_from_gguf(metadata: Mapping[str, Any], *, override: str | None = None, fallback: str | None = None,
                     name: str = "model") -> tuple[PromptRecipe, str | None]:
    """The recipe for a GGUF language model, and a one-line notice when it had to fall back.

    Order: ``override`` (``--chat-template FILE|NAME``), our ``m3cli.prompt_recipe`` key, the GGUF's
    ``tokenizer.chat_template``, then ``fallback`` (the family's recipe) with a notice.
    """
    if override:
        return chat_template_option(override), None
    recorded = metadata.get(GGUF_RECIPE_KEY)
    template = metadata.get(GGUF_TEMPLATE_KEY)
    if recorded:
        return recipe_named(str(recorded), template=str(template) if template else None), None
    if template:
        return recipe_for_template(str(template)), None
    if fallback:
        return (recipe_named(fallback),
                f"{name} has no chat template: using the {fallback} recipe (override with --chat-template)")
    raise TemplateError(f"{name} has no chat template; pass --chat-template FILE|NAME")


def chat_template_option(value: str) -> PromptRecipe:
    """``--chat-template FILE|NAME``: a recipe name, or a file (``.jinja`` text or ``chat_template.json``)."""
    if value in RECIPE_NAMES and value != "hf_template":
        return recipe_named(value)
    path = Path(value)
    problem = input_problem(path)
    if problem == "file not found":
        raise UsageError(f"--chat-template {value}: neither a recipe ({', '.join(CONVERSATIONS)}) nor a file")
    if problem is not None:
        raise UsageError(f"--chat-template {value}: {problem}")
    return recipe_for_template(read_chat_template(path))


def read_chat_template(path: str | Path) -> str:
    """A chat template from a file: ``chat_template.json`` style (``{"chat_template": ...}``) or raw jinja."""
    path = Path(path)
    problem = input_problem(path)  # by type first: a FIFO would block
    if problem is not None:
        raise UsageError(f"{path}: {problem}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read ({describe(exc)})") from exc
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({describe(exc)})") from exc
        text = data.get("chat_template") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise UsageError(f"{path}: no chat_template string in it")
    if not text.strip():
        raise UsageError(f"{path}: empty chat template")
    return text
