"""m3 train on a tiny config: every stage runs, checkpoints resume, and the result loads and answers."""

import json

import pytest
import torch
from click.testing import CliRunner

from m3cli.backends.torch import TorchBackend
from m3cli.cli import cli
from m3cli.train.config import ConfigError, load_config
from m3cli.train.packing import IGNORE, IMAGE_SLOT, block_mask, pack, pad_batch
from m3cli.train.trainer import Progress, Trainer

TINY = """
name: tiny
seed: 3
model: {vision_hidden: 32, vision_layers: 2, vision_heads: 2, text_hidden: 32, text_layers: 1,
        text_heads: 2, text_kv_heads: 2, text_intermediate: 64}
pool_images: 16
checkpoint_every: 1
stages:
  vision: {kind: vision, steps: 2, batch: 4, lr: 0.001}
  vqa: {kind: vqa, steps: 3, batch: 4, lr: 0.001, scales: [144], align_weight: 1.0}
  m3: {kind: m3, steps: 2, batch: 4, lr: 0.001, scales: [576, 144, 36, 9, 1]}
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_pack_layout_and_labels():
    p = pack([0, 5], 3, [([7, 8], [20, 1]), ([9], [21, 1])])
    assert p.ids == [0, 5, IMAGE_SLOT, IMAGE_SLOT, IMAGE_SLOT, 7, 8, 20, 1, 9, 21, 1]
    # the last question token predicts the first answer token; EOS is predicted too
    assert p.labels == [IGNORE] * 6 + [20, 1, IGNORE, 21, 1, IGNORE]
    assert p.positions == [0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7]
    assert p.segments == [0] * 5 + [1] * 4 + [2] * 3


def test_block_mask_isolates_questions():
    p = pack([0], 2, [([7], [20]), ([9], [21])])
    ids, labels, pos, segs = pad_batch([p, pack([0], 2, [([7], [20])])], pad_id=2)
    mask = block_mask(segs)[:, 0]
    assert mask.shape == (2, 7, 7)
    row_q2 = mask[0, 5]  # first token of question 2
    assert row_q2[:3].all() and not row_q2[3:5].any() and row_q2[5]
    assert not mask[0, 2, 3]  # causal: image cannot see the future
    assert mask[1, 6].tolist() == [False] * 6 + [True]  # padding sees itself only


def test_packed_loss_equals_separate_sequences(tiny_config, tmp_path):
    """The block mask + restarted positions make a packed question equal to its own prompt."""
    trainer = Trainer(load_config(tiny_config), tmp_path / "run")
    trainer.model.eval()
    trainer.ensure_features()
    torch.manual_seed(0)
    idx = [0]
    qas = trainer.pool_qas[0][:3]
    trainer.pool_qas[0] = qas
    packed = trainer.lm_losses(idx, [36])[36].item()
    total, count = 0.0, 0
    for qa in qas:
        trainer.pool_qas[0] = (qa,)
        n = len(trainer.answer_ids(qa.answer))
        total += trainer.lm_losses(idx, [36])[36].item() * n
        count += n
    assert packed == pytest.approx(total / count, rel=1e-4)


def test_train_all_stages_then_load_and_answer(tiny_config, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--config", str(tiny_config), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    final = out / "final"
    assert final.is_dir() and (final / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in log]
    assert stages == ["vision", "features", "vqa", "m3"]
    assert set(log[-1]["final_losses"]) == {"576", "144", "36", "9", "1"}
    assert "align" in log[2]["final_losses"]
    backend = TorchBackend(str(final), device="cpu")
    assert backend.grid_side == 24
    from m3cli.answering.core import ask_images
    from m3cli.data.scenes import render, sample
    from m3cli.matryoshka.policy import Fixed

    image = render(sample("test", 0).scene)
    for scale in backend.scales:
        r = ask_images(backend, [image], ["how many shapes are there?"], [Fixed(scale)], max_new_tokens=3)[0]
        assert r.tokens == scale and isinstance(r.answer, str)


def test_resume_continues_mid_stage(tiny_config, tmp_path):
    out = tmp_path / "run"
    config = load_config(tiny_config)

    def stop_at(stage, step, total, losses):
        if stage == "vqa" and step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, out, progress=Progress(stop_at)).run()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["stage"] == "vqa" and state["step"] == 1 and state["done"] == ["vision"]
    with pytest.raises(Exception, match="--resume"):
        Trainer(config, out).run()
    Trainer(config, out).run(resume=True)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    vqa_rows = [r for r in log if r["stage"] == "vqa"]
    assert vqa_rows[-1]["steps"] == 2  # resumed at step 1 of 3
    assert [r["stage"] for r in log].count("vision") == 1  # the finished stage was not re-run
    assert (out / "final" / "model.safetensors").is_file()


def test_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  x: {kind: vqa, steps: 1, scales: [100]}\n")
    with pytest.raises(ConfigError, match="not nested scales"):
        load_config(bad)
    bad.write_text("stages:\n  x: {kind: dance, steps: 1}\n")
    with pytest.raises(ConfigError, match="kind"):
        load_config(bad)
    res = CliRunner().invoke(cli, ["train", "--config", str(bad)])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_device_option(tiny_config, tmp_path, monkeypatch):
    """--device cpu is today's deterministic run (same weights as the default); an absent CUDA is one line."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        out = tmp_path / name
        res = CliRunner().invoke(cli, ["train", "--config", str(tiny_config), "--out", str(out), "--no-progress",
                                       "--stages", "vision", *extra])
        assert res.exit_code == 0, res.output
        runs[name] = load_file(out / "final" / "model.safetensors")
    assert runs["default"].keys() == runs["cpu"].keys()
    assert all(torch.equal(runs["default"][k], runs["cpu"][k]) for k in runs["cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(cli, ["train", "--config", str(tiny_config), "--out", str(tmp_path / "gpu"),
                                   "--device", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "gpu" / "checkpoint.pt").exists()
