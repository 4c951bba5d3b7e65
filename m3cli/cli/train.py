"""``m3 train``: the staged M3 training recipe, with a progress bar per stage."""

from __future__ import annotations

import sys
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
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a TTY).")
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
    bar = _TrainBar(sys.stderr.isatty() if progress is None else progress)
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
    """A tqdm bar per stage with the latest per-scale losses; a log line every 50 steps otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None

    def update(self, stage: str, step: int, total: int, losses: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
        if not self.enabled:
            if step % 50 == 0 or step == total:
                click.echo(f"m3 train: {stage} {step}/{total} {text}", err=True)
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, initial=step - 1, desc=stage, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
