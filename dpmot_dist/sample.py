"""The ``sample`` pipeline: noise → OT map → M refinement steps → Parquet chunks.

Phase 1 (the driver) plans every sample: its prior noise x_T comes from the stream
(seed, sample_id), the sharded search sends it to x_M = g(x_T) (:mod:`dpmot_dist.ot_map`), and
the plan (sample_id, seed, ot_index, partner, weight: a few bytes per sample) is saved as
``plan.parquet``; the rows x_M of the chunks still to write are read from the targets.
Phase 2 hands chunks to workers (Ray actors that load the model once, or one in-process
worker) which refine x_M from step M to 0 (:mod:`dpmot_dist.samplers`) and each write one
file ``chunk-00000.parquet`` atomically::

    sample_id: int64, seed: int64, ot_index: int64 (−1 from noise), nfe: int32,
    x: fixed_size_list<float32>[D] (data shape in the manifest), png: binary (images only)

A sample is a pure function of (seed, sample_id): a rerun writes only the missing chunks (no
duplicates, no gaps), and a rerun of a finished run writes nothing. ``manifest.json`` and
``_SUCCESS`` come last. ``--from-noise`` skips the map and starts from N(0, s_{T−1}² I): the
DDIM / DPM-Solver++ baselines through the same code path and layout.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator, model_validator

from dpmot_dist import __version__, storage
from dpmot_dist.config import Config, add_model_flags, config_from_args
from dpmot_dist.errors import DpmotError
from dpmot_dist.models import load_model, parse_spec
from dpmot_dist.ot_map import MapPlan, TargetRows, mapped_points, plan_map
from dpmot_dist.samplers import (
    STREAM_SAMPLER,
    RowNoise,
    SamplerSpec,
    prior_points,
    prior_scale,
    refine,
)
from dpmot_dist.schedules import Schedule
from dpmot_dist.sources import Source

log = logging.getLogger(__name__)

PLAN = "plan.parquet"
WORKERS = "workers.json"  # the phase-2 actors (names, process ids), for monitoring
SAMPLES_KIND = "samples"
SAMPLES_VERSION = 1
PNG_RANGE = (-1.0, 1.0)  # data values mapped to pixel 0 and 255
_CHUNK_RE = re.compile(r"chunk-(\d+)\.parquet$")
# Options that do not change a single output value (where and how fast it runs).
_RUNTIME_OPTIONS = frozenset(
    {"out", "workers", "cpus_per_worker", "device", "overwrite", "backend", "storage_dtype"}
    | {"batch", "map_batch"}
)


class SampleConfig(Config):
    """Options of ``dpmot sample`` (config-file keys are the field names)."""

    targets: str | None = Field(None, description="targets data set (schedule, step, shape)")
    potential: str | None = Field(None, description="fit output folder (h.npy) or an h .npy")
    model: str = Field(description="gmm:FILE, diffusers:DIR or torchscript:FILE")
    num: int = Field(ge=1, description="number of samples")
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
    schedule: str | dict | None = Field(None, description="vp-linear, vp-cosine, ve or JSON")
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
    overwrite: bool = Field(False, description="replace an existing output")

    @field_validator("shape", mode="before")
    @classmethod
    def _shape_from_flag(cls, v: Any) -> Any:
        """``--shape 3,32,32`` arrives as a string."""
        return [int(float(s)) for s in v.split(",")] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        parse_spec(self.model)
        if not self.from_noise and not (self.targets and self.potential):
            raise ValueError("--targets and --potential are required unless --from-noise")
        if self.from_noise and not (self.targets or self.schedule):
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
    return {} if uri.rstrip("/").lower().endswith(".npy") else storage.read_targets_manifest(uri)


def resolve_run(cfg: SampleConfig) -> RunInfo:
    """Schedule, step M, data shape and h from the targets, the potential and the options."""
    m = _targets_manifest(cfg.targets) if cfg.targets else {}
    if cfg.schedule is not None:
        schedule = parse_schedule(cfg.schedule)
    elif "schedule" in m:
        schedule = Schedule.from_dict(m["schedule"])
    else:
        raise DpmotError(f"{cfg.targets}: no schedule in the targets' manifest; pass --schedule")
    shape = cfg.shape or m.get("data_shape") or m.get("shape") or _model_shape(cfg, schedule)
    shape = tuple(int(s) for s in shape)
    if cfg.from_noise:
        return RunInfo(schedule, schedule.num_steps - 1, shape)
    step = cfg.step if cfg.step is not None else m.get("step")
    if step is None:
        raise DpmotError(f"{cfg.targets}: no step in the targets' manifest; pass --step")
    if not 0 <= step < schedule.num_steps:
        raise DpmotError(f"step {step} outside the schedule's 0..{schedule.num_steps - 1}")
    n, dim = storage.targets_shape(cfg.targets)
    if math.prod(shape) != dim:
        raise DpmotError(f"{cfg.targets}: data shape {list(shape)} does not hold D={dim} values")
    h, source = load_potential(cfg.potential, n)
    return RunInfo(schedule, int(step), shape, h, source)


def _model_shape(cfg: SampleConfig, schedule: Schedule) -> tuple[int, ...]:
    """The data shape a model declares (loads it; only when nothing else gives the shape)."""
    shape = load_model(cfg.model, schedule, "cpu", "float32", cfg.prediction).data_shape
    if shape is None:
        raise DpmotError(f"{cfg.model}: the model does not declare its data shape; pass --shape")
    return shape


def load_potential(uri: str, n: int) -> tuple[np.ndarray, str]:
    """h (n,) float64 and the source measure of a fit output folder (or an h ``.npy``)."""
    source = "gaussian"
    if uri.rstrip("/").lower().endswith(".npy"):
        h = storage.load_npy(uri)
    else:
        if not storage.is_success(uri):
            raise DpmotError(f"{uri}: not a finished fit output (no _SUCCESS); rerun fit")
        manifest_uri = storage.join(uri, storage.MANIFEST)
        if storage.exists(manifest_uri):
            source = storage.read_json(manifest_uri).get("source", "gaussian")
        h = storage.load_npy(storage.join(uri, "h.npy"))
    if h.shape != (n,) or h.dtype.kind != "f" or not np.isfinite(h).all():
        raise DpmotError(f"{uri}: h must be {n} finite floats (one per target), got {h.shape}")
    return h.astype(np.float64), source


# ---------------------------------------------------------------------------------------------
# Output layout


def chunk_name(c: int) -> str:
    return f"chunk-{c:05d}.parquet"


def chunk_ranges(num: int, chunk: int) -> list[tuple[int, int]]:
    """Sample-id ranges [a, b) of the output files."""
    return [(a, min(a + chunk, num)) for a in range(0, num, chunk)]


def written_chunks(out: str) -> set[int]:
    """Numbers of the chunk files present (each written atomically, so complete)."""
    fs, path = storage.url_to_fs(out)
    with storage.storage_errors(out):
        fs.invalidate_cache(path)
        names = fs.ls(path, detail=False) if fs.exists(path) else []
    return {int(m.group(1)) for p in names if (m := _CHUNK_RE.search(p.rsplit("/", 1)[-1]))}


def is_image(shape: tuple[int, ...]) -> bool:
    """C×H×W data with C ∈ {1, 3} and H, W ≥ 8 get PNG bytes."""
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 8


def png_bytes(x: np.ndarray) -> bytes:
    """A C×H×W image with values in [−1, 1] as PNG bytes (8-bit grey or RGB)."""
    from PIL import Image

    lo, hi = PNG_RANGE
    pixels = np.clip(np.rint((x - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def chunk_table(
    sample_ids: np.ndarray, seed: int, ot_index: np.ndarray, nfe: int, x: np.ndarray, png: bool
) -> pa.Table:
    """One output file's rows; x (B, *shape) float32."""
    b = len(sample_ids)
    flat = np.ascontiguousarray(x, np.float32).reshape(b, -1)
    cols = {
        "sample_id": pa.array(sample_ids, pa.int64()),
        "seed": pa.array(np.full(b, seed, np.int64)),
        "ot_index": pa.array(ot_index, pa.int64()),
        "nfe": pa.array(np.full(b, nfe, np.int32)),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
    }
    if png:
        cols["png"] = pa.array([png_bytes(xi) for xi in x], pa.binary())
    return pa.table(cols)


