"""``m3 batch --engine ray``: the same rows as the single-process runner, computed on a Ray cluster.

The driver enumerates the inputs (cheap descriptors) and numbers them; a Ray Data pipeline decodes them
in CPU tasks (videos expand into frames there) and answers them in a fixed pool of actors, each of which
loads the model once and runs :func:`m3cli.runner.answer_units` on every batch it is given. Results come
back to the driver in input order (``preserve_order``) and are written one by one through the caller's
:class:`~m3cli.output.OrderedWriter`, flushed per row, exactly as ``run_batch`` writes them, so
``--resume``, ``--shard`` and ``m3 merge`` work unchanged.

Ray is imported lazily, only here; it is the optional ``ray`` extra (``pip install 'm3cli[ray]'``).

Row numbering: input ``i`` yields rows ``(i, 0), (i, 1), ...`` (a video yields one per sampled frame, then
possibly an error row for the video). Because the pipeline preserves order, the driver walks the inputs
in order and turns those pairs into the writer's consecutive sequence numbers; inputs already done in a
resumed run (images, bad inputs) are skipped on the driver and never shipped to the cluster.

Fault tolerance: answering actors are restarted when their process dies (``max_restarts=-1``) and the
batch they were running is retried on the replacement (``max_task_retries``); decode tasks are retried
too. A run that still fails part-way raises :class:`EngineRunError` naming the inputs that have no row
yet; the rows written so far are flushed, so ``--resume`` completes the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from m3cli import logs
from m3cli.engines import EngineError, EngineRunError
from m3cli.engines.native_stderr import filter_native_stderr
from m3cli.media import BadInput, Item
from m3cli.output import OrderedWriter, Summary
from m3cli.runner import BatchOptions

log = logging.getLogger(__name__)

__all__ = ["EngineError", "EngineRunError", "connect", "import_ray", "preflight", "run_ray"]

RAY_EXTRA_HINT = "--engine ray needs the ray extra: pip install 'm3cli[ray]'"
DECODE_CPUS = 0.25  # logical CPUs per decode task: light work, and it must fit beside the actors
TASK_RETRIES = 3  # retries per answering batch, on top of actor restarts
_SETUP_MARK = "m3-ray-setup:"
_SHOW = 5


class _SetupFailed(RuntimeError):
    """Raised by an actor whose model could not be loaded (crosses the process boundary as a message)."""


# ------------------------------------------------------------------------------------- descriptors


@dataclass
class _Input:
    """One top-level input on the driver: its number, its id, and what the cluster needs (None: skipped)."""

    index: int
    id: str
    descriptor: str | None  # JSON for the decode task; None when the driver skips it (done in a resumed run)


def _encode_item(item: Item | BadInput) -> dict[str, Any]:
    if isinstance(item, BadInput):
        return {"bad": True, **asdict(item)}
    return {"bad": False, **asdict(item)}


def _decode_item(data: dict[str, Any]) -> Item | BadInput:
    fields = {k: v for k, v in data.items() if k != "bad"}
    return BadInput(**fields) if data["bad"] else Item(**fields)


def _plan(inputs: Iterable[Item | BadInput], opts: BatchOptions) -> list[_Input]:
    """Number the inputs; mark the ones a resumed run skips outright (like ``iter_units``: not videos)."""
    done_frames: dict[str, list[str]] = {}
    for ident in opts.done_ids:
        head, sep, tail = ident.rpartition("#")
        if sep and tail.isdigit():
            done_frames.setdefault(head, []).append(ident)
    plan = []
    for index, item in enumerate(inputs):
        video = isinstance(item, Item) and item.kind == "video"
        if not video and item.id in opts.done_ids:
            plan.append(_Input(index, item.id, None))
            continue
        desc: dict[str, Any] = {"item": _encode_item(item)}
        if video:
            desc["done_frames"] = sorted(done_frames.get(item.id, ()))
            desc["done"] = item.id in opts.done_ids  # the video's own (error) row
        plan.append(_Input(index, item.id, json.dumps(desc, ensure_ascii=False)))
    return plan


# ------------------------------------------------------------------------------- cluster-side code


def _decode(row: dict[str, Any], fps: float | None, every: int | None, max_frames: int | None) -> list[dict]:
    """Decode task: one input -> its units as records ``{i, j, meta, image}`` (image: uint8 HxWx3)."""
    import numpy as np

    from m3cli.media import MediaError, expand_video, load_image

    index = int(row["i"])
    desc = json.loads(row["d"])
    item = _decode_item(desc["item"])
    out: list[dict] = []
    empty = np.zeros((0, 0, 3), dtype=np.uint8)

    def unit(it: Item | BadInput, image=None, error: str | None = None, skip: bool = False) -> None:
        meta = {"item": _encode_item(it), "error": error, "skip": skip}
        pixels = empty if image is None else np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        out.append({"i": index, "j": len(out), "meta": json.dumps(meta, ensure_ascii=False), "image": pixels})

    # Mirrors runner.iter_units, one input at a time.
    if isinstance(item, BadInput):
        unit(item, error=item.error)
    elif item.kind == "video":
        done = set(desc.get("done_frames", ()))
        try:
            for frame_item, frame in expand_video(item, fps, every, max_frames):
                skip = frame_item.id in done
                unit(frame_item, None if skip else frame.image, skip=skip)
        except (MediaError, ValueError) as exc:
            unit(item, error=str(exc), skip=bool(desc.get("done")))
    else:
        try:
            unit(item, load_image(item.source))
        except MediaError as exc:
            unit(item, error=str(exc))
    return out


class _Answerer:
    """Answering actor: loads the backend once, then answers each batch with ``runner.answer_units``."""

    def __init__(self, model_kw: dict[str, Any], opts: BatchOptions, threads: int | None):
        try:
            from m3cli.backends import load_backend
            from m3cli.registry import resolve_model

            options = dict(model_kw)
            model = options.pop("model", None)
            backend = options.pop("backend", "auto") or "auto"
            if threads and not options.get("threads"):
                options["threads"] = threads
            path = resolve_model(model)
            if backend == "llamacpp" or (backend == "auto" and path.lower().endswith(".gguf")):
                options["verbose"] = False
            self.backend = load_backend(backend, path, **options)
            if opts.auto_scale:
                from m3cli.policy import make_ladder

                make_ladder(self.backend.grid_side, opts.ladder, opts.tokens)  # a bad ladder fails up front
        except Exception as exc:  # noqa: BLE001 - reported on the driver as one line
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise _SetupFailed(f"{_SETUP_MARK}{message}") from None
        self.opts = opts
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        from m3cli.runner import Unit, answer_units

        n = len(batch["i"])
        ids: list[str] = []
        skips: list[bool] = []
        rows: list[str] = [""] * n
        units: list[Unit] = []
        for k in range(n):
            meta = json.loads(batch["meta"][k])
            item = _decode_item(meta["item"])
            ids.append(item.id)
            skips.append(bool(meta["skip"]))
            if meta["skip"]:
                continue
            image = None
            if meta["error"] is None:
                image = Image.fromarray(np.asarray(batch["image"][k], dtype=np.uint8), "RGB")
            units.append(Unit(k, item, image=image, error=meta["error"]))
        for k, row in answer_units(self.backend, units, self.opts):
            rows[k] = json.dumps(row, ensure_ascii=False, default=_json_default)
        return {
            "i": np.asarray(batch["i"]),
            "j": np.asarray(batch["j"]),
            "id": np.array(ids, dtype=object),
            "skip": np.array(skips, dtype=bool),
            "row": np.array(rows, dtype=object),
            "pid": np.full(n, self.pid, dtype=np.int64),
        }


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# ------------------------------------------------------------------------------------------ driver


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EngineError(RAY_EXTRA_HINT) from None
    return ray


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (one line) when ``host:port`` refuses connections; ``auto``/``local`` are left to Ray."""
    target = address.strip()
    if target in ("auto", "local"):
        return
    for prefix in ("ray://", "http://", "https://"):
        if target.startswith(prefix):
            target = target[len(prefix):]
    target = target.split("/", 1)[0]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port: let ray.init judge it
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EngineError(
            f"no Ray cluster reachable at {address} ({reason}); start one with `ray start --head` "
            "or fix --ray-address"
        ) from None


