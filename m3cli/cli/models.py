"""``m3 models``: the registry, one model per line."""

from __future__ import annotations

import click

from m3cli.cli.app import command


@command("models")
def list_models():
    """List the models in the registry (models/registry.yaml)."""
    from m3cli.models.registry import load_registry

    for entry in load_registry().values():
        click.echo(f"{entry.name}\t{entry.format}\t{entry.location}\t{entry.description}")
