"""The ``m3`` group: -v and logging, and the one place where failures become one line and an exit code.

Machine output goes to stdout, logs and errors to stderr. A :class:`~m3cli.errors.M3Error` is the user's to
fix: ``UsageError`` prints like click's own usage errors (``m3 batch: error: ...``), the others as
``m3: error: ...``, each with its ``exit_code``. Anything else is a bug: still one line (exit 1), with the
traceback under ``-vv``. This module imports nothing heavy, so the exit path never loads torch or Ray, and
once the exit code is known a further Ctrl-C (say, while Ray or torch shut down) ends the process at once,
with no traceback.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from m3cli import __version__, logs
from m3cli.errors import M3Error, UsageError, one_line

INTERRUPTED = 130


class M3Command(click.Command):
    """A command whose core-raised :class:`~m3cli.errors.UsageError` is shown with its command path."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise click.UsageError(str(exc), ctx=ctx) from None


class M3Group(click.Group):
    """A group whose every failure is one line on stderr with the documented exit code."""

    command_class = M3Command
    group_class = type  # subgroups (m3 bench) are M3Groups too

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            rv = exc.exit_code
        except click.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "m3"
            click.echo(f"{where}: error: {exc.format_message()}", err=True)
            rv = 2 if isinstance(exc, click.UsageError) else exc.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("m3: interrupted", err=True)
            rv = INTERRUPTED
        except (M3Error, ValueError) as exc:  # ValueError: errors not yet moved under M3Error
            rv = _report(str(exc), getattr(exc, "exit_code", 2))
        except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback with -vv
            detail = f"{type(exc).__name__}: {one_line(exc)}" if one_line(exc) else type(exc).__name__
            rv = _report(f"internal error: {detail} (-vv shows the traceback)", 1)
        if standalone_mode:
            sys.exit(rv or 0)
        return rv


def _report(message: str, exit_code: int) -> int:
    """Print ``m3: error: message`` (after the traceback under -vv) and return the exit code."""
    if logs.verbosity() >= 2:  # -vv: the traceback too, for bug reports
        import traceback

        traceback.print_exc()
    click.echo(f"m3: error: {one_line(message)}", err=True)
    return exit_code


def command(name: str | None = None, **attrs):
    """``click.command`` for a top-level ``m3`` command (core usage errors shown with the command path)."""
    return click.command(name, cls=M3Command, **attrs)


def group(name: str | None = None, **attrs):
    """``click.group`` for an ``m3`` subgroup."""
    return click.group(name, cls=M3Group, **attrs)


@click.group(cls=M3Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="m3")
@click.option("-v", "--verbose", count=True, help="-v: info and third-party warnings; -vv: debug.")
def cli(verbose: int) -> None:
    """Budgeted visual question answering with Matryoshka Multimodal Models (M3).

    An image becomes a 24x24 grid of visual tokens; M3 pools it to 144, 36, 9 or 1 tokens,
    so each question buys only the visual detail it needs.
    """
    logs.configure(verbose)


def main() -> None:
    """Console-script entry point: run the command, then exit with its code, immune to a second Ctrl-C."""
    try:
        code = cli.main(prog_name="m3", standalone_mode=False)
    except SystemExit as exc:  # commands end with SystemExit(exit_code)
        code = exc.code
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being reported
        _guard_interrupts()
        click.echo("m3: interrupted", err=True)
        code = INTERRUPTED
    _guard_interrupts()
    sys.exit(code)


def _guard_interrupts() -> None:
    """From now on a Ctrl-C ends the process at once with exit code 130 instead of raising KeyboardInterrupt
    into whatever runs (the report of the first one, atexit handlers of torch, Ray or multiprocessing)."""
    try:
        signal.signal(signal.SIGINT, _interrupted_while_exiting)
    except ValueError:  # not the main thread: nothing to guard
        pass


def _interrupted_while_exiting(signum, frame) -> None:  # noqa: ARG001
    try:
        sys.stderr.flush()
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(INTERRUPTED)