def write_table_atomic(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())


# ---------------------------------------------------------------------------------------------
# Phase 2: the workers


@dataclass(frozen=True, kw_only=True)
class ChunkJob:
    """Everything a worker needs to turn a chunk's plan into its output file."""

    out: str
    model: str
    prediction: str
    device: str
    dtype: str
    schedule: dict
    t_start: int
    data_shape: tuple[int, ...]
    sampler: SamplerSpec
    from_noise: bool
    seed: int
    png: bool
    batch: int
    threads: int | None = None


class ChunkWriter:
    """Loads the model once; ``write`` refines one chunk and writes its file atomically.

    Runs as a Ray actor (phase 2 with workers) or in process.
    """

    def __init__(self, job: ChunkJob) -> None:
        from dpmot_dist.shards import resolve_device

        if job.threads:
            torch.set_num_threads(job.threads)
        self.job = job
        self.device = torch.device(resolve_device(job.device))
        self.schedule = Schedule.from_dict(job.schedule)
        self.model = load_model(job.model, self.schedule, self.device, job.dtype, job.prediction)
        declared = self.model.data_shape
        if declared is not None and math.prod(declared) != math.prod(job.data_shape):
            raise DpmotError(
                f"{job.model}: model data shape {list(declared)} does not match the data's "
                f"{list(job.data_shape)}"
            )

    def pid(self) -> int:
        return os.getpid()

    def generate(
        self, sample_ids: np.ndarray, x_start: np.ndarray | None
    ) -> tuple[np.ndarray, int]:
        """Refined samples (B, *shape) float32 and the NFE each used."""
        job, out, nfe = self.job, [], 0
        for a in range(0, len(sample_ids), job.batch):
            ids = sample_ids[a : a + job.batch]
            if x_start is None:
                z = prior_points(Source(), job.seed, ids, math.prod(job.data_shape))
                x = z.reshape(len(ids), *job.data_shape) * prior_scale(self.schedule)
            else:
                x = torch.from_numpy(np.array(x_start[a : a + job.batch], np.float32))
                x = x.reshape(len(ids), *job.data_shape)
            noise = RowNoise(job.seed, ids, job.data_shape, STREAM_SAMPLER, self.device)
            x, nfe = refine(
                job.sampler,
                self.model,
                x.to(self.device),
                job.t_start,
                noise,
                from_noise=job.from_noise,
            )
            out.append(x.float().cpu().numpy())
        return np.concatenate(out), nfe

    def write(
        self, chunk: int, sample_ids: np.ndarray, ot_index: np.ndarray, x_start: np.ndarray | None
    ) -> dict[str, Any]:
        """Generate chunk ``chunk`` and write it; returns its statistics."""
        t0 = time.perf_counter()
        x, nfe = self.generate(sample_ids, x_start)
        t1 = time.perf_counter()
        if not np.isfinite(x).all():
            log.warning(
                "chunk %d: %d non-finite samples", chunk, int((~np.isfinite(x)).any(1).sum())
            )
        table = chunk_table(sample_ids, self.job.seed, ot_index, nfe, x, self.job.png)
        write_table_atomic(storage.join(self.job.out, chunk_name(chunk)), table)
        t2 = time.perf_counter()
        return {
            "chunk": chunk,
            "rows": len(sample_ids),
            "nfe": nfe,
            "t_gen": t1 - t0,
            "t_write": t2 - t1,
        }


