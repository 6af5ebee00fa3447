"""The ``sample`` pipeline: noise → OT map → M refinement steps → Parquet chunks.

Phase 1 (the driver) plans every sample: its prior noise x_T comes from the stream
(seed, sample_id), the sharded search sends it to x_M = g(x_T)
(:mod:`dpmot_dist.pipelines.ot_map`), and the plan (sample_id, seed, ot_index, partner, weight:
a few bytes per sample) is saved as ``_plan/plan.parquet``, where Parquet readers of the
output folder do not see it; the rows x_M of the chunks still to write are read from the
targets. Phase 2 (:mod:`dpmot_dist.pipelines.chunks`) hands chunks to workers that refine x_M
from step M to 0 and each write one file ``chunk-00000.parquet`` atomically.

A sample is a pure function of (seed, sample_id): a rerun writes only the missing chunks (no
duplicates, no gaps), and a rerun of a finished run writes nothing. ``_manifest.json`` and
``_SUCCESS`` come last. ``--from-noise`` skips the map and starts from N(0, s_{T−1}² I): the
DDIM / DPM-Solver++ baselines through the same code path and layout.

Labelled targets: every sample carries the label y_{i*} of its OT winner i* (a from-noise
baseline draws it from the targets' label histogram, stream (seed, sample_id)), and a
class-conditional model is called with it (``--guidance-scale``: classifier-free guidance).
With a potential of ``fit --by-label`` each sample's class comes first (``--labels 3,7``:
drawn among those by the histogram; ``--per-label K``: K of each), then its noise is mapped
into that class's cells only: i* = argmax over I_c of ⟨x, y_i⟩ + h_i.

Latent targets (``prepare --vae``) are decoded to images by the same AutoencoderKL in the
workers (``--vae`` names another one, ``--vae none`` keeps only the latents): ``x`` holds the
refined latent and ``png`` the decoded image, whose shape the manifest gives as
``image_shape``.

Two runs on one output: the plan and each chunk file are committed first-writer-wins; a
second run of the same options adopts the first one's plan and both finish (each chunk
written once), a run of other options refuses. ``_SUCCESS`` comes once every chunk file is
there.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from dpmot_dist import __version__
from dpmot_dist.config import Config
from dpmot_dist.diffusion.models import (
    ModelClasses,
    load_model,
    parse_spec,
    pipeline_schedule,
    pipeline_vae,
)
from dpmot_dist.diffusion.samplers import SamplerSpec
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.diffusion.vae import VaeSpec
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, storage
from dpmot_dist.ot.sources import Source
from dpmot_dist.pipelines.chunks import (
    PNG_RANGE,
    ChunkJob,
    ChunkTask,
    is_image,
    run_local,
    run_ray,
    write_table_atomic,
)
from dpmot_dist.pipelines.classes import (
    classes_first,
    label_groups,
    plan_labels,
    resolve_classes,
    resolve_num,
)
from dpmot_dist.pipelines.ot_map import MapPlan, TargetRows, mapped_points, plan_map
from dpmot_dist.runtime import ensure_ray

log = logging.getLogger(__name__)

# Options that do not change a single output value (where and how fast it runs).
_RUNTIME_OPTIONS = frozenset(
    {"out", "workers", "cpus_per_worker", "device", "overwrite", "backend", "storage_dtype"}
    | {"batch", "map_batch", "vae_batch_size"}
)


class SampleConfig(Config):
    """Options of ``dpmot sample`` (config-file keys are the field names)."""

    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("targets", "potential", "schedule", "step", "shape"),
        "map": (
            "map",
            "k",
            "angle",
            "interp_max",
            "seed",
            "num",
            "labels",
            "per_label",
            "from_noise",
        ),
        "model": (
            "model",
            "sampler",
            "nfe",
            "eta",
            "langevin_steps",
            "langevin_lr",
            "dtype",
            "prediction",
            "vae",
            "vae_batch_size",
            "conditional",
            "guidance_scale",
            "null_class",
        ),
        "cluster": (
            "workers",
            "cpus_per_worker",
            "batch",
            "map_batch",
            "backend",
            "storage_dtype",
            "device",
        ),
        "output": ("out", "chunk", "png", "overwrite"),
    }

    targets: str | None = Field(None, description="targets data set (schedule, step, shape)")
    potential: str | None = Field(None, description="fit output folder (h.npy) or an h .npy")
    model: str = Field(description="gmm:FILE, diffusers:DIR or torchscript:FILE")
    num: int | None = Field(
        None,
        ge=1,
        description="number of samples (default: none, required; K × classes with --per-label K)",
    )
    out: str = Field(description="output folder URI")
    map: Literal["copy", "interp"] = Field("copy", description="OT map: copy or interp")
    k: int = Field(8, ge=2, description="interp: top-k cells searched")
    angle: float = Field(30.0, gt=0, le=180, description="interp: max normal angle (degrees)")
    interp_max: float = Field(0.5, gt=0, le=1, description="interp: weight w ~ U(0, max)")
    sampler: Literal["ddpm", "ddim", "langevin", "dpm-solver++"] = "ddpm"
    nfe: int | None = Field(None, ge=1, description="model evaluations (default: every step)")
    eta: float = Field(0.0, ge=0, description="DDIM η")
    langevin_steps: int = Field(1, ge=1, description="Langevin steps per noise level")
    langevin_lr: float = Field(0.5, gt=0, description="Langevin step α_t / s_t²")
    from_noise: bool = Field(False, description="baseline: start from pure noise, no map")
    schedule: str | dict | None = Field(
        None,
        description="vp-linear, vp-scaled-linear, vp-cosine, ve or JSON (default: the targets', "
        "else the diffusers pipeline's scheduler)",
    )
    step: int | None = Field(None, ge=0, description="step M of the targets (from manifest)")
    shape: list[int] | None = Field(None, description="data shape, e.g. 3,32,32")
    seed: int = 0
    workers: int = Field(0, ge=0, description="Ray workers (0: in process)")
    cpus_per_worker: float = Field(1.0, gt=0)
    chunk: int = Field(1024, ge=1, description="samples per output file")
    batch: int = Field(256, ge=1, description="samples per model call")
    map_batch: int = Field(8192, ge=1, description="samples per search call")
    backend: str = Field("auto", description="search backend: auto, faiss, torch, triton")
    storage_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto, cpu or cuda")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="model dtype")
    prediction: Literal["auto", "eps", "v", "x0"] = Field("auto", description="model output")
    png: Literal["auto", "never"] = Field("auto", description="PNG bytes for image data")
    vae: str | None = Field(
        None,
        description="AutoencoderKL folder that decodes latent samples to images (default: the "
        "VAE prepare encoded the targets with; none: no decoding)",
    )
    vae_batch_size: int = Field(32, ge=1, description="latents per VAE decode pass")
    conditional: bool = Field(
        False, description="the TorchScript model takes class labels: model(x_t, t, y)"
    )
    guidance_scale: float | None = Field(
        None,
        description="classifier-free guidance scale s of a class-conditional model (default: none)",
    )
    null_class: int | None = Field(
        None, ge=0, description="null class id of guidance (default: the number of classes)"
    )
    labels: list[int] | None = Field(
        None,
        description="only these classes, e.g. 3,7, with a fit --by-label potential or from noise "
        "(default: every class)",
    )
    per_label: int | None = Field(
        None, ge=1, description="K samples of each class of --labels (default: of every class)"
    )
    overwrite: bool = Field(False, description="replace an existing output")

    @field_validator("shape", "labels", mode="before")
    @classmethod
    def _shape_from_flag(cls, v: Any) -> Any:
        """``--shape 3,32,32`` (``--labels 3,7``) arrives as a string, or a list of floats."""
        if isinstance(v, str):
            return [int(float(s)) for s in v.split(",")]
        if isinstance(v, list) and all(isinstance(s, float) and s.is_integer() for s in v):
            return [int(s) for s in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        parse_spec(self.model)
        if self.num is None and self.per_label is None:
            raise ValueError("--num is required (or --per-label K)")
        if self.labels is not None and (not self.labels or min(self.labels) < 0):
            raise ValueError("--labels must be non-negative class ids, e.g. 3,7")
        if not self.from_noise and not (self.targets and self.potential):
            raise ValueError("--targets and --potential are required unless --from-noise")
        pipeline = self.model.startswith("diffusers:")
        if self.from_noise and not (self.targets or self.schedule or pipeline):
            raise ValueError("--from-noise needs the schedule: pass --targets or --schedule")
        if self.from_noise and self.sampler in ("ddim", "dpm-solver++") and self.nfe is None:
            raise ValueError(f"--from-noise with --sampler {self.sampler} needs --nfe")
        return self

    def sampler_spec(self) -> SamplerSpec:
        return SamplerSpec(
            name=self.sampler,
            nfe=self.nfe,
            eta=self.eta,
            langevin_steps=self.langevin_steps,
            langevin_lr=self.langevin_lr,
        )

    def fingerprint(self) -> dict[str, Any]:
        """The options that determine the output values (runtime options left out)."""
        return {k: v for k, v in self.model_dump().items() if k not in _RUNTIME_OPTIONS}


# ---------------------------------------------------------------------------------------------
# What the run works on


@dataclass(frozen=True)
class RunInfo:
    """Schedule, start step, data shape and (for the map) the potential of a run."""

    schedule: Schedule
    t_start: int
    data_shape: tuple[int, ...]
    h: np.ndarray | None = None
    source: str = "gaussian"
    vae: VaeSpec | None = None  # decodes the latent samples to images
    classes: ModelClasses = ModelClasses()  # what the model takes
    target_labels: np.ndarray | None = None  # (N,) the targets' labels
    labels: dict | None = None  # the targets' manifest ``labels`` (num_classes, counts, ...)
    null_class: int | None = None
    by_label: bool = False  # h holds one potential per class (fit --by-label)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of what the PNG bytes show: the decoded image, or the data itself."""
        return self.data_shape if self.vae is None else self.vae.image_shape(self.data_shape)

    @property
    def dim(self) -> int:
        return math.prod(self.data_shape)