def preflight(model_kw: dict[str, Any], ray_address: str | None) -> None:
    """Cheap checks the CLI runs before it opens the output: Ray installed, the address answers, the model
    name resolves. Raises :class:`EngineError` (one line); starts nothing."""
    import_ray()
    if ray_address:
        _check_reachable(ray_address)
    from m3cli.registry import RegistryError, resolve_model

    try:
        resolve_model(model_kw.get("model"))
    except RegistryError as exc:
        raise EngineError(str(exc)) from None


def _one_line(exc: BaseException) -> str:
    """A short line for an exception from Ray: the innermost cause's type and first line."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines and lines[0].startswith("ray::") else (lines[0] if lines else "")
    name = type(exc).__name__
    return f"{name}: {text}" if text and not text.startswith(name) else (text or name)


def _setup_message(exc: BaseException) -> str | None:
    """The model-setup failure message carried by ``exc`` (or its causes), if that is what it is."""
    text = str(exc)
    probe: BaseException | None = exc
    for _ in range(10):
        if probe is None:
            break
        text += "\n" + str(probe)
        probe = getattr(probe, "cause", None) or probe.__cause__
    if _SETUP_MARK not in text:
        return None
    message = text.split(_SETUP_MARK, 1)[1].splitlines()[0].strip()
    return message.rstrip("')\"") or "model could not be loaded"


def connect(ray, ray_address: str | None) -> bool:
    """Start or join a cluster; returns True when this call started the connection (and must end it)."""
    if ray_address:
        _check_reachable(ray_address)
    if ray.is_initialized():
        return False  # the caller (e.g. a test or a notebook) owns the connection
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = dict(
        include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True
    )
    local = ray_address in (None, "", "local") and not os.environ.get("RAY_ADDRESS")
    if local:
        kwargs["num_cpus"] = os.cpu_count() or 1
    try:
        ray.init(address=ray_address or None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any start/connect failure is one user-facing line
        where = f"at {ray_address}" if ray_address else "locally"
        raise EngineError(f"cannot start or join a Ray cluster {where}: {_one_line(exc)}") from None
    return True


def _quiet_ray_logs() -> None:
    if logs.verbosity() < 1:
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _sizes(ray, actors: int, gpus_per_actor: float) -> tuple[float, int | None]:
    """Logical CPUs per answering actor, and torch threads for CPU inference (None: leave as is)."""
    resources = ray.cluster_resources()
    total_cpu = float(resources.get("CPU", 0))
    if gpus_per_actor:
        total_gpu = float(resources.get("GPU", 0))
        if total_gpu + 1e-9 < actors * gpus_per_actor:
            raise EngineError(
                f"--actors {actors} x --gpus-per-actor {gpus_per_actor:g} needs {actors * gpus_per_actor:g} GPUs; "
                f"the cluster has {total_gpu:g}"
            )
    if total_cpu <= DECODE_CPUS:
        raise EngineError(f"the Ray cluster has {total_cpu:g} CPUs; at least 1 is needed")
    # At most one logical CPU per actor, and always room for a decode task beside the actors, so a
    # small cluster (e.g. 2 CPUs, 2 actors) never starves the decoders.
    actor_cpus = min(1.0, (total_cpu - DECODE_CPUS) / actors)
    threads = None if gpus_per_actor else max(1, (os.cpu_count() or 1) // actors)
    return round(actor_cpus, 4), threads


def run_ray(
    model_kw: dict[str, Any],
    inputs: Iterable[Item | BadInput],
    opts: BatchOptions,
    writer: OrderedWriter,
    summary: Summary,
    ray_address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    on_row: Callable[[dict], None] | None = None,
) -> None:
    """Answer every input on a Ray cluster and write its row in input order; see the module docstring.

    Raises :class:`EngineError` before any work (Ray missing, cluster unreachable, model unusable),
    :class:`EngineRunError` when the pipeline fails part-way (rows written so far stay), and
    KeyboardInterrupt on Ctrl-C after the rows already received are written. Shuts Ray down when it
    started the connection; an already initialised Ray (``ray.is_initialized()``) is used and left running.
    """
    if actors < 1:
        raise EngineError(f"--actors must be >= 1, got {actors}")
    if gpus_per_actor < 0:
        raise EngineError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
    ray = import_ray()
    with _guard_stdout():
        owned = connect(ray, ray_address)
        try:
            _quiet_ray_logs()
            actor_cpus, threads = _sizes(ray, actors, gpus_per_actor)
            plan = _plan(inputs, opts)
            # Ray's C++ core writes warnings straight to fd 2 (e.g. about actor restarts); -v shows them
            with filter_native_stderr(enabled=logs.verbosity() < 1):
                _drive(ray, plan, model_kw, opts, writer, summary, actors, gpus_per_actor, actor_cpus, threads,
                       on_row)
        finally:
            if owned:
                ray.shutdown()


@contextlib.contextmanager
def _guard_stdout():
    """Keep stdout for rows: Ray's driver prints cluster messages ("(raylet) Task ... failed, retrying",
    worker tracebacks) to ``sys.stdout`` whatever ``log_to_driver`` says. While the engine runs they go to
    stderr with -v and nowhere otherwise; a sink opened on stdout before the call keeps the real stream."""
    if logs.verbosity() >= 1:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def _drive(ray, plan, model_kw, opts, writer, summary, actors, gpus_per_actor, actor_cpus, threads, on_row):
    from ray.data import DataContext

    seq = 0

    def skip(ident: str) -> None:
        nonlocal seq
        writer.skip(seq)
        summary.skip(failed=ident in opts.failed_ids)
        seq += 1

    def emit(row: dict) -> None:
        nonlocal seq
        writer.put(seq, row)
        summary.add(row)
        seq += 1
        if on_row is not None:
            on_row(row)

    work = [{"i": p.index, "d": p.descriptor} for p in plan if p.descriptor is not None]
    if not work:  # nothing for the cluster (e.g. resuming a finished run): no actor, no model load
        for p in plan:
            skip(p.id)
        return

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
             ctx.wait_for_min_actors_s)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = 600  # never wait forever for actors a cluster cannot place
    records: Iterator[dict] | None = None
    merger = _Merger(plan, skip, emit)
    try:
        blocks = max(1, min(len(work), math.ceil(len(work) / opts.batch_size), 10_000))
        ds = ray.data.from_items(work, override_num_blocks=blocks)
        # Decode tasks keep Ray's default retries (a task whose worker dies is run again).
        ds = ds.flat_map(_decode, fn_kwargs={"fps": opts.fps, "every": opts.every, "max_frames": opts.max_frames},
                         num_cpus=DECODE_CPUS)
        cluster_opts = replace(opts, done_ids=set(), failed_ids=set())  # the cluster never needs them
        ds = _answer_stage(ds, dict(
            fn_constructor_kwargs={"model_kw": dict(model_kw), "opts": cluster_opts, "threads": threads},
            batch_size=opts.batch_size,
            batch_format="numpy",
            concurrency=actors,
            num_gpus=gpus_per_actor or 0,
            num_cpus=actor_cpus,
        ))
        records = iter(ds.iter_rows())
        merger.run(records)
    except _PipelineFailed as failed:
        raise _run_error(failed.__cause__ or failed, plan, merger.position, writer.written) from None
    finally:  # KeyboardInterrupt passes through here: rows received so far are written and flushed
        close = getattr(records, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort while shutting down
                log.debug("closing the Ray iterator failed", exc_info=True)
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
         ctx.wait_for_min_actors_s) = saved


class _PipelineFailed(Exception):
    """Raised (from the Ray error) when the pipeline itself fails, as opposed to the writer or a callback."""


class _Merger:
    """Walks the plan in input order, turning the pipeline's ``(i, j)`` records into writer calls.

    ``position`` is the plan index of the input being written, so on failure everything from there on
    (that input included: a video may be half written) is what a ``--resume`` still has to answer.
    """

    def __init__(self, plan: list[_Input], skip: Callable[[str], None], emit: Callable[[dict], None]):
        self.plan = plan
        self.skip = skip
        self.emit = emit
        self.position = 0

    def run(self, records: Iterator[dict]) -> None:
        pending = _next(records)
        while self.position < len(self.plan):
            current = self.plan[self.position]
            if current.descriptor is None:
                self.skip(current.id)
            else:
                last_j = -1
                while pending is not None and int(pending["i"]) == current.index:
                    if int(pending["j"]) <= last_j:
                        raise _PipelineFailed(f"rows of input {current.id!r} came back out of order")
                    last_j = int(pending["j"])
                    if pending["skip"]:
                        self.skip(str(pending["id"]))
                    else:
                        self.emit(json.loads(pending["row"]))
                    pending = _next(records)
                if pending is not None and int(pending["i"]) < current.index:
                    raise _PipelineFailed(f"rows came back out of order (input {int(pending['i'])})")
            self.position += 1
        if pending is not None:
            raise _PipelineFailed(f"a row for unknown input {int(pending['i'])} came back")


def _next(records: Iterator[dict]) -> dict | None:
    """The next record, or None at the end; a failure inside Ray becomes :class:`_PipelineFailed`."""
    try:
        return next(records, None)
    except Exception as exc:  # noqa: BLE001 - anything the cluster raises ends the run the same way
        raise _PipelineFailed(str(exc)) from exc


def _run_error(exc: BaseException, plan: list[_Input], position: int, written: int) -> Exception:
    """The error for a pipeline that failed at ``plan[position]``: EngineError when the actors never
    loaded the model (nothing written), else EngineRunError naming the inputs without complete output."""
    message = _setup_message(exc)
    if message is not None and written == 0:
        return EngineError(f"the Ray actors could not load the model: {message}")
    missing = [p.id for p in plan[position:] if p.descriptor is not None]
    shown = ", ".join(missing[:_SHOW]) + (", …" if len(missing) > _SHOW else "")
    return EngineRunError(
        f"the Ray pipeline failed after {written} row(s): {message or _one_line(exc)}; "
        f"{len(missing)} input(s) have no complete output ({shown}); rerun with --resume",
        missing,
    )


def _answer_stage(ds, kwargs: dict[str, Any]):
    """``map_batches`` over the answering actors, with explicit fault tolerance where Ray still takes it.

    A dead actor process is replaced (``max_restarts=-1``) and the batches it held run again on the
    replacement, at most ``TASK_RETRIES`` times each, so one poisonous batch cannot loop forever. Ray Data
    deprecates passing these as extra keyword arguments (removal announced for 2.64); where they are
    refused, its own defaults apply (infinite restarts and retries for map actors).
    """
    import warnings

    fault = {"max_restarts": -1, "max_task_retries": TASK_RETRIES}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            return ds.map_batches(_Answerer, **kwargs, **fault)
    except TypeError:
        log.debug("this Ray refuses max_restarts/max_task_retries in map_batches; using its defaults")
        return ds.map_batches(_Answerer, **kwargs)