@dataclass
class ChunkTask:
    chunk: int
    sample_ids: np.ndarray
    ot_index: np.ndarray
    x_start: Any  # (B, D) array, a Ray object ref to one, or None (from noise)


class Progress:
    """A progress bar on a terminal, a log line every ~5% of the chunks otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.bar = total, 0, None
        self.every = max(1, total // 20)
        if sys.stderr.isatty() and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="chunk", desc="sample")

    def update(self, stats: dict) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.done % self.every == 0 or self.done == self.total:
            log.info(
                "chunk %d written (%d/%d): %d samples in %.2f s",
                stats["chunk"],
                self.done,
                self.total,
                stats["rows"],
                stats["t_gen"] + stats["t_write"],
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_local(job: ChunkJob, tasks: list[ChunkTask]) -> list[dict]:
    """Phase 2 in this process: one worker, chunk after chunk."""
    if not tasks:
        return []
    worker, progress, stats = ChunkWriter(job), Progress(len(tasks)), []
    try:
        for t in tasks:
            stats.append(worker.write(t.chunk, t.sample_ids, t.ot_index, t.x_start))
            progress.update(stats[-1])
    finally:
        progress.close()
    return stats


def _unwrap(e: Exception) -> Exception:
    """The user-facing error inside a Ray task error (a DpmotError keeps its one line)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, DpmotError) else e