def parse_schedule(value: str | dict) -> Schedule:
    """A schedule from a kind name, a JSON object or a mapping of :class:`Schedule` fields."""
    try:
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = json.loads(value)
        return Schedule(kind=value) if isinstance(value, str) else Schedule.from_dict(value)
    except (TypeError, ValueError) as e:
        raise DpmotError(f"schedule {value!r}: {e}") from None


def _targets_manifest(uri: str) -> dict:
    return {} if uri.rstrip("/").lower().endswith(".npy") else datasets.read_targets_manifest(uri)


def resolve_run(cfg: SampleConfig) -> RunInfo:
    """Schedule, step M, data shape and h from the targets, the potential and the options."""
    m = _targets_manifest(cfg.targets) if cfg.targets else {}
    if cfg.schedule is not None:
        schedule = parse_schedule(cfg.schedule)
    elif "schedule" in m:
        schedule = Schedule.from_dict(m["schedule"])
    elif (schedule := pipeline_schedule(cfg.model)) is None:
        where = cfg.targets or cfg.model
        raise DpmotError(f"{where}: no schedule in the targets' manifest; pass --schedule")
    shape = cfg.shape or m.get("data_shape") or m.get("shape") or _model_shape(cfg, schedule)
    shape = tuple(int(s) for s in shape)
    common = {"vae": resolve_vae(cfg, m, shape), **resolve_classes(cfg, m)}
    if cfg.from_noise:
        return RunInfo(schedule, schedule.num_steps - 1, shape, **common)
    step = cfg.step if cfg.step is not None else m.get("step")
    if step is None:
        raise DpmotError(f"{cfg.targets}: no step in the targets' manifest; pass --step")
    if not 0 <= step < schedule.num_steps:
        raise DpmotError(f"step {step} outside the schedule's 0..{schedule.num_steps - 1}")
    n, dim = datasets.targets_shape(cfg.targets)
    if math.prod(shape) != dim:
        raise DpmotError(f"{cfg.targets}: data shape {list(shape)} does not hold D={dim} values")
    h, source, by_label = load_potential(cfg.potential, n)
    labels = datasets.load_target_labels(cfg.targets) if common["labels"] else None
    if by_label and labels is None:
        raise DpmotError(f"{cfg.targets}: a --by-label potential needs the labelled targets")
    if (cfg.labels or cfg.per_label) and not by_label:
        raise DpmotError(
            f"{cfg.potential}: --labels and --per-label need a potential of fit --by-label "
            "(a global potential's cells of one class hold only that class's share of μ)"
        )
    info = {"target_labels": labels, "by_label": by_label, **common}
    return RunInfo(schedule, int(step), shape, h, source, **info)


