"""``m3 convert``: original LLaVA -> HF, HF -> GGUF, and legacy mmproj repair."""

from __future__ import annotations

from pathlib import Path

import click

from m3cli.cli.app import command
from m3cli.errors import ConvertError

CONVERT_EXAMPLE = """
\b
Examples:
  m3 convert ~/ckpt/llava-v1.5-7b-m3 --to hf ~/models/llava-v1.5-7b-m3-hf
  m3 convert mucai/llava-v1.5-7b-m3 --to hf ~/models/llava-v1.5-7b-m3-hf
  m3 convert models/m3-shapes --to gguf ~/models/m3-shapes-gguf --outtype q8_0
  m3 convert --fix-mmproj mmproj-model-f16.gguf ~/models/fixed
"""


@command(epilog=CONVERT_EXAMPLE)
@click.argument("src")
@click.argument("out")
@click.option("--to", "target", type=click.Choice(["hf", "gguf"]), default=None,
              help="hf: original-LLaVA checkpoint (directory, hub id or registry name) -> transformers layout that "
                   "keeps its recipe; gguf: HF LLaVA-1.5 (or an original one, through its cached conversion) -> "
                   "LM + mmproj GGUF.")
@click.option("--fix-mmproj", is_flag=True, help="Rewrite a legacy llama.cpp LLaVA mmproj (SRC) into OUT dir.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
              help="gguf: weight type of the language model (the mmproj stays f32, or f16 with f16).")
@click.option("--vision-tower", type=click.Path(file_okay=False), default=None,
              help="hf/gguf: local CLIP directory when the checkpoint does not carry its tower and its mm_vision_tower "
                   "is not in the local Hugging Face cache (default: $M3_VISION_TOWER).")
@click.option("--dtype", default="auto", show_default=True, help="hf: auto (keep), float32, float16 or bfloat16.")
def convert(src, out, target, fix_mmproj, outtype, vision_tower, dtype):
    """Convert models: SRC --to hf OUT, SRC --to gguf OUT_DIR, or --fix-mmproj IN OUT_DIR.

    OUT is checked before any work (not inside SRC; creatable and writable; for --to hf a new or empty
    folder, which appears whole when the conversion is done) and follows the umask. Exit code 0: written;
    1: the disk filled or a write failed part-way (nothing half written is left); 2: bad usage, model or
    output, before any work.
    """
    if fix_mmproj == (target is not None):
        raise click.UsageError("give exactly one of --to hf|gguf or --fix-mmproj")
    from m3cli.output import check_output_dir

    check_output_dir(out, "output", empty=target == "hf", inputs=[src])  # OutputError: one line, exit 2
    try:
        if fix_mmproj:
            from m3cli.errors import describe
            from m3cli.gguf.mmproj import fix_mmproj as fix
            from m3cli.output import OutputWriteError

            try:
                click.echo(str(fix(src, out)))
            except OSError as exc:  # each file is written atomically: none is left half written
                raise OutputWriteError(f"{out}: cannot write the fixed mmproj ({describe(exc)})") from None
        elif target == "hf":
            from m3cli.backends.locate import vision_tower_option
            from m3cli.convert.original_llava import convert_original_to_hf

            src_dir, label = _original_source(src)
            tower = vision_tower_option(vision_tower)
            click.echo(str(convert_original_to_hf(src_dir, out, dtype=dtype, vision_tower=tower, source=label)))
        else:
            click.echo("\n".join(map(str, _to_gguf(src, out, outtype, vision_tower))))
    except ConvertError as exc:  # shown as a usage error of this command, as click shows its own
        raise click.UsageError(str(exc)) from None


def _original_source(src: str) -> tuple[str, str]:
    """SRC for --to hf: a directory as it is; a registry name or hub id from the local cache (or downloaded)."""
    if Path(src).exists():
        return src, src
    from m3cli.models import hub
    from m3cli.models.registry import resolve_model

    resolved = resolve_model(src)
    if Path(resolved).exists() or not hub.looks_like_hub_id(resolved):
        return resolved, resolved
    from m3cli.families import detect_family

    meta = hub.fetch(resolved, what="checkpoint", weights=False)
    if detect_family(meta).layout != "original":  # refused before the weights download
        raise ConvertError(f"{resolved}: already a Hugging Face model; load it directly")
    return str(hub.fetch(resolved, what="checkpoint")), resolved


def _to_gguf(src: str, out: str, outtype: str, vision_tower: str | None = None):
    """SRC (a directory, or a registry name) -> (language-model GGUF, mmproj GGUF) in OUT.

    An original-layout checkpoint goes through its cached transformers conversion first (made once, as every
    loading command makes it), so its recipe (pad, ``vicuna_v1``) reaches the GGUF's ``m3cli.*`` keys.
    """
    from m3cli.models.registry import resolve_model

    try:
        from m3cli.convert.gguf_writer import convert_to_gguf
    except ImportError as exc:
        raise click.UsageError(f"--to gguf needs the gguf extra: pip install 'm3cli[gguf]' ({exc})") from None
    from m3cli.families.detect import is_original_checkpoint

    path = resolve_model(src) if not Path(src).exists() else src
    if is_original_checkpoint(path):
        from m3cli.backends.locate import locate_model

        path = str(locate_model(str(path), vision_tower=vision_tower).path)
    return convert_to_gguf(path, out, outtype)
