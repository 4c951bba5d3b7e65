"""Every ``m3`` command in the README's code blocks parses, and those that can run here run as documented.

The commands are taken from the fenced code blocks of README.md, in order (comments dropped, ``&&``, ``;`` and
``|`` split a line into commands; the commands of a ``for NAME in WORDS; do ...; done`` loop are taken once per
word, ``$NAME`` replaced by it, as the shell runs them). Each one must parse: its subcommand and every option
exist and take the value given (a typo in the README fails here). Then it is RUN, in a scratch folder that
sees the checkout's ``models/`` and keeps what earlier commands wrote, unless a rule below skips it; a command
that runs must exit 0 (every README example is a success) and ``--json`` output must be result rows. (The
README's shard loop is also run whole, as written, by tests/test_reliability_writers.py.)

Skipped, by rule:
- it reads a file or folder that is neither in the checkout nor written by an earlier README command
  (``photo.png``, ``./frames``, ``clip.mp4``, ``my.jsonl``: the user's own files);
- its ``--model`` is a hub id or a registry name of a hub model (it needs the network);
- its input comes through a pipe from another program (``find data ... | m3 batch -``);
- it is long work that the other tests cover on tiny models: ``m3 bench`` (it times the machine for minutes),
  ``m3 train``, and ``m3 eval`` over the built-in scenes (600 questions at five scales);
- it is a server or needs one: ``m3 serve`` runs until it is stopped (tests/test_serve.py and
  tests/test_serve_cli.py start and stop it), and ``--server URL`` asks a running ``m3 serve``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from m3cli.cli import cli
from m3cli.output import ROW_KEYS

REPO = Path(__file__).resolve().parents[1]
SEPARATORS = {"&&", ";", "|", "||"}
LONG = {"bench", "train"}  # m3 eval over the scenes: see _long
INPUT_PARAMS = ("image", "inputs", "files", "src", "data", "mmproj", "config_path", "gguf_path")


def readme_commands(text: str) -> list[tuple[list[str], bool]]:
    """``(argv after "m3", fed by a pipe)`` for every ``m3`` command in the fenced code blocks, in order."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
            simple, start, piped = [], 0, False
            for i, token in enumerate([*tokens, ";"]):
                if token in SEPARATORS:
                    simple.append((tokens[start:i], piped))
                    piped = token == "|"
                    start = i + 1
            commands += [(words[1:], fed) for words, fed in _unrolled(simple) if words and words[0] == "m3"]
    return commands


def _unrolled(simple: list[tuple[list[str], bool]]) -> list[tuple[list[str], bool]]:
    """Simple commands with each ``for NAME in WORDS; do BODY; done`` loop written out, once per word."""
    out: list[tuple[list[str], bool]] = []
    i = 0
    while i < len(simple):
        words, piped = simple[i]
        i += 1
        if len(words) < 3 or words[0] != "for" or words[2] != "in":
            out.append((words, piped))
            continue
        body = []
        while i < len(simple) and simple[i][0] != ["done"]:
            step, fed = simple[i]
            body.append((step[1:] if step[:1] == ["do"] else step, fed))
            i += 1
        i += 1  # done
        name = re.compile(r"\$(?:\{%s\}|%s(?![A-Za-z0-9_]))" % ((re.escape(words[1]),) * 2))
        out += [([name.sub(value, w) for w in step], fed) for value in words[3:] for step, fed in body]
    return out


def parse(argv: list[str]) -> tuple[list[str], dict]:
    """The command path (e.g. ``["bench", "latency"]``) and its parsed parameters; click errors propagate."""
    group: click.Command = cli
    path: list[str] = []
    args = list(argv)
    ctx = click.Context(cli, info_name="m3")
    while isinstance(group, click.Group):
        name = args.pop(0)
        sub = group.get_command(ctx, name)
        assert sub is not None, f"m3 {' '.join(path + [name])}: no such command"
        path.append(name)
        group = sub
        ctx = click.Context(group, info_name=name, parent=ctx)
    ctx = group.make_context(path[-1], args, parent=ctx.parent)
    return path, ctx.params


def _globbed(argv: list[str], cwd: Path) -> list[str]:
    """The arguments as a shell expands them: a pattern that matches files becomes those files, in order."""
    out = []
    for arg in argv:
        matches = sorted(str(p.relative_to(cwd)) for p in cwd.glob(arg)) if any(c in arg for c in "*?[") else []
        out += matches or [arg]
    return out