def resolve_vae(cfg: SampleConfig, manifest: dict, shape: tuple[int, ...]) -> VaeSpec | None:
    """The VAE that decodes the samples: ``--vae``, else the one the targets were encoded with,
    else (targets not written by prepare, or none) a diffusers pipeline's ``vae/``.

    None when there is none, with ``--vae none`` or ``--png never``.
    """
    if cfg.png == "never" or (cfg.vae or "").lower() == "none":
        return None
    recorded = manifest.get("vae") or {}
    uri = cfg.vae or recorded.get("uri")
    if uri is None and "vae" not in manifest:  # prepare records "vae": null for pixel data
        uri = pipeline_vae(cfg.model)
    if uri is None:
        return None
    vae = VaeSpec.open(uri, cfg.vae_batch_size)
    channels = vae.image_shape(shape)[0]
    if channels not in (1, 3):
        raise DpmotError(f"{vae.uri}: decodes {channels}-channel images; PNG needs 1 or 3")
    scaling = recorded.get("scaling_factor"), recorded.get("shift_factor")
    if recorded and scaling != (vae.scaling_factor, vae.shift_factor):
        log.warning(
            "%s: scaling/shift factors %s differ from those the targets were encoded with %s",
            vae.uri,
            (vae.scaling_factor, vae.shift_factor),
            scaling,
        )
    return vae


