"""The ``prepare`` pipeline: a data set → forward-diffused OT targets (DESIGN §2), sharded Parquet.

For each source row i (a data point x_0, after scaling, resizing and optional VAE encoding)
and copy c = 0..K−1 it writes the target

    y_{i,c} = a_M x_0 + s_M ε_{i,c},     ε_{i,c} = torch.randn(D, generator=stream_seed(seed, i, c))

with (a_M, s_M) = (sqrt(ᾱ_M), sqrt(1 − ᾱ_M)) for VP schedules and (1, σ_M) for VE (see
:mod:`dpmot_dist.diffusion.schedules`; M = ``step`` in diffusers' integer convention). Each ε
has its own generator, so the targets do not depend on how rows are split into blocks or on
the number of workers. Output row ``i * K + c`` holds y_{i,c} (the copies of one data point are
adjacent).

Execution: the driver reads only the input's header / footers / file listing
(:mod:`dpmot_dist.io.readers`), cuts it into row blocks (one per output part, aligned to Parquet
row groups), and runs one Ray task per block (at most ``workers`` in flight): read the block,
transform, diffuse, write ``part-KKKKK.parquet`` atomically. The driver then commits
``manifest.json`` and ``_SUCCESS``. Plain Ray tasks rather than a Ray Data pipeline because
the targets layout needs a global row index and one part per contiguous row range (which
Ray Data's writers do not give), because rows must keep the input's order, and because a
part per task makes an interrupted run resumable part by part.

Resuming: the first run records its plan (options that shape the output, input description,
block boundaries) in ``_prepare.json``. A rerun with the same plan on a folder without
``_SUCCESS`` keeps every part already written (parts are written atomically; each one's
Parquet footer is checked) and writes the rest. A complete output, or a folder holding
anything else, is only replaced with ``--overwrite``.

Value ranges and colour modes (:mod:`dpmot_dist.io.images`): uint8 images → [−1, 1]; float
image arrays in [0, 1] or [0, 255] are recognised by the range of their first block (logged)
and mapped to [−1, 1], floats in [−1, 1] are kept, and every block is checked against the
range it is read as (``scale`` chooses explicitly); latents (flat rows, ``layout: latent``,
channels other than 1 or 3) are never rescaled. Image files are decoded as RGB unless every
file is greyscale (``mode`` L or RGB chooses).

Two runs on one output: the plan and every part are committed first-writer-wins
(:func:`~dpmot_dist.io.storage.create_exclusive`). A second run of the same plan works as a
rerun next to the first (a part the other committed first is kept), so both finish with each
row exactly once; a run of another plan refuses. Reads of the input are retried after
transient storage failures (:func:`~dpmot_dist.io.storage.retrying`).

VAE latents: with ``vae=DIR`` (a diffusers ``AutoencoderKL`` folder, or a pipeline folder with
a ``vae/`` subfolder; any fsspec URI) images are scaled to the model range first (use
``scale`` ``minus1_1``/``auto`` for [−1, 1]) and x_0 = scaling_factor · (E[q(z|x)] −
shift_factor): the posterior *mean*, so that latents are deterministic.

Labels: when the input has class labels (:func:`dpmot_dist.io.readers.read_labels`: class
subfolders of an image folder, a Parquet ``label`` column, an ``.npz`` member ``y`` or
``labels``) the driver reads and checks them before writing anything, and every target row
keeps the label of the data point it was diffused from (``label`` column; ``labels`` in the
manifest: number of classes, per-class counts, class names).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from dpmot_dist import __version__
from dpmot_dist.config import Config
from dpmot_dist.diffusion.schedules import Schedule, ScheduleKind
from dpmot_dist.diffusion.vae import VaeSpec
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, images, storage
from dpmot_dist.io.readers import Block, Labels, Source, open_source, read_labels
from dpmot_dist.ot.sources import stream_seed
from dpmot_dist.runtime import ensure_ray, remote_error

logger = logging.getLogger(__name__)

PLAN = "_prepare.json"
PLAN_VERSION = 1
ROW_ORDER = "row = i * copies + c (i: source row, c: copy)"
_PART_BYTES = 128 << 20  # default output bytes per part
_RUN_ONLY = ("overwrite", "workers", "gpus_per_worker", "vae_batch_size")  # not in the plan


class PrepareConfig(Config):
    """Options of ``dpmot prepare`` (config-file keys are the field names)."""

    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": (
            "data",
            "column",
            "label_column",
            "scale",
            "layout",
            "mode",
            "image_size",
            "vae",
            "vae_batch_size",
        ),
        "diffusion": (
            "schedule",
            "step",
            "copies",
            "seed",
            "num_steps",
            "beta_start",
            "beta_end",
            "sigma_min",
            "sigma_max",
        ),
        "cluster": ("workers", "gpus_per_worker"),
        "output": ("out", "dtype", "rows_per_part", "overwrite"),
    }

    data: str = Field(
        description="input URI: .npy/.npz, a Parquet file or folder, or a folder of PNG/JPEG"
    )
    out: str = Field(description="output targets data set folder URI")
    schedule: ScheduleKind = Field(
        "vp-linear", description="vp-linear, vp-scaled-linear, vp-cosine or ve"
    )
    step: int = Field(ge=0, description="diffusion step M (diffusers timestep): targets are x_M")
    copies: int = Field(1, ge=1, description="independent noise draws per data point")
    seed: int = Field(0, description="noise seed; ε of row i, copy c uses stream (seed, i, c)")
    num_steps: int = Field(1000, ge=2, description="T, number of schedule steps")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="VP: first β")
    beta_end: float = Field(0.02, gt=0, lt=1, description="VP linear: last β")
    sigma_min: float = Field(0.01, gt=0, description="VE: σ at step 0")
    sigma_max: float = Field(50.0, gt=0, description="VE: σ at step T−1")
    scale: images.Scale = Field(
        "auto",
        description="how stored values are read: auto (uint8 → [−1, 1]; float images by their "
        "range: [0, 1] and [0, 255] → [−1, 1], [−1, 1] as stored; latents as stored), none, "
        "minus1_1 ([0, 1] floats or uint → [−1, 1]), minus1_1_from_255 ([0, 255] floats → "
        "[−1, 1]), unit (→ [0, 1])",
    )
    layout: images.Layout = Field(
        "auto", description="auto, nchw, nhwc, flat, or latent (rows as stored, never rescaled)"
    )
    mode: images.ColourMode = Field(
        "auto", description="colour mode of image files: auto (RGB unless all are grey), L, RGB"
    )
    dtype: Literal["float32", "float16"] = Field("float32", description="storage dtype")
    rows_per_part: int | None = Field(
        None, ge=1, description="output rows per part (default: about 128 MiB per part)"
    )
    workers: int | None = Field(
        None, ge=0, description="Ray tasks in flight (default: cluster CPUs; 0: in process)"
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per task (for vae encoding)")
    overwrite: bool = Field(False, description="replace an existing output")
    vae: str | None = Field(None, description="diffusers AutoencoderKL folder: encode to latents")
    vae_batch_size: int = Field(32, ge=1, description="images per VAE forward pass")
    image_size: int | None = Field(
        None, ge=1, description="resize images: shorter side to this size, centre crop"
    )
    column: str | None = Field(None, description="Parquet column or .npz member to read")
    label_column: str | None = Field(
        None,
        description="Parquet column or .npz member of class labels (default: label; y or "
        "labels; an image folder's class subfolders); none: no labels",
    )

    @model_validator(mode="after")
    def _step_in_schedule(self) -> PrepareConfig:
        if self.step >= self.num_steps:
            raise ValueError(f"step {self.step} outside [0, num_steps − 1 = {self.num_steps - 1}]")
        return self

    def make_schedule(self) -> Schedule:
        """The forward-diffusion schedule these options describe."""
        return Schedule(
            kind=self.schedule,
            num_steps=self.num_steps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
        )


# ---------------------------------------------------------------------------------------------
# The per-block transform


@dataclass(frozen=True)
class Transform:
    """What a worker does to one block: stored rows → x_0 (N, *data_shape) → targets (N·K, D).

    ``layout``/``scale`` are resolved (never ``auto``); ``value_range`` is the stored float
    range ``scale`` reads (checked on every block; None: not checked); ``image_size`` resizes
    stored image arrays (decoded files were resized on decoding).
    """

    layout: Literal["nchw", "nhwc", "flat", "latent"]
    scale: images.Scaling
    image_size: int | None
    vae: VaeSpec | None
    schedule: Schedule
    step: int
    copies: int
    seed: int
    dtype: str
    data_shape: tuple[int, ...]
    value_range: images.ValueRange | None = None

    @property
    def dim(self) -> int:
        return math.prod(self.data_shape)

    def x0(self, raw: np.ndarray, block: Block) -> np.ndarray:
        """Data points x_0 (rows, *data_shape) float32 from stored rows (rows, *row_shape)."""
        if raw.dtype.kind == "f":
            _check_finite(block, raw.reshape(len(raw), -1))
        if self.value_range is not None:
            images.check_range(raw, self.value_range, self.scale, block.name)
        x = images.scale_pixels(raw, self.scale)
        if self.layout in ("flat", "latent"):
            return x.reshape(len(x), *self.data_shape)
        x = images.to_nchw(x, self.layout)
        if self.image_size is not None:
            x = images.resize_center_crop(torch.from_numpy(x), self.image_size).numpy()
        if self.vae is not None:
            x = self.vae.encode(np.ascontiguousarray(x))
            if not np.isfinite(x).all():
                raise DpmotError(f"{self.vae.uri}: the VAE produced NaN or Inf latents")
        return np.ascontiguousarray(x, dtype=np.float32)

    def diffuse(self, x0: np.ndarray, first_row: int) -> np.ndarray:
        """Targets (rows · K, D): row (i − first_row) · K + c holds a_M x_0,i + s_M ε_{i,c}."""
        rows = len(x0)
        eps = torch.empty(rows, self.copies, self.dim)
        g = torch.Generator()
        for r in range(rows):
            for c in range(self.copies):
                g.manual_seed(stream_seed(self.seed, first_row + r, c))
                torch.randn(self.dim, generator=g, out=eps[r, c])
        x = torch.from_numpy(x0.reshape(rows, 1, self.dim))
        return (
            self.schedule.diffuse(x, self.step, eps).reshape(rows * self.copies, self.dim).numpy()
        )


def _check_finite(block: Block, rows: np.ndarray) -> None:
    """Reject NaN/Inf input, naming the object and its first bad row."""
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        r = block.obj_start + int(np.argmax(bad))
        raise DpmotError(f"{block.obj}: contains NaN or Inf values (first at row {r})")


def prepare_block(
    source: Source,
    t: Transform,
    out: str,
    part_no: int,
    block: Block,
    labels: np.ndarray | None = None,
) -> dict:
    """Read, transform and diffuse one block; write it as part ``part_no``; return its entry.

    ``labels`` (block.rows,) are the block's class ids; each copy of a row keeps its label. The
    read is retried after transient storage failures; a part another run of the same plan
    committed first is kept.
    """
    raw = storage.retrying(block.obj, source.read, block)
    y = t.diffuse(t.x0(raw, block), block.start)
    copies = None if labels is None else np.repeat(labels, t.copies)
    return datasets.write_targets_part(
        out, part_no, block.start * t.copies, y, t.dtype, copies, exclusive=True
    )


def make_transform(cfg: PrepareConfig, source: Source) -> Transform:
    """Resolve layout, scale, resizing and the VAE against the input (driver side, once)."""
    shape = source.row_shape
    layout = "nhwc" if source.encoded else images.resolve_layout(cfg.layout, shape)
    if source.encoded and cfg.layout in ("flat", "nchw"):
        if cfg.layout == "nchw":
            raise DpmotError(f"{source.uri}: decoded images are H×W×C; use layout auto or nhwc")
        layout = "flat"
    if source.encoded and cfg.layout == "latent":
        raise DpmotError(f"{source.uri}: decoded images are not latents; use layout auto")
    vae = VaeSpec.open(cfg.vae, cfg.vae_batch_size) if cfg.vae else None
    if layout in ("flat", "latent"):
        if vae is not None or cfg.image_size is not None:
            raise DpmotError(
                f"{source.uri}: vae and image_size need image rows, not layout {layout}"
            )
        if layout == "latent" and cfg.scale not in ("auto", "none"):
            raise DpmotError(f"{source.uri}: layout latent rows are never rescaled; drop scale")
        data_shape: tuple[int, ...] = (math.prod(shape),) if layout == "flat" else shape
    else:
        data_shape = images.chw_shape(shape, layout)
        if cfg.image_size is not None and not source.encoded:
            data_shape = (data_shape[0], cfg.image_size, cfg.image_size)
        if vae is not None:
            data_shape = vae.latent_shape(data_shape)
    scale, value_range = _resolve_scale(cfg.scale, source, layout)
    in_range = scale in ("minus1_1", "minus1_1_from_255") or value_range == (-1.0, 1.0)
    if vae is not None and not in_range:
        logger.warning("vae: scale resolves to %r; AutoencoderKL expects images in [-1, 1]", scale)
    return Transform(
        layout=layout,
        scale=scale,
        image_size=None if source.encoded else cfg.image_size,
        vae=vae,
        schedule=cfg.make_schedule(),
        step=cfg.step,
        copies=cfg.copies,
        seed=cfg.seed,
        dtype=cfg.dtype,
        data_shape=tuple(int(s) for s in data_shape),
        value_range=value_range,
    )


def _resolve_scale(
    scale: images.Scale, source: Source, layout: str
) -> tuple[images.Scaling, images.ValueRange | None]:
    """:func:`images.resolve_scale` against the input: float image rows (not latents) in
    ``auto`` are read by the range of the first block; latents are never rescaled."""
    if layout == "latent":
        return "none", None
    probe = (
        scale == "auto"
        and np.dtype(source.dtype).kind == "f"
        and images.is_image_rows(layout, source.row_shape)
    )
    head = source.head() if probe else None
    return images.resolve_scale(scale, np.dtype(source.dtype), head, source.uri)


# ---------------------------------------------------------------------------------------------
# Output folder: plan, resume, commit


def _plan_record(cfg: PrepareConfig, source: Source, blocks: list[Block]) -> dict[str, Any]:
    """What must match for a rerun to keep the parts already written."""
    record = {
        "version": PLAN_VERSION,
        "config": cfg.model_dump(mode="json", exclude=set(_RUN_ONLY)),
        "source": source.describe(),
        "blocks": [[b.start, b.stop] for b in blocks],
    }
    return json.loads(json.dumps(record))


def _open_output(
    cfg: PrepareConfig, record: dict[str, Any], blocks: list[Block]
) -> dict[int, dict]:
    """Make the output folder ready; return the entries of parts a previous run completed."""
    out = cfg.out
    plan_uri = storage.join(out, PLAN)
    if cfg.overwrite:
        storage.prepare_output(out, overwrite=True)
    elif storage.is_success(out):
        raise DpmotError(f"{out}: output exists (a complete targets data set); pass --overwrite")
    elif PLAN not in (names := _visible_names(out)) and names:
        raise DpmotError(f"{out}: output exists and is not a prepare output; pass --overwrite")
    text = (json.dumps(record, indent=2) + "\n").encode()
    if storage.create_exclusive(plan_uri, text):
        return {}
    if storage.read_json(plan_uri) != record:  # a previous run's plan or a concurrent run's
        raise DpmotError(
            f"{out}: holds an unfinished prepare of other data or options; "
            "pass --overwrite to start again"
        )
    done = _completed_parts(out, blocks, record["config"]["copies"])
    logger.info("resuming %s: %d of %d parts already written", out, len(done), len(blocks))
    return done


def _visible_names(out: str) -> set[str]:
    """The output folder's entries, without temporary files (another run's, in flight)."""
    return {name for name in storage.list_names(out) if not name.startswith(".")}


def _completed_parts(out: str, blocks: list[Block], copies: int) -> dict[int, dict]:
    """Parts whose file holds the planned rows; stale temporary files and unreadable parts
    (to be written again) are removed."""
    storage.remove_stale_temps(out)
    names = set(storage.list_names(out))
    done = {}
    for k, b in enumerate(blocks):
        name, uri = datasets.part_name(k), storage.join(out, datasets.part_name(k))
        rows = _part_rows(uri) if name in names else None
        if rows == b.rows * copies:
            done[k] = {"path": name, "rows": rows, "start": b.start * copies}
        elif name in names:
            logger.warning("%s: unreadable or not the planned rows; writing it again", uri)
            storage.remove(uri)
    return done


def _part_rows(uri: str) -> int | None:
    """Rows in a Parquet part's footer, or None when it is not a readable Parquet file
    (storage failures raise, after retries)."""
    fs, path = storage.url_to_fs(uri)
    return storage.retrying(uri, _footer_rows, fs, path)


def _footer_rows(fs: Any, path: str) -> int | None:
    with fs.open(path, "rb") as raw:
        f = storage.WatchedFile(raw)
        try:
            return pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            if e is f.error:
                raise  # a storage failure
            return None


def _manifest_extra(
    cfg: PrepareConfig, source: Source, t: Transform, labels: Labels | None
) -> dict[str, Any]:
    a, s = t.schedule.marginal(t.step)
    return {
        "schedule": t.schedule.to_dict(),
        "step": t.step,
        "marginal": {"a": a, "s": s, "formula": "y = a * x0 + s * eps"},
        "copies": t.copies,
        "source_rows": source.n,
        "row_order": ROW_ORDER,
        "data_shape": list(t.data_shape),
        "scale": t.scale,
        "layout": t.layout,
        "noise": "eps[i, c] = torch.randn(D, generator=manual_seed(stream_seed(seed, i, c)))",
        "seed": t.seed,
        "source": source.describe(),
        "vae": None if t.vae is None else t.vae.describe(),
        "labels": None if labels is None else labels.describe(t.copies),
        "dpmot_version": __version__,
        "config": cfg.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------------------------
# Running blocks


def _run_blocks(
    cfg: PrepareConfig,
    source: Source,
    t: Transform,
    todo: list[tuple[int, Block]],
    labels: Labels | None = None,
) -> Iterator[dict]:
    """Part entries of ``todo``, in completion order (in process, or Ray tasks)."""
    lite = source.worker_view()

    def labelled(b: Block) -> tuple[np.ndarray, ...]:
        """The block's labels as the optional last argument of :func:`prepare_block`."""
        return () if labels is None else (labels.values[b.start : b.stop],)

    if cfg.workers == 0:
        for k, block in todo:
            yield prepare_block(lite, t, cfg.out, k, block, *labelled(block))
        return
    import ray

    ensure_ray()
    workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(prepare_block).options(num_cpus=1, num_gpus=cfg.gpus_per_worker)
    source_ref, t_ref = ray.put(lite), ray.put(t)
    pending: dict[Any, int] = {}
    queue = iter(todo)
    try:
        while True:
            for k, block in _take(queue, workers - len(pending)):
                ref = task.remote(source_ref, t_ref, cfg.out, k, block, *labelled(block))
                pending[ref] = k
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            try:
                yield ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                raise remote_error(e) from None
    finally:
        for ref in pending:
            ray.cancel(ref)