def run_ray(
    job: ChunkJob, tasks: list[ChunkTask], workers: int, cpus: float, inflight: int = 2
) -> list[dict]:
    """Phase 2 on ``workers`` Ray actors, ``inflight`` chunks queued on each.

    A chunk whose actor dies goes back to the queue for the others (and Ray restarts an actor
    once); when no worker is left the run stops with an error, and a rerun writes the chunks
    still missing.
    """
    import ray
    from ray.exceptions import RayActorError

    if not tasks:
        return []
    gpus = 1 if job.device.startswith("cuda") or (job.device == "auto" and _cluster_gpus()) else 0
    options = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 1, "max_task_retries": 1}
    job = replace(job, threads=max(1, int(cpus)))
    names = [f"dpmot-sample-{uuid.uuid4().hex[:8]}-{i}" for i in range(min(workers, len(tasks)))]
    actors = [ray.remote(ChunkWriter).options(name=name, **options).remote(job) for name in names]
    try:
        pids = ray.get([a.pid.remote() for a in actors])
    except Exception as e:
        for a in actors:
            ray.kill(a)
        raise _actor_error(e) from None
    storage.write_json_atomic(storage.join(job.out, WORKERS), {"actors": names, "pids": pids})
    pending, running, load = list(reversed(tasks)), {}, dict.fromkeys(actors, 0)
    progress, stats = Progress(len(tasks)), []

    def fill() -> None:
        for a in list(load):
            while load[a] < inflight and pending:
                t = pending.pop()
                running[a.write.remote(t.chunk, t.sample_ids, t.ot_index, t.x_start)] = (a, t)
                load[a] += 1

    try:
        fill()
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, task = running.pop(ref)
            try:
                stats.append(ray.get(ref))
                progress.update(stats[-1])
            except RayActorError as e:
                pending.append(task)
                if actor in load:
                    del load[actor]
                    log.warning("sample worker lost (%s); %d left", type(e).__name__, len(load))
                if not load:
                    raise DpmotError(
                        f"{job.out}: every sample worker died; rerun the same command to "
                        "write the missing chunks"
                    ) from None
            except Exception as e:
                raise _unwrap(e) from None
            else:
                load[actor] -= 1
            fill()
    finally:
        progress.close()
        for a in actors:
            ray.kill(a)
    return stats