def _model_shape(cfg: SampleConfig, schedule: Schedule) -> tuple[int, ...]:
    """The data shape a model declares (loads it; only when nothing else gives the shape)."""
    shape = load_model(cfg.model, schedule, "cpu", "float32", cfg.prediction).data_shape
    if shape is None:
        raise DpmotError(f"{cfg.model}: the model does not declare its data shape; pass --shape")
    return shape


def load_potential(uri: str, n: int) -> tuple[np.ndarray, str, bool]:
    """h (n,) float64, the source measure of a fit output folder (or an h ``.npy``), and
    whether h holds one potential per class (``fit --by-label``)."""
    source, by_label = "gaussian", False
    if uri.rstrip("/").lower().endswith(".npy"):
        h = storage.load_npy(uri)
    else:
        if not storage.is_success(uri):
            raise DpmotError(f"{uri}: not a finished fit output (no _SUCCESS); rerun fit")
        manifest_uri = datasets.find_aux(uri, datasets.MANIFEST)
        if manifest_uri is not None:
            manifest = storage.read_json(manifest_uri)
            source, by_label = manifest.get("source", "gaussian"), bool(manifest.get("by_label"))
        h = storage.load_npy(storage.join(uri, "h.npy"))
    if h.shape != (n,) or h.dtype.kind != "f" or not np.isfinite(h).all():
        raise DpmotError(f"{uri}: h must be {n} finite floats (one per target), got {h.shape}")
    return h.astype(np.float64), source, by_label


# ---------------------------------------------------------------------------------------------
# Output layout


def chunk_ranges(num: int, chunk: int) -> list[tuple[int, int]]:
    """Sample-id ranges [a, b) of the output files."""
    return [(a, min(a + chunk, num)) for a in range(0, num, chunk)]


# ---------------------------------------------------------------------------------------------
# Phase 1: the plan


def plan_table(
    plan: MapPlan, seed: int, fingerprint: dict, labels: np.ndarray | None = None
) -> pa.Table:
    n = len(plan.ot_index)
    cols = {
        "sample_id": pa.array(np.arange(n, dtype=np.int64)),
        "seed": pa.array(np.full(n, seed, np.int64)),
        "ot_index": pa.array(plan.ot_index, pa.int64()),
        "partner": pa.array(plan.partner, pa.int64()),
        "weight": pa.array(plan.weight, pa.float32()),
    }
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    table = pa.table(cols)
    return table.replace_schema_metadata({"dpmot.fingerprint": json.dumps(fingerprint)})


