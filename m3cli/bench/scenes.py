"""What every benchmark runs on: the generated test-split scenes and one question about them."""

from __future__ import annotations

from pathlib import Path

BENCH_QUESTION = "what colour is the background?"


def scene_files(directory: str | Path, n: int) -> list[str]:
    """Write ``n`` test-split scenes as PNG files (the same set on every machine)."""
    from m3cli.data.scenes import render, sample

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"scene-{i:05d}.png"
        if not path.exists():
            render(sample("test", i).scene).save(path)
        paths.append(str(path))
    return paths


def bench_image(path: str | None = None):
    """The image to time: a file, or the first test-split scene (always available)."""
    if path:
        from m3cli.media import load_image

        return load_image(path)
    from m3cli.data.scenes import render, sample

    return render(sample("test", 0).scene)
