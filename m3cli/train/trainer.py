"""``m3 train``: the staged recipe that builds an M3 model from scratch on synthetic scenes.

Stages (see docs/training.md): ``vision`` trains the CLIP tower on dense per-patch labels,
``vqa`` trains projector + LM at the full grid (tower frozen, its features cached once), and
``m3`` fine-tunes with the language-model loss averaged over every nested scale.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m3cli.data import drawings, phrasings, scenes
from m3cli.errors import UsageError
from m3cli.matryoshka.scales import pool
from m3cli.models.build import ModelSpec, build_model, build_processor, build_tokenizer, save_bundle
from m3cli.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from m3cli.train.config import StageConfig, TrainConfig
from m3cli.train.packing import IGNORE, IMAGE_SLOT, block_mask, pack, pad_batch

log = logging.getLogger(__name__)

HEADS = {
    "kind": len(scenes.LABEL_NAMES["kind"]),
    "colour": len(scenes.LABEL_NAMES["colour"]),
    "size": len(scenes.LABEL_NAMES["size"]),
    "glyph": len(scenes.LABEL_NAMES["glyph"]),
    "background": len(scenes.BACKGROUND_NAMES) + 1,
}


class TrainError(UsageError, RuntimeError):
    """A training run that cannot start or continue (an occupied run directory, an unknown stage)."""


@dataclass
class Progress:
    """What the CLI shows: called after every step with the stage, step, total and named losses."""

    callback: Callable[[str, int, int, dict[str, float]], None] | None = None

    def __call__(self, stage: str, step: int, total: int, losses: dict[str, float]) -> None:
        if self.callback:
            self.callback(stage, step, total, losses)


def to_pixels(images, spec: ModelSpec) -> torch.Tensor:
    """Normalise 48x48 RGB scenes exactly as the saved CLIP image processor does."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    return torch.from_numpy(((arr - mean) / std).transpose(0, 3, 1, 2).copy())


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Linear warm-up then cosine decay to 10% of ``base``."""
    warm = max(1, int(total * warmup))
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer_step(opt, params, loss, lr: float) -> None:
    """One AdamW step at ``lr`` with gradients clipped to norm 1."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def resolve_init(value: str | Path | None) -> Path | None:
    """The model directory to start from: a directory, else a registry name (``m3-shapes``: the shipped one)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        return path
    from m3cli.models.registry import load_registry

    entry = load_registry().get(str(value))
    if entry is not None and Path(entry.location).is_dir():
        return Path(entry.location)
    raise TrainError(f"--init {value}: not a model directory or a registered local model")


def check_sizes(model_config, spec: ModelSpec, source: Path) -> None:
    """Refuse a starting model whose sizes differ from the config's ``model`` section (one line)."""
    vision, text = model_config.vision_config, model_config.text_config
    pairs = {
        "image_size": vision.image_size, "patch_size": vision.patch_size, "vision_hidden": vision.hidden_size,
        "vision_layers": vision.num_hidden_layers, "vision_heads": vision.num_attention_heads,
        "text_hidden": text.hidden_size, "text_layers": text.num_hidden_layers,
        "text_heads": text.num_attention_heads, "text_kv_heads": text.num_key_value_heads,
        "text_intermediate": text.intermediate_size,
    }
    wrong = [f"{k} {v} (config: {getattr(spec, k)})" for k, v in pairs.items() if v != getattr(spec, k)]
    if wrong:
        raise TrainError(f"--init {source}: its sizes differ from the config's model section: {', '.join(wrong)}")