def _cluster_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _actor_error(e: Exception) -> Exception:
    """The creation error of a worker (e.g. an unreadable model) as a one-line DpmotError."""
    inner = _unwrap(e)
    if isinstance(inner, DpmotError):
        return inner
    text = str(e)
    found = re.search(r"DpmotError: (.+)", text)
    reason = found.group(1).strip() if found else text.strip().splitlines()[0][:300]
    return DpmotError(f"sample worker failed to start: {reason}")


# ---------------------------------------------------------------------------------------------
# Phase 1: the plan


def plan_table(plan: MapPlan, seed: int, fingerprint: dict) -> pa.Table:
    n = len(plan.ot_index)
    table = pa.table(
        {
            "sample_id": pa.array(np.arange(n, dtype=np.int64)),
            "seed": pa.array(np.full(n, seed, np.int64)),
            "ot_index": pa.array(plan.ot_index, pa.int64()),
            "partner": pa.array(plan.partner, pa.int64()),
            "weight": pa.array(plan.weight, pa.float32()),
        }
    )
    return table.replace_schema_metadata({"dpmot.fingerprint": json.dumps(fingerprint)})


def read_plan(out: str) -> tuple[MapPlan, dict] | None:
    """The saved plan and the fingerprint of the run that wrote it (None when absent)."""
    uri = storage.join(out, PLAN)
    if not storage.exists(uri):
        return None
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        fp = json.loads(table.schema.metadata[b"dpmot.fingerprint"])
        cols = {c: table.column(c).to_numpy() for c in ("ot_index", "partner", "weight")}
    except (pa.ArrowException, KeyError, ValueError) as e:
        raise DpmotError(f"{uri}: unreadable plan ({e}); pass --overwrite") from None
    return MapPlan(cols["ot_index"], cols["partner"], cols["weight"]), fp


def check_same_run(out: str, fp: dict, theirs: dict) -> None:
    """An existing output must come from the same options."""
    diff = sorted(k for k in set(fp) | set(theirs) if fp.get(k) != theirs.get(k))
    if diff:
        k = diff[0]
        raise DpmotError(
            f"{out}: holds a run with other options ({k}: {theirs.get(k)!r} there, "
            f"{fp.get(k)!r} now); pass --overwrite or another --out"
        )


def make_plan(cfg: SampleConfig, info: RunInfo) -> tuple[MapPlan, TargetRows | None]:
    """Phase 1's search: every sample's OT cell (and interp partner) via the ShardPool."""
    from dpmot_dist.shards import ShardPool

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
    plans, rows = [], []
    try:
        for a in range(0, cfg.num, cfg.map_batch):
            plan, r = plan_map(
                pool,
                info.h,
                ids[a : a + cfg.map_batch],
                cfg.seed,
                mode=cfg.map,
                k=cfg.k,
                angle=cfg.angle,
                w_max=cfg.interp_max,
                source=source,
                targets_uri=cfg.targets,
                batch=cfg.map_batch,
            )
            plans.append(plan)
            rows.append(r)
    finally:
        pool.close()
    cached = rows[0] if len(rows) == 1 else None  # reuse interp's rows when in one wave
    return MapPlan.concat(plans), cached


