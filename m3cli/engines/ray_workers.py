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

from m3cli.engines.units import BatchOptions, Unit, answer_units, decode_input
from m3cli.errors import one_line
from m3cli.fileio import json_default
from m3cli.media import BadInput, Item

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


def decode_task(row: dict[str, Any], fps: float | None, every: int | None, max_frames: int | None) -> list[dict]:
    """Decode task: one input -> its units as records ``{i, j, meta, image}`` (image: uint8 HxWx3)."""
    import numpy as np

    index = int(row["i"])
    desc = json.loads(row["d"])
    item = decode_item(desc["item"])
    # the driver ships no input a resumed run has done, except a video: its done frames and its own row
    done = set(desc.get("done_frames", ())) | ({item.id} if desc.get("done") else set())
    empty = np.zeros((0, 0, 3), dtype=np.uint8)
    out: list[dict] = []
    for unit_item, image, error, skip in decode_input(item, done, fps, every, max_frames):
        meta = {"item": encode_item(unit_item), "error": error, "skip": skip}
        pixels = empty if image is None else np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        out.append({"i": index, "j": len(out), "meta": json.dumps(meta, ensure_ascii=False), "image": pixels})
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
            if opts.auto_scale:
                from m3cli.policy import make_ladder

                make_ladder(self.backend.grid_side, opts.ladder, opts.tokens)  # a bad ladder fails up front
        except Exception as exc:  # noqa: BLE001 - reported on the driver as one line
            raise SetupFailed(f"{SETUP_MARK}{one_line(exc) or type(exc).__name__}") from None
        self.opts = opts
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        n = len(batch["i"])
        ids: list[str] = []
        skips: list[bool] = []
        rows: list[str] = [""] * n
        units: list[Unit] = []
        for k in range(n):
            meta = json.loads(batch["meta"][k])
            item = decode_item(meta["item"])
            ids.append(item.id)
            skips.append(bool(meta["skip"]))
            if meta["skip"]:
                continue
            image = None
            if meta["error"] is None:
                image = Image.fromarray(np.asarray(batch["image"][k], dtype=np.uint8), "RGB")
            units.append(Unit(k, item, image=image, error=meta["error"]))
        for k, row in answer_units(self.backend, units, self.opts):
            rows[k] = json.dumps(row, ensure_ascii=False, default=json_default)
        return {
            "i": np.asarray(batch["i"]),
            "j": np.asarray(batch["j"]),
            "id": np.array(ids, dtype=object),
            "skip": np.array(skips, dtype=bool),
            "row": np.array(rows, dtype=object),
            "pid": np.full(n, self.pid, dtype=np.int64),
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
