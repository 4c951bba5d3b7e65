"""Answer questions about images under a scale policy: encode once, pool per rung, decode.

The core loop shared by ``m3 ask``, ``m3 batch`` and ``m3 eval``; it knows no CLI and prints nothing.

Every problem that belongs to one item stays that item's: a question that is too long for the model or holds
the image placeholder is refused before the model runs, and when a batched model call fails its members are
retried one by one, so only the culprit gets an error :class:`Result` and its neighbours keep their answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from m3cli.backends.base import AnswerRequest, Backend, Encoded
from m3cli.errors import ItemError, M3Error, describe
from m3cli.matryoshka.confidence import MONOTONE_MEASURES, confidence
from m3cli.matryoshka.policy import (
    FALLBACK_POLICY,
    Escalate,
    Fixed,
    Policy,
    PolicySpec,
    Rung,
    final_rung,
    make_ladder,
    threshold_met,
)
from m3cli.matryoshka.scales import budget_to_scale, parse_budget
from m3cli.models.build import IMAGE_TOKEN

log = logging.getLogger(__name__)

# Longer questions are refused before the model runs: the attention of one 8 kB question took 2 GB.
DEFAULT_MAX_QUESTION_CHARS = 2000
IMAGE_PLACEHOLDER = IMAGE_TOKEN  # the text that marks the image in LLaVA prompts
# What a failed model call on a batch raises (out of memory is a RuntimeError); anything else is a bug.
MODEL_ERRORS = (RuntimeError, ValueError, MemoryError, M3Error)

T = TypeVar("T")
R = TypeVar("R")

# Result.failure: whose the problem is. A refused item (its question, its budget for this image) would fail
# again as it is; a model failure is the model's run on it (an HTTP server answers 400 and 500 for them).
REFUSED = "refused"
MODEL_FAILURE = "model"


@dataclass
class Result:
    """What one question cost and returned: the final rung plus every rung tried, or the item's error."""

    answer: str
    confidence: float
    tokens: int | None                # the final rung's per-crop scale (the paper's --tokens)
    scales_tried: list[Rung]
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    visual_tokens: int | None = None  # what the LM received at that scale (LLaVA-NeXT: all crops and newlines)
    crops: int | None = None          # crops the vision tower encoded (1 for LLaVA-1.5)
    threshold_met: bool | None = None  # --auto-scale: the answer's rung reached the threshold; None: fixed scale
    finish_reason: str | None = None  # the final rung's: "stop" (end of sequence, stop sequence) or "length"
    prompt_tokens: int | None = None  # positions the LM prefilled, text + visual, summed over every rung tried
    completion_tokens: int | None = None  # tokens generated, summed over every rung tried
    failure: str | None = None        # with ``error``: REFUSED or MODEL_FAILURE (not a row field)

    @property
    def empty(self) -> bool:
        """The model answered, with no text at all (never shown as if it were an answer)."""
        return self.error is None and not self.answer

    @property
    def note(self) -> str | None:
        """A one-line remark for the user about an answer that looks like none (None: nothing to say)."""
        if self.empty:
            return f"empty answer: the model generated no text at {self.tokens} visual tokens"
        return None

    def to_dict(self) -> dict:
        """The row fields of this result; an error result carries ``error`` and no answer."""
        if self.error is not None:
            return {
                "answer": None,
                "confidence": None,
                "tokens": None,
                "scales_tried": [r.to_dict() for r in self.scales_tried] or None,
                "timings": None,
                "error": self.error,
                "visual_tokens": None,
                "crops": None,
                "threshold_met": None,
                "finish_reason": None,
                "prompt_tokens": None,
                "completion_tokens": None,
            }
        return {
            "answer": self.answer,
            "confidence": round(self.confidence, 6),
            "tokens": self.tokens,
            "visual_tokens": self.visual_tokens if self.visual_tokens is not None else self.tokens,
            "crops": self.crops if self.crops is not None else 1,
            "scales_tried": [r.to_dict() for r in self.scales_tried],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "threshold_met": self.threshold_met,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass
class Query:
    """One question about one encoded image, under a policy (Fixed or Escalate)."""

    encoded: Encoded
    question: str
    policy: Policy = field(default_factory=lambda: Fixed(576))
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()  # stop sequences: decoding ends at the first, which the answer leaves out


@dataclass
class Ask:
    """One question about one picture (not yet encoded), under a policy: what :func:`answer_asks` answers."""

    image: Any
    question: str
    policy: Policy
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class VisualCap:
    """``inner`` with its scales also capped, per image, by the TOTAL visual tokens the LM may receive.

    ``--max-visual-tokens N``: the largest per-crop scale whose total for this image fits ``N`` (LLaVA-NeXT: base
    crop, unpadded tiles and newlines; LLaVA-1.5: the scale itself). The total depends on the image's size, so
    :func:`fit_policy` resolves it once the image is encoded; until then it is ``inner``.
    """

    inner: Policy
    max_visual_tokens: int

    def first(self) -> int:
        return self.inner.first()

    def next(self, tried: Sequence[Rung]) -> int | None:
        return self.inner.next(tried)


def make_policy(
    grid: int,
    tokens: int | None = None,
    auto_scale: bool = False,
    threshold: float | None = None,
    ladder: Sequence[int] | None = None,
    max_visual_tokens: int | None = None,
    *,
    measure: str | None = None,
    on_miss: str | None = None,
) -> Policy:
    """The scale policy for a question: a fixed scale (the budget rounded down, or the full grid), or with
    ``auto_scale`` escalation over ``ladder`` (default: every scale) capped at the budget.

    ``max_visual_tokens`` caps the total visual tokens per image as well (:class:`VisualCap`): with ``tokens``
    the smaller of the two scales wins; with ``auto_scale`` the ladder is cut per image. ``threshold``,
    ``measure`` and ``on_miss`` left None are :data:`~m3cli.matryoshka.policy.FALLBACK_POLICY`'s; to start
    from a model's own tuned policy use :func:`policy_from_spec`.
    """
    fallback = FALLBACK_POLICY
    measure = measure or fallback.measure
    if auto_scale:
        policy: Policy = Escalate(make_ladder(grid, ladder, tokens),
                                  fallback.threshold if threshold is None else threshold,
                                  measure, on_miss or fallback.on_miss)
    else:
        policy = Fixed(budget_to_scale(tokens, grid).scale if tokens is not None else grid * grid, measure)
    if max_visual_tokens is not None:
        return VisualCap(policy, parse_budget(max_visual_tokens))
    return policy


def policy_from_spec(grid: int, spec: PolicySpec, max_visual_tokens: int | None = None,
                     default: PolicySpec | None = None) -> Policy:
    """The policy ``spec`` states for a model with a ``grid`` x ``grid`` token grid, what it leaves unstated
    taken from ``default`` (a model's tuned spec, :func:`m3cli.answering.defaults.model_policy`), then from
    the fallback (:meth:`PolicySpec.over`)."""
    full = spec.over(default)
    return make_policy(grid, full.tokens, full.auto_scale, full.threshold, full.ladder, max_visual_tokens,
                       measure=full.measure, on_miss=full.on_miss)


def policy_measure(policy: Policy) -> str:
    """The confidence measure a policy reports and escalates on."""
    inner = policy.inner if isinstance(policy, VisualCap) else policy
    return getattr(inner, "measure", None) or FALLBACK_POLICY.measure


def scale_cap(backend: Backend, encoded: Encoded, max_visual_tokens: int) -> int:
    """The largest per-crop scale whose total visual tokens for this encoded image fit ``max_visual_tokens``.

    The backend's ``scale_within`` when it has one (it knows the family's count), else the scale itself is the
    count (one crop, no newlines). Raises :class:`~m3cli.matryoshka.scales.BudgetError` when no scale fits.
    """
    fit = getattr(backend, "scale_within", None)
    if callable(fit):
        return int(fit(max_visual_tokens, encoded))
    return budget_to_scale(max_visual_tokens, backend.grid_side).scale


def fit_policy(policy: Policy, backend: Backend, encoded: Encoded) -> Policy:
    """``policy`` for this encoded image: a :class:`VisualCap` resolved to a plain policy, others as they are."""
    if not isinstance(policy, VisualCap):
        return policy
    top = scale_cap(backend, encoded, policy.max_visual_tokens)
    inner = policy.inner
    if isinstance(inner, Fixed):
        return replace(inner, scale=min(inner.scale, top))
    if isinstance(inner, Escalate):
        rungs = tuple(r for r in inner.ladder if r <= top) or (top,)  # as make_ladder caps a budget
        return replace(inner, ladder=rungs)
    raise ValueError(f"--max-visual-tokens cannot cap a {type(inner).__name__} policy")


def largest_scale(policy: Policy) -> int:
    """The largest per-crop scale ``policy`` may ever use (its fixed scale, or the top of its ladder)."""
    if isinstance(policy, VisualCap):
        return largest_scale(policy.inner)
    if isinstance(policy, Fixed):
        return policy.scale
    if isinstance(policy, Escalate):
        return policy.ladder[-1]
    return policy.first()


def visual_count(backend: Backend, scale: int, image_hw: tuple[int, int] | None = None) -> int:
    """Visual tokens the LM receives at per-crop ``scale`` (the backend's ``visual_token_count`` when it has one;
    without ``image_hw`` its largest count over every image size); else ``scale``."""
    count = getattr(backend, "visual_token_count", None)
    return int(count(scale, image_hw)) if callable(count) else int(scale)


def context_length(backend: Backend) -> int | None:
    """The positions the backend's language model can attend to (None: unknown, not checked)."""
    n = getattr(backend, "context_length", None) or getattr(backend, "n_ctx", None)
    if n is None:  # a transformers model: its text config's trained length
        config = getattr(getattr(backend, "model", None), "config", None)
        config = getattr(config, "text_config", config)
        n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _placeholder(backend: Backend) -> str:
    """The text that marks the image in the backend's prompts (its family's, else LLaVA's ``<image>``)."""
    for owner in (backend, getattr(backend, "spec", None)):
        token = getattr(owner, "image_token", None)
        if isinstance(token, str) and token:
            return token
    return IMAGE_PLACEHOLDER


def check_question(
    backend: Backend,
    question: str,
    policy: Policy,
    max_new_tokens: int,
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
    prompt: str | None = None,
) -> str | None:
    """Why this question cannot be answered by ``backend`` under ``policy``, before any model runs; None: it can.

    Checked: the question's length in characters, a literal image placeholder (the prompt would then hold two
    images), whether the prompt can be built, and whether prompt + ``max_new_tokens`` fit the model's context at
    the largest scale the policy may climb to. ``prompt`` is the text the model is given when it is more than
    the question (``m3 eval``'s multiple-choice options and suffixes); the length limit is the question's.
    The one check every command makes (``m3 batch``, ``m3 ask``, ``m3 eval --data``).
    """
    if max_question_chars is not None and len(question) > max_question_chars:
        return f"question too long: {len(question)} characters > {max_question_chars} (--max-question-chars)"
    text = question if prompt is None else prompt
    placeholder = _placeholder(backend)
    if placeholder in text:
        return f"question contains the image placeholder {placeholder} (the prompt would hold two images)"
    prompt_ids = getattr(backend, "prompt_ids", None)
    if prompt_ids is None:
        return None
    scale = largest_scale(policy)
    try:
        # before the image is seen: the most visual tokens any image can take at that scale
        n_visual = visual_count(backend, scale)
        n_prompt = len(prompt_ids(text, n_visual))
    except MODEL_ERRORS as exc:
        return f"question cannot be turned into a prompt: {describe(exc)}"
    limit = context_length(backend)
    if limit is not None and n_prompt + max_new_tokens > limit:
        at = f"{scale} visual tokens" if n_visual == scale else f"{scale} tokens per crop (up to {n_visual} in all)"
        return (f"question too long for the model: the prompt at {at} needs {n_prompt} positions "
                f"+ {max_new_tokens} new tokens, its context is {limit}")
    return None


def each_alone(call: Callable[[list[T]], Sequence[R]], items: Sequence[T], what: str) -> list[R | str]:
    """``call(items)``; when that fails, each item on its own, so a failure is only its culprit's.

    Returns one outcome per item: what ``call`` returned for it, or the one-line error message of its failure.
    """
    items = list(items)
    if not items:
        return []
    try:
        out = list(call(items))
    except MODEL_ERRORS as exc:
        if len(items) == 1:
            log.debug("%s failed", what, exc_info=True)
            return [f"model error: {describe(exc)}"]
        log.info("%s of %d failed (%s); retrying one by one", what, len(items), describe(exc))
        return [outcome for item in items for outcome in each_alone(call, [item], what)]
    if len(out) != len(items):  # a backend bug, but still never a neighbour's answer for an item
        raise RuntimeError(f"{what}: {len(out)} results for {len(items)} inputs")
    return out


def _next_scale(policy: Policy, tried: Sequence[Rung]) -> int | None:
    """The policy's next rung; an escalating policy also climbs past an empty answer, whatever its threshold."""
    nxt = policy.next(tried)
    last = tried[-1]
    if nxt is None and not last.answer and isinstance(policy, Escalate):
        higher = [s for s in policy.ladder if s > last.scale]
        nxt = higher[0] if higher else None
    return nxt


def stop_below(policy: Policy, scale: int, measure: str | None = None) -> float | None:
    """The exact early exit for one rung: the threshold below which its decode may stop, or None.

    Only an escalating policy that returns its last rung on a miss, on a rung that is not its last, under a
    measure (``measure``, else the policy's) that can only fall as tokens are added: once the running
    confidence is below the threshold the rung escalates whatever comes next, so the final answer, its
    confidence and the rungs tried are those of the full decode. ``on_miss="best"`` may return any rung, so
    every rung is decoded in full.
    """
    measure = measure or policy_measure(policy)
    if (isinstance(policy, Escalate) and policy.on_miss == "last" and measure in MONOTONE_MEASURES
            and scale < policy.ladder[-1]):
        return policy.threshold
    return None


def _run_policies(backend: Backend, queries: Sequence[Query], measure: str | None, errors: dict[int, str],
                  early_exit: bool = True, refused: set[int] | None = None) -> list[Result]:
    """Every query's policy to the end (queries whose index is in ``errors`` are not run; those in ``refused``
    failed for what they asked, the others' errors are the model's).

    ``measure`` None: each policy's own confidence measure; a name overrides them all. Each row's timings
    are its share of the batched model calls it took part in; ``batch_size`` says how many queries were
    answered together.
    """
    refused = set() if refused is None else refused
    rungs: list[list[Rung]] = [[] for _ in queries]
    visual: list[list[int]] = [[] for _ in queries]  # visual tokens the LM received at each rung
    timings = [{"encode_ms": q.encoded.encode_ms, "prefill_ms": 0.0, "decode_ms": 0.0} for q in queries]
    policies: dict[int, Policy] = {}
    for i, q in enumerate(queries):
        if i in errors:
            continue
        try:  # a total cap is resolved now that the image's size is known; no scale fitting it: this item's error
            policies[i] = fit_policy(q.policy, backend, q.encoded)
        except (M3Error, ValueError) as exc:
            errors[i] = str(exc)
            refused.add(i)
    measures = {i: measure or policy_measure(p) for i, p in policies.items()}
    batch_size = len(policies)
    counts: dict[int, list] = {i: [0, 0] for i in policies}  # prompt, completion tokens over the rungs
    finished: list[list[str]] = [[] for _ in queries]  # each rung's finish reason
    next_scale = {i: p.first() for i, p in policies.items()}
    while next_scale:
        order = sorted(next_scale)
        requests = [
            AnswerRequest(queries[i].encoded, next_scale[i], queries[i].question, queries[i].max_new_tokens,
                          stop_below(policies[i], next_scale[i], measures[i]) if early_exit else None, measures[i],
                          queries[i].stop)
            for i in order
        ]
        outcomes = each_alone(backend.answer, requests, "answering a batch")
        following: dict[int, int] = {}
        for i, gen in zip(order, outcomes, strict=True):
            if isinstance(gen, str):
                errors[i] = gen
                continue
            text = gen.text.strip()
            conf = confidence(gen.logprobs, measures[i]) if text else 0.0  # an empty answer is no answer
            rungs[i].append(Rung(next_scale[i], text, conf, gen.stopped_early))
            visual[i].append(gen.visual_tokens if gen.visual_tokens is not None else next_scale[i])
            timings[i]["prefill_ms"] += gen.prefill_ms
            timings[i]["decode_ms"] += gen.decode_ms
            _count(counts[i], finished[i], gen, queries[i].max_new_tokens)
            nxt = _next_scale(policies[i], rungs[i])
            if nxt is not None:
                following[i] = nxt
        next_scale = following
    results = []
    for i, (tried, t) in enumerate(zip(rungs, timings, strict=True)):
        t["total_ms"] = t["encode_ms"] + t["prefill_ms"] + t["decode_ms"]
        if i in errors:
            results.append(Result("", 0.0, None, tried, t, error=errors[i],
                                  failure=REFUSED if i in refused else MODEL_FAILURE))
        else:
            t["batch_size"] = batch_size
            final = final_rung(policies[i], tried)
            at = tried.index(final)
            results.append(Result(final.answer, final.confidence, final.scale, tried, t,
                                  visual_tokens=visual[i][at], crops=queries[i].encoded.crops,
                                  threshold_met=threshold_met(policies[i], final), finish_reason=finished[i][at],
                                  prompt_tokens=counts[i][0], completion_tokens=counts[i][1]))
    return results


def _count(count: list, finished: list[str], gen, max_new_tokens: int) -> None:
    """Add one rung's prompt and completion tokens to ``count`` (a prompt length the backend does not report
    leaves the sum unknown: None) and record its finish reason in ``finished``."""
    count[0] = None if count[0] is None or gen.prompt_tokens is None else count[0] + gen.prompt_tokens
    count[1] += gen.completion_tokens if gen.completion_tokens is not None else len(gen.token_ids)
    finished.append(gen.finish_reason or ("length" if len(gen.token_ids) >= max_new_tokens else "stop"))


def _question_errors(backend: Backend, asked: Sequence[tuple[str, Policy, int]],
                     max_question_chars: int | None) -> dict[int, str]:
    """``{index: one-line problem}`` of the (question, policy, max_new_tokens) items that cannot be asked."""
    errors: dict[int, str] = {}
    for i, (question, policy, max_new_tokens) in enumerate(asked):
        problem = check_question(backend, question, policy, max_new_tokens, max_question_chars)
        if problem is not None:
            errors[i] = problem
    return errors


def answer_queries(
    backend: Backend,
    queries: Sequence[Query],
    measure: str | None = None,
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
    early_exit: bool = True,
) -> list[Result]:
    """Run every query's policy to the end, batching all queries that sit on a rung together.

    Escalation only re-runs the LM on the same encoded grid, pooled to the next scale; a rung that can no
    longer stop the climb stops decoding (``early_exit``, see :func:`stop_below`). Never raises for one
    item's problem: a refused question or a model failure is that query's ``Result.error``. ``measure``
    None: each query's policy's confidence measure; a name overrides them.
    """
    errors = _question_errors(backend, [(q.question, q.policy, q.max_new_tokens) for q in queries],
                              max_question_chars)
    return _run_policies(backend, queries, measure, errors, early_exit, refused=set(errors))


def answer_images(
    backend: Backend,
    images: Sequence[Any],
    questions: Sequence[str],
    policies: Sequence[Policy],
    max_new_tokens: int = 16,
    measure: str | None = None,
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
) -> list[Result]:
    """Check each question, encode the images of the answerable ones once, then run each policy.

    One result per image, in order; per-item problems (question, encode, answer) are that item's error only.
    A refused question costs no encode.
    """
    n = len(images)
    if not len(questions) == len(policies) == n:
        raise ValueError(f"{n} images, {len(questions)} questions and {len(policies)} policies")
    asks = [Ask(image, q, pol, max_new_tokens) for image, q, pol in zip(images, questions, policies, strict=True)]
    return answer_asks(backend, asks, measure, max_question_chars)


def answer_asks(
    backend: Backend,
    asks: Sequence[Ask],
    measure: str | None = None,
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
) -> list[Result]:
    """:func:`answer_images` for questions that each bring their own answer length and stop sequences (an HTTP
    server's queued requests): every answerable picture encoded once, all policies run rung by rung together.

    One result per ask, in order; a failed one carries ``error`` and ``failure`` (:data:`REFUSED`: its question
    or its budget for this image; :data:`MODEL_FAILURE`: the model's run on it), never its neighbours' problem.
    """
    errors = _question_errors(backend, [(a.question, a.policy, a.max_new_tokens) for a in asks], max_question_chars)
    refused = set(errors)
    todo = [i for i in range(len(asks)) if i not in errors]
    encoded: dict[int, Encoded] = {}
    for i, enc in zip(todo, each_alone(backend.encode, [asks[i].image for i in todo], "encoding a batch"),
                      strict=True):
        if isinstance(enc, str):
            errors[i] = enc
        else:
            encoded[i] = enc
    placeholder = Encoded(grid=None, side=0, encode_ms=0.0)  # never answered: the item already has its error
    queries = [Query(encoded.get(i, placeholder), a.question, a.policy, a.max_new_tokens, a.stop)
               for i, a in enumerate(asks)]
    return _run_policies(backend, queries, measure, errors, refused=refused)


def ask_images(
    backend: Backend,
    images: Sequence,
    questions: Sequence[str],
    policies: Sequence[Policy],
    max_new_tokens: int = 16,
    measure: str | None = None,
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
    raise_errors: bool = True,
) -> list[Result]:
    """:func:`answer_images` with a per-item wall time, for callers that want every answer or nothing:
    the first item's problem is raised as :class:`~m3cli.errors.ItemError` (``m3 ask``: one line, exit 1).
    ``raise_errors=False`` returns error results instead (``m3 ask --json`` prints them as rows)."""
    start = time.perf_counter()
    results = answer_images(backend, images, questions, policies, max_new_tokens, measure, max_question_chars)
    for r in results:
        if r.error is not None and raise_errors:
            raise ItemError(r.error)
    wall = (time.perf_counter() - start) * 1000 / max(len(results), 1)
    for r in results:
        r.timings["wall_ms"] = wall
    return results

