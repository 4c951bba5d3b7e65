"""Chat templates (a model's own, or ``--chat-template FILE``) rendered as transformers renders them, in a
sandbox bounded in work and size.

A template is code from outside (a model's files, a user's file): :func:`render_chat_template` runs it in
jinja's immutable sandbox, and more: every loop iteration, call and filter is a step (``TEMPLATE_MAX_STEPS``),
every value it makes is charged and checked (``TEMPLATE_MAX_CHARS`` for one value and for the output,
``TEMPLATE_MAX_WORK`` in all) before repetitions, powers, format widths or replacements that would make a big
one, and the rendering has a deadline (``TEMPLATE_MAX_SECONDS``). A template that passes a bound is a one-line
:class:`~m3cli.families.spec.TemplateError`: nested ``range()`` loops or doubling strings stop in well under a
second with a few MB, where they used to hang and grow to gigabytes.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from m3cli.errors import describe
from m3cli.families.spec import TemplateError


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


def check_template(template: str) -> None:
    """Compile ``template`` now (cached for rendering), so a broken one fails at load in one line."""
    _compiled(template)


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