def read_plan(out: str) -> tuple[MapPlan, dict, np.ndarray | None] | None:
    """The saved plan, the fingerprint of the run that wrote it and the samples' labels (None
    when unlabelled); None when there is no plan."""
    uri = datasets.find_aux(out, datasets.PLAN)
    if uri is None:
        return None
    try:
        # one thread: a run that refuses right after this read exits while Arrow's pool
        # threads start, which can abort the exit (apache/arrow#34314)
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)), use_threads=False)
        fp = json.loads(table.schema.metadata[b"dpmot.fingerprint"])
        cols = {c: table.column(c).to_numpy() for c in ("ot_index", "partner", "weight")}
        labels = table.column("label").to_numpy() if "label" in table.column_names else None
    except (pa.ArrowException, KeyError, ValueError) as e:
        raise DpmotError(f"{uri}: unreadable plan ({e}); pass --overwrite") from None
    return MapPlan(cols["ot_index"], cols["partner"], cols["weight"]), fp, labels


def check_same_run(out: str, fp: dict, theirs: dict) -> None:
    """An existing output must come from the same options."""
    diff = sorted(k for k in set(fp) | set(theirs) if fp.get(k) != theirs.get(k))
    if diff:
        k = diff[0]
        raise DpmotError(
            f"{out}: holds a run with other options ({k}: {theirs.get(k)!r} there, "
            f"{fp.get(k)!r} now); pass --overwrite or another --out"
        )


def make_plan(
    cfg: SampleConfig, info: RunInfo, labels: np.ndarray | None = None
) -> tuple[MapPlan, TargetRows | None]:
    """Phase 1's search: every sample's OT cell (and interp partner) via the ShardPool.

    For a ``--by-label`` potential the samples of class c search class c's cells only
    (:func:`~dpmot_dist.pipelines.classes.label_groups`).
    """
    from dpmot_dist.pipelines.shards import ShardPool

    if cfg.from_noise:
        none = np.full(cfg.num, -1, np.int64)
        return MapPlan(none, none.copy(), np.zeros(cfg.num, np.float32)), None
    pool = ShardPool.create(
        cfg.targets,
        workers=cfg.workers,
        backend=cfg.backend,
        storage_dtype=cfg.storage_dtype,
        device=cfg.device,
        cpus_per_worker=cfg.cpus_per_worker,
    )
    source = Source(kind=info.source)
    ids = np.arange(cfg.num, dtype=np.int64)
    plans, rows, order = [], [], []
    try:
        for group, h, allowed in label_groups(ids, info, labels):
            order.append(group)
            for a in range(0, len(group), cfg.map_batch):
                plan, r = plan_map(
                    pool,
                    h,
                    group[a : a + cfg.map_batch],
                    cfg.seed,
                    mode=cfg.map,
                    k=cfg.k,
                    angle=cfg.angle,
                    w_max=cfg.interp_max,
                    source=source,
                    targets_uri=cfg.targets,
                    batch=cfg.map_batch,
                    cells=allowed,
                )
                plans.append(plan)
                rows.append(r)
    finally:
        pool.close()
    cached = rows[0] if len(rows) == 1 else None  # reuse interp's rows when in one wave
    return MapPlan.concat(plans).take(np.argsort(np.concatenate(order))), cached


def chunk_tasks(
    cfg: SampleConfig,
    plan: MapPlan,
    missing: list[int],
    rows: TargetRows | None,
    labels: np.ndarray | None = None,
) -> list[ChunkTask]:
    """The tasks of the missing chunks, with their mapped x_M read from the targets."""
    ranges = chunk_ranges(cfg.num, cfg.chunk)
    tasks = []
    for c in missing:
        a, b = ranges[c]
        ids, y = np.arange(a, b, dtype=np.int64), None if labels is None else labels[a:b]
        tasks.append(ChunkTask(c, ids, plan.ot_index[a:b], None, y))
    if cfg.from_noise or not tasks:
        return tasks
    sel = np.concatenate([t.sample_ids for t in tasks])
    sub = MapPlan(plan.ot_index[sel], plan.partner[sel], plan.weight[sel])
    if rows is None or not np.isin(sub.needed(), rows.index).all():
        rows = TargetRows.gather(cfg.targets, sub.needed())
    x = mapped_points(sub, rows)
    at = 0
    for t in tasks:
        t.x_start, at = x[at : at + len(t.sample_ids)], at + len(t.sample_ids)
    return tasks


