"""Option sets shared by several commands, and the click types that check values at parse time.

A bad value is a one-line usage error (exit 2) before any model loads: ``--tokens abc``, ``--ladder 9,x``,
``--thresholds 2``, ``--shard 3/2``, ``--threshold nan``, ``--threads -1``, ``--fps inf``, ``--model ''``, and
number lists that are empty, have an empty piece or repeat a number (``--tokens ''``, ``1,,9``, ``9,9``). Every
numeric option has a range type, and float options reject ``nan`` and ``inf`` (click's FloatRange lets both
through).
"""

from __future__ import annotations

import functools
import math
import re

import click

from m3cli.errors import M3Error
from m3cli.matryoshka.confidence import MEASURES
from m3cli.models.build import IMAGE_TOKEN
from m3cli.models.dtypes import DTYPES

# = m3cli.answering.core.DEFAULT_MAX_QUESTION_CHARS (not imported: options stay import-light; a test checks both agree)
MAX_QUESTION_CHARS = 2000
ALL_GPU_LAYERS = 2**31 - 1  # what llama-cpp-python passes for -1 ("all layers")


class FiniteFloat(click.FloatRange):
    """A real number, optionally within bounds; ``nan``, ``inf`` and ``-inf`` are refused."""

    def convert(self, value, param, ctx) -> float:
        number = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class DeviceName(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (``gpu`` and ``metal`` too, for llama.cpp)."""

    name = "DEVICE"
    PATTERN = re.compile(r"auto|cpu|mps|metal|gpu|cuda(:\d+)?")

    def convert(self, value, param, ctx) -> str:
        text = str(value).strip().lower()
        if not self.PATTERN.fullmatch(text):
            self.fail(f"unknown device {value!r} (use auto, cpu, cuda, cuda:N or mps)", param, ctx)
        return text


class TokenBudget(click.ParamType):
    """A visual-token budget: a whole number >= 1 (rounded down to a nested scale later, per model)."""

    name = "TOKENS"

    def convert(self, value, param, ctx) -> int:
        from m3cli.matryoshka.scales import parse_budget

        try:
            return parse_budget(value)
        except (M3Error, ValueError) as exc:  # BudgetError
            self.fail(str(exc), param, ctx)


class NonEmpty(click.ParamType):
    """A string that is not empty or blank (``--model ''`` is a mistake, never the default model)."""

    name = "TEXT"

    def convert(self, value, param, ctx) -> str:
        if not str(value).strip():
            self.fail("is empty (leave the option out for its default)", param, ctx)
        return value


class NonEmptyPath(click.Path):
    """``click.Path`` that refuses an empty value (click would take ``''`` as the current folder)."""

    def convert(self, value, param, ctx):
        if not str(value).strip():
            self.fail("is empty (leave the option out for its default)", param, ctx)
        return super().convert(value, param, ctx)


class NumberList(click.ParamType):
    """Comma-separated numbers, e.g. ``9,36,576`` -> ``[9, 36, 576]``.

    ``item`` is int or float. At least one number is needed, with no empty piece (``1,,9``) and no number
    twice (``9,9``: a scale or threshold is tried once); with bounds each must lie within them.
    """

    def __init__(self, item: type = int, low: float | None = None, high: float | None = None) -> None:
        self.item = item
        self.low = low
        self.high = high
        self.name = "N,N,..." if item is int else "X,X,..."

    def convert(self, value, param, ctx) -> list:
        if isinstance(value, list):
            return value
        kind = "integers" if self.item is int else "numbers"
        pieces = str(value).split(",")
        if not str(value).strip():
            self.fail(f"needs at least one number, got {value!r}", param, ctx)
        if any(not p.strip() for p in pieces):
            self.fail(f"has an empty item (a stray comma?): {value!r}", param, ctx)
        try:
            numbers = [self.item(x) for x in pieces]
        except ValueError:
            self.fail(f"must be comma-separated {kind}, got {value!r}", param, ctx)
        if any(not math.isfinite(n) for n in numbers):
            self.fail(f"needs finite {kind}, got {value!r}", param, ctx)
        repeated = sorted({n for n in numbers if numbers.count(n) > 1})
        if repeated:
            self.fail(f"lists {', '.join(f'{n:g}' for n in repeated)} more than once: {value!r}", param, ctx)
        if self.low is None and self.high is None:
            return numbers
        low = float("-inf") if self.low is None else self.low
        high = float("inf") if self.high is None else self.high
        if not numbers or any(not low <= n <= high for n in numbers):
            bounds = f"in [{low:g}, {high:g}]" if self.high is not None else f">= {low:g}"
            self.fail(f"needs {kind} {bounds}, got {value!r}", param, ctx)
        return numbers


class SizeList(click.ParamType):
    """Comma-separated image sizes ``WxH``, e.g. ``4032x3024,8000x6000`` -> ``[(4032, 3024), (8000, 6000)]``."""

    name = "WxH,..."
    PATTERN = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")

    def convert(self, value, param, ctx) -> list[tuple[int, int]]:
        if isinstance(value, list):
            return value
        sizes = []
        for piece in str(value).split(","):
            if not piece.strip():
                continue
            m = self.PATTERN.fullmatch(piece)
            if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
                self.fail(f"needs sizes WxH (e.g. 4032x3024), got {piece.strip()!r}", param, ctx)
            sizes.append((int(m.group(1)), int(m.group(2))))
        if not sizes:
            self.fail(f"needs at least one size WxH, got {value!r}", param, ctx)
        return sizes


class ShardSpec(click.ParamType):
    """``K/N``: shard K of N, 0 <= K < N."""

    name = "K/N"

    def convert(self, value, param, ctx) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        from m3cli.engines.shard import parse_shard

        try:
            return parse_shard(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Colour(click.ParamType):
    """A colour name (``white``, ``black``, ...) or ``#rrggbb``, as ``(r, g, b)``."""

    name = "COLOUR"

    def convert(self, value, param, ctx) -> tuple[int, int, int]:
        if isinstance(value, tuple):
            return value
        from m3cli.media.image import parse_colour  # Pillow's colour names; only when the option is given

        try:
            return parse_colour(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


TOKENS = TokenBudget()
INT_LIST = NumberList(int)
SHARD = ShardSpec()
SIZES = SizeList()
THRESHOLD = FiniteFloat(0.0, 1.0)                     # a confidence
POSITIVE = FiniteFloat(0.0, min_open=True)            # e.g. --fps
NON_NEGATIVE = FiniteFloat(0.0)                       # e.g. --gpus-per-actor
THREADS = click.IntRange(1, 4096)
DEVICE = DeviceName()
COLOUR = Colour()
DTYPE = click.Choice(["auto", *DTYPES])
NON_EMPTY = NonEmpty()


def _gpu_layers(ctx, param, value):
    return ALL_GPU_LAYERS if value == -1 else value


def model_options(fn):
    """Options shared by every command that loads a model (``open_backend``'s keyword arguments)."""
    fn = click.option("--vision-tower", type=NonEmptyPath(file_okay=False), default=None,
                      help="Original LLaVA checkpoints: the CLIP tower directory (default: $M3_VISION_TOWER, "
                           "else mm_vision_tower from the local Hugging Face cache).")(fn)
    fn = click.option("--chat-template", type=NON_EMPTY, default=None, metavar="FILE|NAME",
                      help="The prompt: a jinja / chat_template.json file or a recipe (vicuna_v1, "
                           "mistral_instruct, chatml_direct); also for a model without a template.")(fn)
    fn = click.option("--prefix-after-special/--no-prefix-after-special", default=None,
                      help="GGUF: whether the source tokenizer puts a '▁' before text that follows a special token "
                           "(default: the pair's m3cli.prefix_after_special key, else yes for a SentencePiece "
                           "vocabulary); for pairs that do not record it, see docs/gguf.md.")(fn)
    fn = click.option("--ctx", type=click.IntRange(64, 1 << 24), default=None,
                      help="GGUF: context length (default 2048; 4096 for LLaVA-1.6 pairs).")(fn)
    fn = click.option("--mmproj-offload/--no-mmproj-offload", default=None,
                      help="GGUF: run the vision encoder on the GPU too (default: when the build has one).")(fn)
    fn = click.option("--n-gpu-layers", type=click.IntRange(-1), default=None, callback=_gpu_layers,
                      help="GGUF: LM layers to offload, -1 all (default: all when the build supports a GPU).")(fn)
    fn = click.option("--mmproj", type=NonEmptyPath(dir_okay=False), default=None,
                      help="GGUF: the vision projector file (default: a sibling *mmproj*.gguf).")(fn)
    fn = click.option("--threads", type=THREADS, default=None, help="CPU threads (>= 1).")(fn)
    fn = click.option("--dtype", type=DTYPE, default="auto", show_default=True,
                      help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")(fn)
    fn = click.option("--device", type=DEVICE, default="auto", show_default=True,
                      help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")(fn)
    fn = click.option("--backend", type=click.Choice(["auto", "torch", "llamacpp"]), default="auto",
                      show_default=True, help="Inference backend (auto: llamacpp for .gguf models, else torch).")(fn)
    fn = click.option("-m", "--model", type=NON_EMPTY, default=None,
                      help="Registry name, model directory, .gguf file or hub id (default: the shipped m3-shapes).")(fn)
    return fn


class ModelPolicyHelp(click.Option):
    """An option whose help names the default model's tuned policy (read from the registry when help is
    shown, so importing the CLI reads no file): ``{policy}`` and ``{threshold}`` in the help are filled in."""

    def get_help_record(self, ctx):
        record = super().get_help_record(ctx)
        if record is None:
            return None
        words = _default_policy_words()
        text = record[1]
        for key, value in words.items():
            text = text.replace("{" + key + "}", value)
        return record[0], text


def _default_policy_words() -> dict[str, str]:
    """How the default model's policy, its threshold and the fallback threshold read in help texts."""
    from m3cli.matryoshka.policy import FALLBACK_POLICY

    words = {"fallback": f"{FALLBACK_POLICY.threshold:g}", "policy": "none", "threshold": "none"}
    try:
        from m3cli.answering.defaults import model_policy
        from m3cli.models.registry import DEFAULT_MODEL

        spec = model_policy(None)
    except M3Error:
        return words | {"policy": "a broken registry entry"}
    if spec is not None:
        shown = spec.over(None)
        words.update(policy=f"{DEFAULT_MODEL}: {shown.flags()}", threshold=f"{DEFAULT_MODEL}: {shown.threshold:g}")
    return words
def image_options(fn):
    """--upright, --alpha-background, --fast-decode: how a user's images become pixels, gathered into one
    ``image_options`` keyword argument (an :class:`m3cli.media.ImageOptions`; all off: the model's recipe)."""

    @functools.wraps(fn)
    def with_image_options(*args, upright, alpha_background, fast_decode, **kwargs):
        from m3cli.media.image import ImageOptions

        return fn(*args, image_options=ImageOptions(upright, alpha_background, fast_decode), **kwargs)

    options = [
        click.option("--upright", is_flag=True,
                     help="Turn each image by its EXIF orientation first (default: as stored, as the model's "
                          "original code feeds it; a note says when an image has one)."),
        click.option("--alpha-background", type=COLOUR, default=None,
                     help="Composite transparent pixels onto COLOUR first, a name (white, black, ...) or #rrggbb "
                          "(default: alpha dropped, as the model's original code does; a note says when an "
                          "image has transparency)."),
        click.option("--fast-decode", is_flag=True,
                     help="Decode large JPEGs at 1/2, 1/4 or 1/8 scale (the short side kept >= 1008 px): faster, "
                          "but the pixels differ from the model's recipe (rows record decode_scale)."),
    ]
    for option in reversed(options):
        with_image_options = option(with_image_options)
    return with_image_options


def policy_options(fn):
    """--tokens / --auto-scale and their knobs (:func:`resolve_policy` turns them into the run's policy)."""
    fn = click.option("--on-miss", type=click.Choice(["last", "best"]), default=None,
                      help="--auto-scale when no rung reaches the threshold: answer with the last rung tried, or "
                           "the most confident one (decodes every rung in full); threshold_met says which "
                           "happened (default: last).")(fn)
    fn = click.option("--measure", type=click.Choice(list(MEASURES)), default=None,
                      help="Confidence measure reported and escalated on: sequence, min, first or mean, as "
                           "m3 eval --tune picks it (default: the model's, else sequence).")(fn)
    fn = click.option("--ladder", type=INT_LIST, default=None,
                      help="Escalation rungs, e.g. 9,36,576 (default: every scale).")(fn)
    fn = click.option("--threshold", type=THRESHOLD, default=None, cls=ModelPolicyHelp,
                      help="Confidence in [0, 1] needed to stop escalating (default: the model's tuned threshold "
                           "({threshold}); {fallback} for a model without one).")(fn)
    fn = click.option("--auto-scale", is_flag=True,
                      help="Start at the smallest scale; escalate while confidence < threshold (the whole "
                           "ladder, up to --tokens if given).")(fn)
    fn = click.option("-t", "--tokens", type=TOKENS, default=None, cls=ModelPolicyHelp,
                      help="Visual-token budget per crop; rounded down to a nested scale (576/144/36/9/1). "
                           "LLaVA-NeXT pools every crop to it (see --max-visual-tokens for a total). Without "
                           "--tokens and --auto-scale: the model's tuned policy ({policy}; m3 models lists "
                           "them), else its full grid.")(fn)
    return fn


def resolve_policy(model: str | None, tokens: int | None, auto_scale: bool, threshold: float | None,
                   ladder: list[int] | None, measure: str | None, on_miss: str | None):
    """The scale-policy flags and the model's tuned policy: ``(what the flags state, the model's policy or
    None)`` as :class:`~m3cli.matryoshka.policy.PolicySpec`. Knobs that only mean something when the policy
    escalates (``--ladder``, ``--threshold``, ``--on-miss``) are a usage error when it does not."""
    from m3cli.answering.defaults import model_policy
    from m3cli.matryoshka.policy import PolicySpec

    spec = PolicySpec(tokens, auto_scale, threshold, measure, tuple(ladder) if ladder else None, on_miss)
    default = model_policy(model)
    if not spec.over(default).auto_scale and (ladder is not None or threshold is not None or on_miss is not None):
        why = "" if spec.chooses_scale or default is None else " (the model's policy is a fixed scale)"
        raise click.UsageError(f"--ladder, --threshold and --on-miss need --auto-scale{why}")
    return spec, default


def max_visual_tokens_option(fn):
    """--max-visual-tokens: a cap on the TOTAL visual tokens of each image (``make_policy``'s max_visual_tokens)."""
    return click.option("--max-visual-tokens", type=TOKENS, default=None, metavar="N",
                        help="Cap on all the visual tokens the LM receives per image: the largest scale whose total "
                             "for THIS image fits N (LLaVA-NeXT: base crop + tiles + newlines; LLaVA-1.5: the "
                             "scale). With --tokens the smaller wins; with --auto-scale it caps the ladder.")(fn)


def question_limit_option(fn):
    """--max-question-chars: a longer question is that item's error (a row), refused before the model runs."""
    return click.option("--max-question-chars", type=click.IntRange(1), default=MAX_QUESTION_CHARS,
                        show_default=True,
                        help="Refuse a longer question before the model runs (an error row for that item alone); "
                             "prompts that do not fit the model's context are refused too.")(fn)


def check_run_question(question: str | None, max_question_chars: int | None) -> None:
    """A question given for the whole run (``-q``, ``m3 ask``'s QUESTION) that no item could be asked is one usage
    error before any work, not an error row per item."""
    if question is None:
        return
    if max_question_chars is not None and len(question) > max_question_chars:
        raise click.UsageError(f"the question is {len(question)} characters, over --max-question-chars "
                               f"{max_question_chars}")
    if IMAGE_TOKEN in question:
        raise click.UsageError(f"the question contains the image placeholder {IMAGE_TOKEN} "
                               "(the prompt would hold two images)")
