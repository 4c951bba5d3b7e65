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

import contextvars
import functools
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from m3cli.errors import UsageError, describe
from m3cli.families.spec import QuestionError, TemplateError
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
        _compiled(template)  # a broken template fails at load, in one line, not per item

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


# -- jinja --------------------------------------------------------------------------------------------------
def chat_messages(question: str) -> list[dict]:
    """One user turn in the transformers messages format: the image first, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


# Bounds on one rendering of a chat template (from --chat-template or a model's files: untrusted). An honest
# template renders one turn in microseconds with a few hundred characters; these stop a hostile or broken one
# (nested range() loops, exponential string growth, huge format widths) in well under a second of CPU and a few
# tens of MB, with one line, instead of hanging and growing without bound.
TEMPLATE_MAX_CHARS = 1_000_000    # the longest value, and the longest output
TEMPLATE_MAX_WORK = 16_000_000    # characters made in all (outputs, joins, sums, slices, filter results)
TEMPLATE_MAX_STEPS = 100_000      # loop iterations, calls and filters
TEMPLATE_MAX_SECONDS = 5.0
_MAX_INT_BITS = 64 * 1024


def render_chat_template(template: str, question: str, *, bos_token: str = "", eos_token: str = "",
                         add_generation_prompt: bool = True) -> str:
    """Render ``template`` for one question as transformers' ``apply_chat_template`` does.

    Same jinja settings (sandboxed, ``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``,
    ``strftime_now``, a non-escaping ``tojson``); ``{% generation %}`` ... ``{% endgeneration %}`` renders its
    body as it is. The rendering is bounded (``TEMPLATE_MAX_*``: steps, characters made, the size of any value
    and of the output, time). Errors, a bound reached included, become one-line :class:`TemplateError`.
    """
    import jinja2

    compiled = _compiled(template)
    budget = _Budget(_literal_chars(template))
    token = _BUDGET.set(budget)
    try:
        out: list[str] = []
        size = 0
        for chunk in compiled.generate(messages=chat_messages(question), add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token):
            size += len(chunk)
            if size > TEMPLATE_MAX_CHARS:
                raise TemplateLimit(f"its output passed {TEMPLATE_MAX_CHARS:,} characters")
            out.append(chunk)
        return "".join(out)
    except TemplateLimit as exc:
        raise TemplateError(f"chat template stopped: {exc} (a template renders one prompt; this one would not "
                            "end, or grows without bound)") from None
    except (RecursionError, MemoryError) as exc:
        raise TemplateError(f"chat template stopped: {type(exc).__name__} (it recurses or grows without bound)") \
            from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template failed: {describe(exc)}") from exc
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {describe(exc)}") from None
    finally:
        _BUDGET.reset(token)


class TemplateLimit(Exception):
    """A rendering passed one of the bounds (``TEMPLATE_MAX_*``)."""


class _Budget:
    """What one rendering may still spend; ``literal`` is the template's own text, charged per loop iteration
    and call (the upper bound of what each may emit besides its checked expressions)."""

    def __init__(self, literal: int) -> None:
        self.steps = TEMPLATE_MAX_STEPS
        self.work = TEMPLATE_MAX_WORK
        self.deadline = time.monotonic() + TEMPLATE_MAX_SECONDS
        self.literal = literal

    def step(self, work: int = 0) -> None:
        self.steps -= 1
        self.work -= work
        if self.steps < 0:
            raise TemplateLimit(f"it took more than {TEMPLATE_MAX_STEPS:,} steps (loop iterations and calls)")
        if self.work < 0:
            raise TemplateLimit(f"it made more than {TEMPLATE_MAX_WORK:,} characters")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"it ran longer than {TEMPLATE_MAX_SECONDS:g} s")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("m3_template_budget", default=None)


def _charge(steps: int = 0, work: int = 0) -> None:
    budget = _BUDGET.get()
    if budget is None:  # compile-time constant folding: the sizes are still checked by the callers
        return
    if steps:
        budget.step(work)
    elif work:
        budget.work -= work
        if budget.work < 0:
            raise TemplateLimit(f"it made more than {TEMPLATE_MAX_WORK:,} characters")


def _size(value: Any) -> int:
    """How much a value weighs against the bounds (characters of text, items of a collection)."""
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 8
    return 0


def _made(value: Any) -> Any:
    """Charge a value just made and refuse one over the size bound."""
    size = _size(value)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        raise TemplateLimit(f"it made a number of more than {_MAX_INT_BITS:,} bits")
    if size > TEMPLATE_MAX_CHARS:
        raise TemplateLimit(f"it made a value of more than {TEMPLATE_MAX_CHARS:,} characters")
    _charge(work=size)
    return value


_PERCENT_SPEC = re.compile(r"%[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _check_format(fmt: Any, args: tuple = ()) -> None:
    """Refuse a %- or {}-format whose widths or precisions would make a value over the size bound."""
    if not isinstance(fmt, str):
        return
    numbers = [int(n) for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n and n != "*"]
    numbers += [int(n) for spec in _BRACE_SPEC.findall(fmt) for n in re.findall(r"\d+", spec)]
    if "*" in fmt:
        numbers += [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    if any(n > TEMPLATE_MAX_CHARS for n in numbers):
        raise TemplateLimit(f"a format width over {TEMPLATE_MAX_CHARS:,} characters")


def _check_args(args: tuple, kwargs: dict) -> None:
    """Refuse a call whose number arguments could make a value over the size bound (widths, counts)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > TEMPLATE_MAX_CHARS:
            raise TemplateLimit(f"an argument of {a:,} (over {TEMPLATE_MAX_CHARS:,})")


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        grows = (len(text) + 1 if not old else text.count(old)) * max(0, len(new) - len(old))
        if len(text) + grows > TEMPLATE_MAX_CHARS:
            raise TemplateLimit(f"a replace would make more than {TEMPLATE_MAX_CHARS:,} characters")