# ---------------------------------------------------------------------------------------------
# The pipeline


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    """Write ``cfg.num`` samples to ``cfg.out``; returns a summary (throughput included).

    ``summary["complete"]`` is True when the output was already finished (nothing written).
    """
    t_begin = time.perf_counter()
    fp = cfg.fingerprint()
    if not cfg.overwrite and storage.is_success(cfg.out):
        manifest = datasets.read_manifest(cfg.out)
        check_same_run(cfg.out, fp, manifest.get("fingerprint", {}))
        log.info("%s is complete (_SUCCESS present); nothing to do", cfg.out)
        num = manifest.get("num")
        return {"out": cfg.out, "num": num, "complete": True, "written": 0, "chunks_written": 0}
    info = resolve_run(cfg)  # checks the inputs before anything is written
    cfg = resolve_num(cfg, info)
    storage.prepare_output(cfg.out, overwrite=cfg.overwrite, resume=not cfg.overwrite)
    if cfg.workers:
        ensure_ray()
    n_chunks = len(chunk_ranges(cfg.num, cfg.chunk))
    saved = read_plan(cfg.out)
    if saved is not None:
        check_same_run(cfg.out, fp, saved[1])
    missing = sorted(set(range(n_chunks)) - datasets.written_chunks(cfg.out))
    log.info("%s: %d of %d chunks to write", cfg.out, len(missing), n_chunks)

    t0 = time.perf_counter()
    rows = None
    if saved is None:
        first = classes_first(cfg, info)
        plan, rows = make_plan(cfg, info, first)
        labels = plan_labels(info, plan, first)
        plan_uri = storage.join(cfg.out, datasets.PLAN)
        table = plan_table(plan, cfg.seed, fp, labels)
        if not write_table_atomic(plan_uri, table, exclusive=True):
            saved = read_plan(cfg.out)  # another run's, committed first: adopt it
            check_same_run(cfg.out, fp, saved[1])
            (plan, _, labels), rows = saved, None
    else:
        plan, _, labels = saved
    t_search = time.perf_counter() - t0
    tasks = chunk_tasks(cfg, plan, missing, rows, labels)
    t_map = time.perf_counter() - t0

    job = ChunkJob(
        out=cfg.out,
        model=cfg.model,
        prediction=cfg.prediction,
        device=cfg.device,
        dtype=cfg.dtype,
        schedule=info.schedule.to_dict(),
        t_start=info.t_start,
        data_shape=info.data_shape,
        sampler=cfg.sampler_spec(),
        from_noise=cfg.from_noise,
        seed=cfg.seed,
        png=cfg.png == "auto" and (info.vae is not None or is_image(info.data_shape)),
        batch=cfg.batch,
        vae=info.vae,
        conditional=cfg.conditional,
        guidance=1.0 if info.null_class is None else cfg.guidance_scale,
        null_class=info.null_class,
    )
    t1 = time.perf_counter()
    if cfg.workers:
        import ray

        for t in tasks:
            t.x_start = None if t.x_start is None else ray.put(t.x_start)
        stats = run_ray(job, tasks, cfg.workers, cfg.cpus_per_worker)
    else:
        stats = run_local(job, tasks)
    t_phase2 = time.perf_counter() - t1

    nfe = stats[0]["nfe"] if stats else _nfe_on_disk(cfg.out)
    _check_all_chunks(cfg.out, n_chunks)
    stats = [s for s in stats if s.get("committed", True)]
    written = sum(s["rows"] for s in stats)
    worker_seconds = sum(s["t_gen"] + s["t_decode"] + s["t_write"] for s in stats)
    decode_fraction = sum(s["t_decode"] for s in stats) / max(worker_seconds, 1e-9)
    throughput = {
        "samples_written": written,
        "map_seconds": t_map,
        "search_seconds": t_search,
        "phase2_seconds": t_phase2,
        "total_seconds": time.perf_counter() - t_begin,
        "samples_per_s": written / max(t_map + t_phase2, 1e-9),
        "phase2_samples_per_s": written / max(t_phase2, 1e-9),
        "model_evals_per_s": written * nfe / max(t_phase2, 1e-9),
        "map_fraction": t_map / max(t_phase2, 1e-9),
        "worker_seconds": worker_seconds,
        "decode_seconds": sum(s["t_decode"] for s in stats),
        "decode_fraction": decode_fraction,
        "samples_per_s_without_decode": written
        / max(t_map + t_phase2 * (1 - decode_fraction), 1e-9),
    }
    manifest = _manifest(cfg, info, job, n_chunks, nfe, fp, throughput, labels is not None)
    storage.write_json_atomic(storage.join(cfg.out, datasets.MANIFEST), manifest)
    storage.mark_success(cfg.out)
    log.info(
        "%s: %d samples written (%d chunks); %.3g samples/s, %.3g model evaluations/s, "
        "map %.1f%% of phase-2 time",
        cfg.out,
        written,
        len(stats),
        throughput["samples_per_s"],
        throughput["model_evals_per_s"],
        100 * throughput["map_fraction"],
    )
    return {
        "out": cfg.out,
        "num": cfg.num,
        "complete": False,
        "written": written,
        "chunks_written": len(stats),
        "nfe": nfe,
        **throughput,
    }


