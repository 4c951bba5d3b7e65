"""``m3 models``: the registry, one model per line, with the default, each model's policy and its local copy."""

from __future__ import annotations

import json

import click

from m3cli.cli.app import command


@command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model instead of the table.")
def list_models(as_json):
    """List the models in the registry (models/registry.yaml).

    \b
    For each: its format, whether a copy is on this machine (shipped with m3, converted into the m3 cache, or
    in the Hugging Face cache; nothing is downloaded to find out) and its size, and the scale policy m3 ask /
    m3 batch use when given neither --tokens nor --auto-scale. The default model (used without --model) is
    marked *.
    """
    from m3cli.models.registry import DEFAULT_MODEL, load_registry

    entries = [_describe(entry, entry.name == DEFAULT_MODEL) for entry in load_registry().values()]
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry, ensure_ascii=False))
        return
    header = ("", "name", "format", "local copy", "size", "default policy", "source")
    rows = [("*" if e["default"] else "", e["name"], e["format"], e["local"], _size(e["bytes"]), e["policy"],
             e["source"]) for e in entries]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    click.echo("\n* the default (no --model). Policy: what m3 ask / m3 batch do without --tokens and "
               "--auto-scale (docs/confidence.md).")


def _describe(entry, default: bool) -> dict:
    """What ``m3 models`` shows of a registry entry."""
    from m3cli.matryoshka.policy import PolicySpec

    where, size = _local_copy(entry)
    grid = max(entry.scales) if entry.scales else None
    fallback = f"none: the full grid{f' ({grid})' if grid else ''}, fixed"
    try:
        policy = PolicySpec.from_mapping(entry.policy).over(None).flags() if entry.policy is not None else fallback
    except ValueError as exc:
        policy = f"invalid ({exc})"
    return {"name": entry.name, "default": default, "format": entry.format, "local": where, "bytes": size,
            "policy": policy,
            "source": entry.location, "description": entry.description}


def _local_copy(entry) -> tuple[str, int | None]:
    """Where this machine holds the model, and its size in bytes (None: no copy)."""
    from pathlib import Path

    if entry.local:
        path = Path(entry.location)
        return ("shipped", _bytes(path)) if path.exists() else ("missing", None)
    from m3cli.convert.original_cache import cached_conversions

    converted = cached_conversions(entry.location)
    if converted:
        return "converted (m3 cache)", _bytes(converted[0])
    from m3cli.models.hub import cached_snapshot, has_weights

    snapshot = cached_snapshot(entry.location)
    if snapshot is not None and has_weights(snapshot):
        return "Hugging Face cache", _bytes(snapshot)
    return "not downloaded", None


def _bytes(path) -> int:
    """Bytes of a file or of every file under a folder (symlinks into a cache followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            continue
    return total


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