def _take(it: Iterator, n: int) -> list:
    return [x for _, x in zip(range(max(0, n)), it, strict=False)]


class _Progress:
    """A progress bar on a terminal, a log line per part otherwise."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done, self.bar = total, done, None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="part", desc="prepare")

    def update(self, entry: dict) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            logger.info(
                "part %d/%d written (%s, %d rows)",
                self.done,
                self.total,
                entry["path"],
                entry["rows"],
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# The pipeline


def run_prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Forward-diffuse ``cfg.data`` to step M and write the targets data set ``cfg.out``.

    Returns the manifest (as written to ``manifest.json``). Raises DpmotError with a one-line
    message on bad input, a bad output folder or storage failures (also from Ray tasks).
    """
    t0 = time.perf_counter()
    source = storage.retrying(cfg.data, open_source, cfg.data, cfg.column, cfg.image_size, cfg.mode)
    t = make_transform(cfg, source)
    no_labels = (cfg.label_column or "").lower() == "none"
    labels = None if no_labels else read_labels(source, cfg.label_column)
    if labels is not None:
        logger.info("labels: %s, %d classes", labels.origin, labels.describe()["num_classes"])
    part_rows = cfg.rows_per_part or max(1, _PART_BYTES // (t.dim * np.dtype(cfg.dtype).itemsize))
    blocks = source.blocks(max(1, part_rows // cfg.copies))
    done = _open_output(cfg, _plan_record(cfg, source, blocks), blocks)
    todo = [(k, b) for k, b in enumerate(blocks) if k not in done]
    logger.info(
        "prepare %s → %s: %d rows × %d copies, x0 shape %s, %s step %d, %d parts to write",
        cfg.data,
        cfg.out,
        source.n,
        cfg.copies,
        list(t.data_shape),
        t.schedule.kind,
        t.step,
        len(todo),
    )
    entries = list(done.values())
    progress = _Progress(len(blocks), len(done))
    try:
        for entry in _run_blocks(cfg, source, t, todo, labels):
            entries.append(entry)
            progress.update(entry)
    finally:
        progress.close()
    manifest = datasets.write_targets_manifest(
        cfg.out, entries, t.dim, cfg.dtype, t.data_shape, _manifest_extra(cfg, source, t, labels)
    )
    logger.info(
        "wrote %s: %d targets × %d in %.1f s",
        cfg.out,
        manifest["n"],
        t.dim,
        time.perf_counter() - t0,
    )
    return manifest
