"""Option sets shared by several commands, and the click types that check values at parse time.

A bad value is a one-line usage error (exit 2) before any model loads: ``--tokens abc``, ``--ladder 9,x``,
``--thresholds 2``, ``--shard 3/2``.
"""

from __future__ import annotations

import click

from m3cli.errors import M3Error


class TokenBudget(click.ParamType):
    """A visual-token budget: a whole number >= 1 (rounded down to a nested scale later, per model)."""

    name = "TOKENS"

    def convert(self, value, param, ctx) -> int:
        from m3cli.scales import parse_budget

        try:
            return parse_budget(value)
        except (M3Error, ValueError) as exc:  # BudgetError
            self.fail(str(exc), param, ctx)


class NumberList(click.ParamType):
    """Comma-separated numbers, e.g. ``9,36,576`` -> ``[9, 36, 576]`` (empty pieces ignored).

    ``item`` is int or float. With bounds, at least one number is needed and each must lie within them.
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
        try:
            numbers = [self.item(x) for x in str(value).split(",") if x.strip()]
        except ValueError:
            self.fail(f"must be comma-separated {kind}, got {value!r}", param, ctx)
        if self.low is None and self.high is None:
            return numbers
        low = float("-inf") if self.low is None else self.low
        high = float("inf") if self.high is None else self.high
        if not numbers or any(not low <= n <= high for n in numbers):
            bounds = f"in [{low:g}, {high:g}]" if self.high is not None else f">= {low:g}"
            self.fail(f"needs {kind} {bounds}, got {value!r}", param, ctx)
        return numbers


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


TOKENS = TokenBudget()
INT_LIST = NumberList(int)
SHARD = ShardSpec()


def model_options(fn):
    """Options shared by every command that loads a model (``open_backend``'s keyword arguments)."""
    fn = click.option("--ctx", type=click.IntRange(64), default=None, help="GGUF: context length (default 2048).")(fn)
    fn = click.option("--mmproj-offload/--no-mmproj-offload", default=None,
                      help="GGUF: run the vision encoder on the GPU too (default: when the build has one).")(fn)
    fn = click.option("--n-gpu-layers", type=int, default=None,
                      help="GGUF: LM layers to offload (default: all when the build supports a GPU).")(fn)
    fn = click.option("--mmproj", type=click.Path(dir_okay=False), default=None,
                      help="GGUF: the vision projector file (default: a sibling *mmproj*.gguf).")(fn)
    fn = click.option("--threads", type=int, default=None, help="CPU threads for torch.")(fn)
    fn = click.option("--dtype", default="auto", show_default=True,
                      help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16 or bfloat16.")(fn)
    fn = click.option("--device", default="auto", show_default=True,
                      help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")(fn)
    fn = click.option("--backend", type=click.Choice(["auto", "torch", "llamacpp"]), default="auto",
                      show_default=True, help="Inference backend (auto: llamacpp for .gguf models, else torch).")(fn)
    fn = click.option("-m", "--model", default=None,
                      help="Registry name, model directory, .gguf file or hub id (default: the shipped m3-shapes).")(fn)
    return fn


def policy_options(fn):
    """--tokens / --auto-scale and their knobs."""
    fn = click.option("--ladder", type=INT_LIST, default=None,
                      help="Escalation rungs, e.g. 9,36,576 (default: every scale).")(fn)
    fn = click.option("--threshold", type=float, default=None,
                      help="Confidence needed to stop escalating (default: the model's tuned value).")(fn)
    fn = click.option("--auto-scale", is_flag=True,
                      help="Start at the smallest scale; escalate while confidence < threshold.")(fn)
    fn = click.option("-t", "--tokens", type=TOKENS, default=None,
                      help="Visual-token budget; rounded down to a nested scale (576/144/36/9/1).")(fn)
    return fn


def check_policy_flags(auto_scale: bool, threshold: float | None, ladder: list[int] | None) -> None:
    """--ladder and --threshold only mean something with --auto-scale."""
    if not auto_scale and (ladder is not None or threshold is not None):
        raise click.UsageError("--ladder and --threshold need --auto-scale")