def _long(path: list[str], params: dict) -> bool:
    if path[0] in LONG:
        return True
    return path[0] == "eval" and not params.get("data") and not params.get("export_dir")


def skip_reason(path: list[str], params: dict, piped: bool, cwd: Path) -> str | None:
    """Why this command is not run here (see the module doc), or None."""
    from m3cli.models.registry import load_registry

    if _long(path, params):
        return "long work, covered on tiny models by other tests"
    if piped:
        return "its input comes from another program"
    if path[0] == "serve":
        return "a server runs until stopped: its own tests start and stop it"
    if params.get("server"):
        return "it asks a running m3 serve"
    model = params.get("model")
    if model and not (cwd / model).exists():
        entry = load_registry().get(model)
        if entry is None or not entry.local:
            return f"--model {model} needs the network"
    for name in INPUT_PARAMS:
        value = params.get(name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item != "-" and not (cwd / item).exists() and not list(cwd.glob(item)):
                return f"{item} is the user's own file"
    return None


def test_readme_commands_are_extracted():
    found = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    argv = [" ".join(a) for a, _ in found]
    assert any(a.startswith("ask models/examples/scene-0.png") for a in argv)
    assert any(a.startswith("batch -") and piped for (a_, piped), a in zip(found, argv, strict=True))
    assert "models" in argv


def test_servers_and_their_clients_are_skipped_by_rule(tmp_path):
    for argv, reason in ((["serve", "--auto-scale"], "runs until stopped"),
                         (["ask", "models/examples/scene-0.png", "--server", "http://127.0.0.1:8000"], "m3 serve")):
        path, params = parse(argv)
        assert reason in skip_reason(path, params, False, REPO)


def test_readme_m3_commands_parse():
    for argv, _ in readme_commands((REPO / "README.md").read_text(encoding="utf-8")):
        parse(list(argv))  # a click usage error names the command and option


def test_readme_m3_commands_run(tmp_path):
    cwd = tmp_path / "clone"
    cwd.mkdir()
    (cwd / "models").symlink_to(REPO / "models")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "M3_PROGRESS_SECONDS": "3600"}
    env.pop("M3_SERVER", None)  # a local m3 ask, whatever the developer's shell points at
    ran, skipped = [], []
    for argv, piped in readme_commands((REPO / "README.md").read_text(encoding="utf-8")):
        shown = "m3 " + shlex.join(argv)
        path, params = parse(list(argv))
        why = skip_reason(path, params, piped, cwd)
        if why is not None:
            skipped.append((shown, why))
            continue
        res = subprocess.run([sys.executable, "-m", "m3cli", *_globbed(argv, cwd)], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{shown}: exit {res.returncode}\n{res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr, shown
        if path == ["ask"] and params.get("as_json"):
            row = json.loads(res.stdout)
            assert list(row) == list(ROW_KEYS) and row["error"] is None, shown
        ran.append(shown)
    print("ran:", *ran, "skipped:", *(f"{c}  ({why})" for c, why in skipped), sep="\n  ")
    assert len(ran) >= 5, (ran, skipped)
    assert any(c.startswith("m3 ask models/examples/scene-0.png") for c in ran)
    assert (cwd / "demo" / "test.jsonl").is_file() and (cwd / "acc.png").is_file()  # written by the README


@pytest.mark.parametrize("line, expected", [
    ("m3 ask a.png q --tokens 9  # a comment", [(["ask", "a.png", "q", "--tokens", "9"], False)]),
    ("pip install -e . && m3 models", [(["models"], False)]),
    ("find d -name '*.png' | m3 batch - -q 'a # b'", [(["batch", "-", "-q", "a # b"], True)]),
    ("for k in 0 1; do m3 batch d --shard $k/2 -o o/s-${k}.jsonl; done; m3 merge o/s-*.jsonl -o all.jsonl",
     [(["batch", "d", "--shard", "0/2", "-o", "o/s-0.jsonl"], False),
      (["batch", "d", "--shard", "1/2", "-o", "o/s-1.jsonl"], False),
      (["merge", "o/s-*.jsonl", "-o", "all.jsonl"], False)]),
])
def test_extraction_rules(line, expected):
    assert readme_commands(f"text\n```bash\n{line}\n```\n") == expected
