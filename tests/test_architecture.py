"""The layers of docs/architecture.md hold in the code: no module imports a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "m3cli"

# Lower numbers are lower layers; a module may import its own package and any lower layer.
LAYERS = {
    "errors": 0, "fileio": 0, "logs": 0,
    "cache": 1,
    "matryoshka": 2, "models": 2, "media": 2, "output": 2, "data": 2, "gguf": 2,
    "families": 3,
    "convert": 4,
    "backends": 5,
    "answering": 6,
    "engines": 7, "eval": 7, "train": 7, "bench": 7, "server": 7,
    "cli": 8, "__main__": 8,
}
# Same-layer imports allowed: bench times the engines, eval and server pieces it measures; nothing imports bench.
ALLOWED_SIDEWAYS = {("bench", "engines"), ("bench", "eval"), ("bench", "server"), ("__main__", "cli")}
TOP_LEVEL_MODULES = {"__init__", "__main__", "errors", "fileio", "logs"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "m3cli":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from m3cli import logs
                found.update(alias.name for alias in node.names if alias.name != "__version__")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("m3cli.") and len(a.name.split(".")) > 1)
    return found


def _layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_top_level_holds_only_packages_and_leaves():
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert loose == TOP_LEVEL_MODULES


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_no_module_imports_a_layer_above_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _layer_of(path)
        if src == "__init__":
            continue
        for dst in _imports(path):
            if dst == src or LAYERS[dst] < LAYERS[src] or (src, dst) in ALLOWED_SIDEWAYS:
                continue
            wrong.append(f"{path.relative_to(PACKAGE)} imports {dst}")
    assert not wrong, wrong


def test_cli_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, m3cli.cli; print(sorted(m for m in ('torch', 'numpy', 'transformers', 'PIL', 'av', "
            "'llama_cpp', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
