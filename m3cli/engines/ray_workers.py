"""The code ``--engine ray`` runs on the cluster: the decode task and the answering actor.

Both reuse :mod:`m3cli.engines.units`, so a row computed here equals the local engine's. Inputs cross the
process boundary as plain data (:func:`encode_item`); a model that cannot load crosses back as a marked
message (:func:`setup_message` reads it on the driver).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from m3cli.answering.encode_cache import EncodeCache
from m3cli.engines.units import (
    AllDone,
    BatchOptions,
    Sampling,
    Unit,
    answer_units,
    decode_input,
    question_count,
    unit_questions,
)
from m3cli.errors import one_line
from m3cli.fileio import json_default
from m3cli.media import BadInput, ImageOptions, Item
from m3cli.media.inputs import question_ids

SETUP_MARK = "m3-ray-setup:"


class SetupFailed(RuntimeError):
    """Raised by an actor whose model could not be loaded (crosses the process boundary as a message)."""


def encode_item(item: Item | BadInput) -> dict[str, Any]:
    """An input as plain data, to cross to the cluster."""
    if isinstance(item, BadInput):
        return {"bad": True, **asdict(item)}
    return {"bad": False, **asdict(item)}


def decode_item(data: dict[str, Any]) -> Item | BadInput:
    """The inverse of :func:`encode_item`."""
    fields = {k: v for k, v in data.items() if k != "bad"}
    return BadInput(**fields) if data["bad"] else Item(**fields)


def dumps_meta(data: Any) -> str:
    """JSON for a record's metadata. ASCII-only: a file name that is not valid UTF-8 holds lone surrogates,
    which Arrow cannot store as text; escaped, they cross and come back as they were."""
    return json.dumps(data, ensure_ascii=True)


def decode_task(row: dict[str, Any], sampling: Sampling, n_questions: int = 1,
                image_options: ImageOptions | None = None) -> list[dict]:
    """Decode task: one input -> its pictures as records ``{i, j, meta, image}`` (image: uint8 HxWx3).

    ``meta`` says which of the picture's rows (one per question, ``n_questions`` for an item without its
    own) a resumed run has done; the actor answers the others.
    """
    import numpy as np

    index = int(row["i"])
    desc = json.loads(row["d"])
    item = decode_item(desc["item"])
    # the driver ships the done rows of this input (none when it skipped it outright)
    done = set(desc.get("done", ()))
    n = question_count(item, n_questions)
    empty = np.zeros((0, 0, 3), dtype=np.uint8)
    out: list[dict] = []
    for dec in decode_input(item, done if n == 1 else AllDone(done, n), sampling, image=image_options):
        meta = {"item": encode_item(dec.item), "error": dec.error, "skip": dec.skip,
                "done": [r for r in question_ids(dec.item.id, n) if r in done],
                "key": None if dec.key is None else list(dec.key), "frames": dec.frames, "pixels": dec.pixels}
        pixels = empty if dec.image is None else np.ascontiguousarray(np.asarray(dec.image, dtype=np.uint8))
        out.append({"i": index, "j": len(out), "meta": dumps_meta(meta), "image": pixels})
    return out


class Answerer:
    """Answering actor: loads the backend once, then answers each batch with ``units.answer_units``."""

    def __init__(self, model_kw: dict[str, Any], opts: BatchOptions, threads: int | None):
        try:
            from m3cli.backends import open_backend

            options = dict(model_kw)
            options["backend"] = options.get("backend") or "auto"
            if threads and not options.get("threads"):
                options["threads"] = threads
            self.backend = open_backend(**options, verbose=False)  # llama.cpp's own logs stay out of the workers
            policy = opts.run_policy
            if policy.auto_scale:
                from m3cli.matryoshka.policy import make_ladder

                make_ladder(self.backend.grid_side, policy.ladder, policy.tokens)  # a bad ladder fails up front
        except Exception as exc:  # noqa: BLE001 - reported on the driver as one line
            raise SetupFailed(f"{SETUP_MARK}{one_line(exc) or type(exc).__name__}") from None
        self.opts = opts
        self.cache = EncodeCache(opts.encode_cache)  # this actor's: questions in a later batch reuse it
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One record per picture in, one row per (picture, question) out: ``j`` becomes
        ``j * questions + q``, so a picture's rows stay in order among its input's."""
        import numpy as np
        from PIL import Image

        width = len(self.opts.run_questions)
        out_i: list[int] = []
        out_j: list[int] = []
        ids: list[str] = []
        skips: list[bool] = []
        units: list[Unit] = []
        for k in range(len(batch["i"])):
            meta = json.loads(batch["meta"][k])
            item = decode_item(meta["item"])
            done = set(meta.get("done") or ())
            image = None
            if meta["error"] is None and not meta["skip"]:
                image = Image.fromarray(np.asarray(batch["image"][k], dtype=np.uint8), "RGB")
            key = tuple(meta["key"]) if meta.get("key") is not None else None
            for q, (row_id, question) in enumerate(unit_questions(item, self.opts)):
                skip = bool(meta["skip"]) or row_id in done
                out_i.append(int(batch["i"][k]))
                out_j.append(int(batch["j"][k]) * width + q)
                ids.append(row_id)
                skips.append(skip)
                if not skip:
                    units.append(Unit(len(ids) - 1, item, image=image, error=meta["error"], id=row_id,
                                      question=question, key=key, frames=meta.get("frames"),
                                      pixels=meta.get("pixels")))
        rows: list[str] = [""] * len(ids)
        for seq, row in answer_units(self.backend, units, self.opts, self.cache):
            rows[seq] = json.dumps(row, ensure_ascii=False, default=json_default)
        return {
            "i": np.asarray(out_i, dtype=np.int64),
            "j": np.asarray(out_j, dtype=np.int64),
            "id": np.array(ids, dtype=object),
            "skip": np.array(skips, dtype=bool),
            "row": np.array(rows, dtype=object),
            "pid": np.full(len(ids), self.pid, dtype=np.int64),
            "grid": np.full(len(ids), self.backend.grid_side, dtype=np.int64),
        }


def setup_message(exc: BaseException) -> str | None:
    """The model-setup failure message carried by ``exc`` (or its causes), if that is what it is."""
    text = str(exc)
    probe: BaseException | None = exc
    for _ in range(10):
        if probe is None:
            break
        text += "\n" + str(probe)
        probe = getattr(probe, "cause", None) or probe.__cause__
    if SETUP_MARK not in text:
        return None
    message = text.split(SETUP_MARK, 1)[1].splitlines()[0].strip()
    return message.rstrip("')\"") or "model could not be loaded"