def chunk_tasks(
    cfg: SampleConfig, plan: MapPlan, missing: list[int], rows: TargetRows | None
) -> list[ChunkTask]:
    """The tasks of the missing chunks, with their mapped x_M read from the targets."""
    ranges = chunk_ranges(cfg.num, cfg.chunk)
    tasks = []
    for c in missing:
        a, b = ranges[c]
        tasks.append(ChunkTask(c, np.arange(a, b, dtype=np.int64), plan.ot_index[a:b], None))
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
        manifest = storage.read_json(storage.join(cfg.out, storage.MANIFEST))
        check_same_run(cfg.out, fp, manifest.get("fingerprint", {}))
        log.info("%s is complete (_SUCCESS present); nothing to do", cfg.out)
        return {"out": cfg.out, "num": cfg.num, "complete": True, "written": 0, "chunks_written": 0}
    info = resolve_run(cfg)  # checks the inputs before anything is written
    storage.prepare_output(cfg.out, overwrite=cfg.overwrite, resume=not cfg.overwrite)
    if cfg.workers:
        from dpmot_dist.fit import ensure_ray

        ensure_ray()
    n_chunks = len(chunk_ranges(cfg.num, cfg.chunk))
    saved = read_plan(cfg.out)
    if saved is not None:
        check_same_run(cfg.out, fp, saved[1])
    missing = sorted(set(range(n_chunks)) - written_chunks(cfg.out))
    log.info("%s: %d of %d chunks to write", cfg.out, len(missing), n_chunks)

    t0 = time.perf_counter()
    rows = None
    if saved is None:
        plan, rows = make_plan(cfg, info)
        write_table_atomic(storage.join(cfg.out, PLAN), plan_table(plan, cfg.seed, fp))
    else:
        plan = saved[0]
    t_search = time.perf_counter() - t0
    tasks = chunk_tasks(cfg, plan, missing, rows)
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
        png=cfg.png == "auto" and is_image(info.data_shape),
        batch=cfg.batch,
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
    written = sum(s["rows"] for s in stats)
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
        "worker_seconds": sum(s["t_gen"] + s["t_write"] for s in stats),
    }
    manifest = _manifest(cfg, info, job, n_chunks, nfe, fp, throughput)
    storage.write_json_atomic(storage.join(cfg.out, storage.MANIFEST), manifest)
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


def _nfe_on_disk(out: str) -> int:
    """The NFE recorded in chunk 0 (when this run wrote no chunk itself)."""
    data = storage.read_bytes(storage.join(out, chunk_name(0)))
    return int(pq.read_table(io.BytesIO(data), columns=["nfe"]).column("nfe")[0].as_py())


def _manifest(cfg, info: RunInfo, job: ChunkJob, n_chunks: int, nfe: int, fp, throughput) -> dict:
    columns = ["sample_id", "seed", "ot_index", "nfe", "x"] + (["png"] if job.png else [])
    return {
        "kind": SAMPLES_KIND,
        "version": SAMPLES_VERSION,
        "dpmot_dist": __version__,
        "num": cfg.num,
        "dim": info.dim,
        "data_shape": list(info.data_shape),
        "chunk": cfg.chunk,
        "files": [chunk_name(c) for c in range(n_chunks)],
        "columns": columns,
        "png": job.png,
        **({"png_range": list(PNG_RANGE)} if job.png else {}),
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


def read_samples(out: str) -> tuple[dict, pa.Table]:
    """A finished samples data set: its manifest and all its rows, ordered by sample_id."""
    if not storage.is_success(out):
        raise DpmotError(f"{out}: not a finished samples data set (no _SUCCESS)")
    m = storage.read_json(storage.join(out, storage.MANIFEST))
    if m.get("kind") != SAMPLES_KIND:
        raise DpmotError(f"{out}: not a samples data set (manifest kind {m.get('kind')!r})")
    tables = [
        pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, f)))) for f in m["files"]
    ]
    return m, pa.concat_tables(tables).sort_by("sample_id")


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of options (flat, or under 'sample:')")
    add_model_flags(parser, SampleConfig)


def cli_main(args: argparse.Namespace) -> int:
    cfg = config_from_args(SampleConfig, args, "sample")
    s = run_sample(cfg)
    if s["complete"]:
        print(f"{cfg.out}: already complete ({cfg.num} samples); nothing written")
        return 0
    print(
        f"wrote {s['written']} samples ({s['chunks_written']} chunks, NFE {s['nfe']}) to "
        f"{cfg.out}: {s['samples_per_s']:.4g} samples/s, {s['model_evals_per_s']:.4g} model "
        f"evaluations/s; map {100 * s['map_fraction']:.1f}% of phase-2 time"
    )
    return 0