def _check_binop(op: str, left: Any, right: Any) -> None:
    seq = (str, bytes, list, tuple)
    if op == "*":
        for a, b in ((left, right), (right, left)):
            if isinstance(a, seq) and isinstance(b, int) and not isinstance(b, bool) \
                    and len(a) * b > TEMPLATE_MAX_CHARS:
                raise TemplateLimit(f"a repetition would make more than {TEMPLATE_MAX_CHARS:,} items")
        if isinstance(left, int) and isinstance(right, int) and \
                left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise TemplateLimit(f"a product of more than {_MAX_INT_BITS:,} bits")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * abs(left).bit_length() > _MAX_INT_BITS:
            raise TemplateLimit(f"a power of more than {_MAX_INT_BITS:,} bits")
    elif op == "%":
        _check_format(left, right if isinstance(right, tuple) else (right,))


def _literal_chars(template: str) -> int:
    """The template's own text (an upper bound on what one loop iteration or call emits besides expressions)."""
    return min(len(template), TEMPLATE_MAX_CHARS)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A jinja filter wrapped in the bounds: a step, its arguments checked first, its result charged."""

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        _charge(steps=1, work=budget.literal if budget else 0)
        _check_args(args, kwargs)
        texts = [a for a in args if isinstance(a, str)]
        if name == "replace" and len(texts) >= 3:
            _check_replace(*texts[-3:])
        elif name == "format" and texts:
            _check_format(texts[0], args[args.index(texts[0]) + 1:])
        return _made(func(*args, **kwargs))

    return bounded


@functools.lru_cache(maxsize=32)
def _compiled(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class Generation(jinja2.ext.Extension):
        # transformers' AssistantTracker records where assistant text is for training masks; at inference the
        # block is only its body
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class Bound(NodeTransformer):
        """Every loop's iterable counted step by step; every ``~`` through a checked join."""

        def visit_For(self, node: Any) -> Any:
            self.generic_visit(node)
            literal = sum(len(t.data) for part in (node.body, node.else_) for n in part
                          for t in n.find_all(nodes.TemplateData))
            node.iter = nodes.Filter(node.iter, "m3_steps", [nodes.Const(literal)], [], None, None,
                                     lineno=node.lineno)
            return node

        def visit_Concat(self, node: Any) -> Any:
            self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "m3_concat", [], [], None, None,
                                lineno=node.lineno)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox with a bound on work and size (see ``TEMPLATE_MAX_*``)."""

        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            return Bound().visit(super()._parse(source, name, filename))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return _made(super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            budget = _BUDGET.get()
            _charge(steps=1, work=budget.literal if budget else 0)
            _check_args(args, {k: v for k, v in kwargs.items() if not k.startswith("_")})
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if getattr(__obj, "__name__", "") == "replace" and len(args) >= 2:
                _check_replace(owner, args[0], args[1])
            if getattr(__obj, "__name__", "") in ("format", "format_map"):
                _check_format(owner)
            return _made(super().call(__context, __obj, *args, **kwargs))

        def getitem(self, obj: Any, argument: Any) -> Any:
            value = super().getitem(obj, argument)
            return _made(value) if isinstance(argument, slice) else value

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def steps(iterable: Any, literal: int = 0) -> Iterator[Any]:
        for item in iterable:
            _charge(steps=1, work=literal)
            yield item

    def concat(parts: list) -> str:
        texts = [str(p) for p in parts]
        if sum(map(len, texts)) > TEMPLATE_MAX_CHARS:
            raise TemplateLimit(f"a ~ would make more than {TEMPLATE_MAX_CHARS:,} characters")
        return _made("".join(texts))

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols],
                             finalize=_made)
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters["m3_steps"] = steps
    env.filters["m3_concat"] = concat
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template is not valid jinja: {describe(exc)}") from exc