class Trainer:
    """Runs the configured stages, checkpointing so that ``--resume`` continues where it stopped."""

    def __init__(self, config: TrainConfig, out: Path, init: Path | None = None, progress: Progress | None = None,
                 device: str = "cpu"):
        self.config = config
        # every tensor of a step lives here (CUDA: the tower features too, 2.4 GB for the 8,000-scene pool)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True   # fp32 weights, TF32 matmuls: minutes on a GPU
            torch.backends.cudnn.allow_tf32 = True
        self.out = Path(out)
        self.progress = progress or Progress()
        self.spec = config.model
        if config.threads:
            torch.set_num_threads(int(config.threads))
        torch.manual_seed(config.seed)
        init = resolve_init(init if init is not None else config.init)
        if init is not None:
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            self.processor = AutoProcessor.from_pretrained(init)
            self.tokenizer = self.processor.tokenizer
            self.model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
            check_sizes(self.model.config, self.spec, init)
        else:
            words = scenes.vocabulary()
            captions = [scenes.caption(scenes.sample("train", i).scene) for i in range(200)]
            self.tokenizer = build_tokenizer(words, captions)
            self.processor = build_processor(self.spec, self.tokenizer)
            self.model = build_model(self.spec, self.tokenizer, seed=config.seed)
        self.model.train()
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id
        image_id = self.model.config.image_token_id
        template = self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{Q}"}]}],
            add_generation_prompt=True, tokenize=False,
        )
        before, after = template.split("{Q}")
        ids = self.tokenizer(before + "QUESTION" + after).input_ids
        self.prefix = ids[: ids.index(image_id)]
        self._before_q = before.split(self.processor.image_token, 1)[1]
        self._after_q = after
        self._q_cache: dict[str, list[int]] = {}
        self._a_cache: dict[str, list[int]] = {}
        self.heads = torch.nn.ModuleDict(
            {k: torch.nn.Linear(self.spec.vision_hidden, n) for k, n in HEADS.items()}
        )
        self.model.to(self.device)
        self.heads.to(self.device)
        self.features: torch.Tensor | None = None
        self.pool_labels: dict[str, np.ndarray] = {}
        self.log_path = self.out / "train_log.jsonl"

    # -- token helpers -------------------------------------------------------------------
    def question_ids(self, question: str) -> list[int]:
        ids = self._q_cache.get(question)
        if ids is None:
            ids = self.tokenizer(self._before_q + question + self._after_q, add_special_tokens=False).input_ids
            self._q_cache[question] = ids
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._a_cache.get(answer)
        if ids is None:
            ids = self.tokenizer(" " + answer, add_special_tokens=False).input_ids + [self.eos]
            self._a_cache[answer] = ids
        return ids

    def word_id(self, word: str) -> int:
        ids = self.tokenizer(" " + word, add_special_tokens=False).input_ids
        return ids[0]

    # -- state (m3cli.train.checkpoint: weights_only loading) ------------------------------
    def save_checkpoint(self, state: dict) -> None:
        save_checkpoint(self.out, state)

    def load_checkpoint(self) -> dict | None:
        state = load_checkpoint(self.out)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.heads.load_state_dict(state["heads"])
        return state

    def record(self, **fields) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(fields) + "\n")

    # -- run -----------------------------------------------------------------------------
    def run(self, resume: bool = False, only: list[str] | None = None) -> Path:
        """Run every stage (or ``only`` these), skipping those a resumed checkpoint finished."""
        state = self.load_checkpoint() if resume else None
        if resume and state is None:
            log.warning("no checkpoint in %s: starting from the beginning", self.out)
        if not resume and (self.out / CHECKPOINT).exists():
            raise TrainError(f"{self.out} already holds a run; pass --resume or choose another --out")
        self.done = list(state["done"]) if state else []
        names = [n for n in self.config.stages if only is None or n in only]
        unknown = [n for n in (only or []) if n not in self.config.stages]
        if unknown:
            raise TrainError(f"unknown stages {unknown}; the config has {list(self.config.stages)}")
        for name in names:
            if name in self.done:
                continue
            stage = self.config.stages[name]
            resume_state = state if state and state.get("stage") == name else None
            if stage.kind == "vision":
                self.train_vision(name, stage, resume_state)
            else:
                self.ensure_features()
                self.train_lm(name, stage, resume_state)
            self.done.append(name)
            self.save_checkpoint({"stage": None, "done": self.done, "model": self.model.state_dict(),
                                  "heads": self.heads.state_dict()})
            save_bundle(self.model, self.processor, self.out / name)
            state = None
        final = self.out / "final"
        save_bundle(self.model, self.processor, final)
        return final

    def _optimizer(self, params, stage: StageConfig, resume_state: dict | None):
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.01, betas=(0.9, 0.98))
        start = 0
        if resume_state is not None:
            opt.load_state_dict(resume_state["opt"])
            start = int(resume_state["step"])
        return opt, start

    def _step_rng(self, stage_name: str, step: int) -> np.random.Generator:
        key = sum(ord(c) * (i + 1) for i, c in enumerate(stage_name))
        return np.random.default_rng([self.config.seed, key, step])

    # -- stage 0: the vision tower on dense patch labels -------------------------------------
    def train_vision(self, name: str, stage: StageConfig, resume_state: dict | None) -> None:
        tower = self.model.model.vision_tower
        encoder = tower.encoder
        full_layers = encoder.layers
        # The LM reads hidden_states[-2]; train exactly the layers that feed it.
        encoder.layers = torch.nn.ModuleList(list(full_layers)[:-1])
        params = list(tower.parameters()) + list(self.heads.parameters())
        opt, start = self._optimizer(params, stage, resume_state)
        tower.train()
        t0, seen = time.perf_counter(), 0
        losses: dict[str, torch.Tensor] = {}
        try:
            for step in range(start, stage.steps):
                rng = self._step_rng(name, step)
                idx = rng.integers(0, 10_000_000, size=stage.batch)
                samples = [scenes.sample("train", int(i)) for i in idx]
                pixels = to_pixels([scenes.render(s.scene) for s in samples], self.spec).to(self.device)
                labels = [scenes.patch_labels(s.scene) for s in samples]
                hidden = tower(pixel_values=pixels).last_hidden_state[:, 1:]
                losses = {}
                for key, head in self.heads.items():
                    target = torch.from_numpy(np.stack([lab[key].reshape(-1) for lab in labels])).to(self.device)
                    logits = head(hidden)
                    weight = None
                    if key in ("kind", "glyph", "size", "colour"):
                        # objects cover few patches: weight them up against empty background
                        weight = torch.ones(HEADS[key], device=self.device)
                        weight[1:] = 4.0
                    losses[key] = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight=weight
                    )
                loss = sum(losses.values())
                _optimizer_step(opt, params, loss, lr_at(step, stage.steps, stage.lr, stage.warmup))
                seen += stage.batch
                self.progress(name, step + 1, stage.steps, {k: v.item() for k, v in losses.items()})
                if (step + 1) % self.config.checkpoint_every == 0 and step + 1 < stage.steps:
                    encoder.layers = full_layers
                    self.save_checkpoint(self._state(name, step + 1, opt))
                    encoder.layers = torch.nn.ModuleList(list(full_layers)[:-1])
        finally:
            encoder.layers = full_layers
        elapsed = time.perf_counter() - t0
        acc = self.vision_accuracy()
        self.record(stage=name, kind="vision", steps=stage.steps - start, seconds=round(elapsed, 1),
                    images_per_s=round(seen / max(elapsed, 1e-9), 1), final_losses={k: round(v.item(), 4)
                    for k, v in losses.items()}, patch_accuracy=acc)
        log.info("stage %s: %.0f s, patch accuracy %s", name, elapsed, acc)

    def _state(self, name: str, step: int, opt) -> dict:
        """A mid-stage checkpoint: ``--resume`` restarts stage ``name`` at ``step`` with this optimizer state."""
        return {"stage": name, "step": step, "done": list(self.done), "model": self.model.state_dict(),
                "heads": self.heads.state_dict(), "opt": opt.state_dict()}

    @torch.no_grad()
    def tower_features(self, images) -> torch.Tensor:
        """hidden_states[-2] without CLS: what the projector reads (``vision_feature_layer = -2``)."""
        tower = self.model.model.vision_tower
        out = tower(pixel_values=to_pixels(images, self.spec).to(self.device), output_hidden_states=True)
        return out.hidden_states[self.model.config.vision_feature_layer][:, 1:]

    @torch.no_grad()
    def vision_accuracy(self, n: int = 200) -> dict[str, float]:
        """Per-patch accuracy of the dense heads on validation scenes, on patches an object covers."""
        self.model.eval()
        samples = [scenes.sample("val", i) for i in range(n)]
        feats = self.tower_features([scenes.render(s.scene) for s in samples])
        labels = [scenes.patch_labels(s.scene) for s in samples]
        result = {}
        for key, head in self.heads.items():
            target = np.stack([lab[key].reshape(-1) for lab in labels])
            pred = head(feats).argmax(-1).cpu().numpy()
            keep = target > 0 if key != "background" else np.ones_like(target, dtype=bool)
            result[key] = round(float((pred[keep] == target[keep]).mean()), 4) if keep.any() else None
        self.model.train()
        return result

    # -- cached tower features for the LM stages ------------------------------------------
    def ensure_features(self) -> None:
        """Cache the frozen tower's features of the first ``pool_images`` train scenes, then of the first
        ``pool_drawings`` train drawings (resized to the tower's input as the model's image processor does)."""
        if self.features is not None:
            return
        t0 = time.perf_counter()
        self.model.eval()
        n, n_drawn = self.config.pool_images, self.config.pool_drawings
        chunks, labels = [], {k: [] for k in HEADS}
        pool_scenes = []
        for start in range(0, n + n_drawn, 64):
            batch = range(start, min(n + n_drawn, start + 64))
            items = [scenes.sample("train", i).scene if i < n else drawings.drawing("train", i - n) for i in batch]
            images = [scenes.render(x) if isinstance(x, scenes.Scene) else self.tower_input(drawings.render(x))
                      for x in items]
            chunks.append(self.tower_features(images))
            for x in items:
                scene = x if isinstance(x, scenes.Scene) else x.scene
                pool_scenes.append(scene)
                lab = drawings.drawing_labels(scene)
                for k in labels:
                    labels[k].append(lab[k].reshape(-1))
        self.features = torch.cat(chunks)
        self.pool_labels = {k: np.stack(v) for k, v in labels.items()}
        self.pool_qas = [scenes.all_questions(s) for s in pool_scenes]
        self.pool_descriptions = [scenes.description(s) for s in pool_scenes]
        self.model.train()
        self.record(stage="features", images=n, drawings=n_drawn, seconds=round(time.perf_counter() - t0, 1))

    def tower_input(self, image):
        """The 48 px bitmap the tower sees for a user-sized image: CLIP's resize and crop, as at inference."""
        from m3cli.families import ImageSpec, tower_image

        spec = ImageSpec(size=self.spec.image_size, mean=tuple(self.spec.image_mean), std=tuple(self.spec.image_std),
                         shortest_edge=self.spec.image_size)
        return tower_image(image, spec, "crop")

    def align_targets(self, idx: np.ndarray) -> torch.Tensor:
        """Multi-hot vocabulary targets per patch: the words that name what covers it."""
        vocab = self.model.config.text_config.vocab_size
        names = scenes.LABEL_NAMES
        word_of = {
            "colour": [None] + [self.word_id(w) for w in names["colour"][1:]],
            "kind": [None] + [self.word_id(w) for w in names["kind"][1:]],
            "size": [None] + [self.word_id(w) for w in names["size"][1:]],
            "glyph": [None] + [self.word_id(w.lower()) for w in names["glyph"][1:]],
            "background": [None] + [self.word_id(w) for w in scenes.BACKGROUND_NAMES],
        }
        target = torch.zeros(len(idx), self.features.shape[1], vocab, device=self.device)
        for key, table in word_of.items():
            lab = self.pool_labels[key][idx]
            if key == "background":
                lab = np.where(self.pool_labels["kind"][idx] == 0, lab, 0)
            for value, word in enumerate(table):
                if word is None:
                    continue
                b, p = np.nonzero(lab == value)
                target[torch.as_tensor(b, device=self.device), torch.as_tensor(p, device=self.device), word] = 1.0
        return target

    # -- stages 1 and 2: the LM loss at one or many scales ----------------------------------
    def step_questions(self, idx: np.ndarray, rng: np.random.Generator, describe_rate: float,
                       phrasing_rate: float = 0.0) -> list[list]:
        """Every packed question of each pooled image ``idx``: all its one-word questions and, with chance
        ``describe_rate``, one open question in a phrasing drawn from ``rng`` (answered by its description);
        then each question, with chance ``phrasing_rate``, in a training phrasing (``phrasings.TRAIN``)."""
        out = []
        for i in idx:
            qas = list(self.pool_qas[i])
            if describe_rate > 0 and rng.random() < describe_rate:
                qas.append(scenes.QA(scenes.DESCRIBE, scenes.describe_question(rng), self.pool_descriptions[i]))
            if phrasing_rate > 0:
                qas = [phrasings.rephrase(qa, rng) if rng.random() < phrasing_rate else qa for qa in qas]
            out.append(qas)
        return out

    def lm_losses(self, idx: np.ndarray, scales: list[int], qas: list[list] | None = None) -> dict[int, torch.Tensor]:
        """Language-model loss on the answer tokens at every scale, for the pooled images ``idx``
        (asked ``qas[k]`` about image ``idx[k]``; default: all its one-word questions)."""
        llava = self.model.model
        projected = llava.multi_modal_projector(self.features[torch.as_tensor(idx, device=self.device)])
        embed = llava.language_model.get_input_embeddings()
        if qas is None:
            qas = [self.pool_qas[i] for i in idx]
        segments = []
        for image_qas in qas:
            segments.append([(self.question_ids(qa.question), self.answer_ids(qa.answer)) for qa in image_qas])
        losses = {}
        for scale in scales:
            pooled = pool(projected, scale)
            packs = [pack(self.prefix, scale, segs) for segs in segments]
            ids, labels, positions, segs = pad_batch(packs, self.pad)
            ids_t = torch.tensor(ids, device=self.device)
            slot = ids_t == IMAGE_SLOT
            emb = embed(ids_t.clamp(min=0))
            emb = emb.masked_scatter(slot[..., None], pooled.reshape(-1, pooled.shape[-1]))
            hidden = llava.language_model(
                inputs_embeds=emb, attention_mask=block_mask(segs, device=self.device),
                position_ids=torch.tensor(positions, device=self.device)
            ).last_hidden_state
            labels_t = torch.tensor(labels, device=self.device)
            keep = labels_t != IGNORE
            logits = self.model.lm_head(hidden[keep])
            losses[scale] = F.cross_entropy(logits, labels_t[keep])
        return losses

    def align_loss(self, idx: np.ndarray) -> torch.Tensor:
        """Projected patches should score the words naming them above all others (tied embeddings)."""
        projected = self.model.model.multi_modal_projector(self.features[torch.as_tensor(idx, device=self.device)])
        logits = self.model.lm_head(projected)
        return F.binary_cross_entropy_with_logits(logits, self.align_targets(idx))

    def train_lm(self, name: str, stage: StageConfig, resume_state: dict | None) -> None:
        for p in self.model.model.vision_tower.parameters():
            p.requires_grad_(False)
        params = [p for n, p in self.model.named_parameters() if p.requires_grad]
        opt, start = self._optimizer(params, stage, resume_state)
        t0, seen = time.perf_counter(), 0
        n_pool = self.features.shape[0]
        shown: dict[str, float] = {}
        for step in range(start, stage.steps):
            rng = self._step_rng(name, step)
            idx = rng.choice(n_pool, size=stage.batch, replace=False)
            # drawn after the images, so a stage without describe questions or phrasings samples what it always did
            qas = self.step_questions(idx, rng, stage.describe_rate, stage.phrasing_rate)
            losses = self.lm_losses(idx, stage.scales, qas)
            loss = sum(losses.values()) / len(losses)
            shown = {str(s): v.item() for s, v in losses.items()}
            if stage.align_weight > 0:
                align = self.align_loss(idx)
                loss = loss + stage.align_weight * align
                shown["align"] = align.item()
            _optimizer_step(opt, params, loss, lr_at(step, stage.steps, stage.lr, stage.warmup))
            seen += stage.batch
            self.progress(name, step + 1, stage.steps, shown)
            if (step + 1) % self.config.checkpoint_every == 0 and step + 1 < stage.steps:
                self.save_checkpoint(self._state(name, step + 1, opt))
        elapsed = time.perf_counter() - t0
        self.record(stage=name, kind=stage.kind, scales=stage.scales, steps=stage.steps - start,
                    seconds=round(elapsed, 1), images_per_s=round(seen / max(elapsed, 1e-9), 2),
                    final_losses={k: round(v, 4) for k, v in shown.items()})
        for p in self.model.model.vision_tower.parameters():
            p.requires_grad_(True)
