"""``m3 train``: the staged M3 training recipe, with progress per stage."""

from __future__ import annotations

from pathlib import Path

import click

from m3cli.cli.app import command
from m3cli.cli.options import DEVICE, THREADS


@command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Training YAML, e.g. models/m3-shapes.yaml.")
@click.option("-o", "--out", default=None, help="Run directory (default: runs/<config name>).")
@click.option("--resume", is_flag=True, help="Continue from the run directory's last checkpoint.")
@click.option("--init", "init_from", default=None, type=click.Path(file_okay=False),
              help="Start from a saved model directory instead of random weights.")
@click.option("--stages", default=None, help="Run only these stages, e.g. m3 (default: all in the config).")
@click.option("--threads", type=THREADS, default=None, help="CPU threads for torch.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="Where to train: cpu, cuda, cuda:N, or auto (cuda when there is one). CPU runs are "
                   "deterministic; a GPU run is fast, not bit-reproducible.")
@click.option("--progress/--no-progress", default=None,
              help="Progress on stderr, per stage with the latest losses (default: a bar on a terminal, else a "
                   "line every $M3_PROGRESS_SECONDS seconds, 30; --progress: the bar anyway).")
def train(config_path, out, resume, init_from, stages, threads, device, progress):
    """Train an M3 model with the staged recipe (vision, full-scale VQA, M3 nested loss).

    \b
    Example:
      m3 train --config models/m3-shapes.yaml --out runs/m3-shapes
      m3 train --config models/m3-shapes.yaml --out runs/m3-shapes --resume
    """
    from m3cli.backends.torch import pick_device
    from m3cli.train.config import load_config
    from m3cli.train.trainer import Progress, Trainer

    config = load_config(config_path)
    if threads:
        config.threads = threads
    run_dir = Path(out or Path("runs") / config.name)
    from m3cli.output import check_output_dir

    check_output_dir(run_dir, "--out")  # a folder that takes files, checked before the model is built
    bar = _TrainBar(progress)
    picked = pick_device(device)
    if picked == "mps":
        if device != "auto":
            raise click.UsageError("--device mps: m3 train runs on cpu or cuda")
        picked = "cpu"
    trainer = Trainer(config, run_dir, init=Path(init_from) if init_from else None, progress=Progress(bar.update),
                      device=picked)
    try:
        final = trainer.run(resume=resume, only=stages.split(",") if stages else None)
    finally:
        bar.close()
    click.echo(str(final))


class _TrainBar:
    """Progress per stage (:mod:`m3cli.output.progress`), with the latest per-scale losses beside the count."""

    def __init__(self, flag: bool | None):
        self.flag = flag
        self.bar = None
        self.stage = None

    def update(self, stage: str, step: int, total: int, losses: dict[str, float]) -> None:
        from m3cli.output.progress import Progress

        text = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = Progress(f"m3 train: {stage}", total=total, unit="step", mode=self.flag, initial=step - 1)
        self.bar.update(1, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