def _check_all_chunks(out: str, n_chunks: int) -> None:
    """Every chunk file must be there before ``_SUCCESS`` (another run may have removed some,
    e.g. with --overwrite)."""
    missing = sorted(set(range(n_chunks)) - datasets.written_chunks(out))
    if missing:
        raise DpmotError(
            f"{storage.join(out, datasets.chunk_name(missing[0]))}: missing before the commit "
            f"({len(missing)} chunk files; another run removed them?); rerun to write them"
        )


def _nfe_on_disk(out: str) -> int:
    """The NFE recorded in chunk 0 (when this run wrote no chunk itself)."""
    data = storage.read_bytes(storage.join(out, datasets.chunk_name(0)))
    return int(pq.read_table(io.BytesIO(data), columns=["nfe"]).column("nfe")[0].as_py())


def _manifest(
    cfg, info: RunInfo, job: ChunkJob, n_chunks: int, nfe: int, fp, throughput, labelled: bool
) -> dict:
    columns = ["sample_id", "seed", "ot_index", *(["label"] if labelled else []), "nfe", "x"]
    columns += ["png"] if job.png else []
    labels = None
    if labelled:
        names = {k: info.labels[k] for k in ("num_classes", "classes") if k in info.labels}
        labels = {**names, "conditional": info.classes.conditional}
    decoded = {}
    if info.vae is not None:
        decoded = {"image_shape": list(info.image_shape), "vae": info.vae.describe()}
    return {
        "kind": datasets.SAMPLES_KIND,
        "version": datasets.SAMPLES_VERSION,
        "dpmot_dist": __version__,
        "num": cfg.num,
        "dim": info.dim,
        "data_shape": list(info.data_shape),
        "chunk": cfg.chunk,
        "files": [datasets.chunk_name(c) for c in range(n_chunks)],
        "columns": columns,
        "png": job.png,
        **({"png_range": list(PNG_RANGE)} if job.png else {}),
        "decoded": info.vae is not None,
        **decoded,
        "labels": labels,
        "guidance_scale": job.guidance if job.null_class is not None else None,
        "null_class": job.null_class,
        "model": cfg.model,
        "sampler": cfg.sampler,
        "nfe": nfe,
        "from_noise": cfg.from_noise,
        "map": None if cfg.from_noise else cfg.map,
        "targets": cfg.targets,
        "potential": None if cfg.from_noise else cfg.potential,
        "schedule": info.schedule.to_dict(),
        "step": info.t_start,
        "seed": cfg.seed,
        "fingerprint": fp,
        "config": cfg.model_dump(),
        "throughput": throughput,
    }
