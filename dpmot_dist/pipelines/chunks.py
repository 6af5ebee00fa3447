"""Phase 2 of ``sample``: workers that refine planned samples and write one Parquet file each.

A worker (:class:`ChunkWriter`: a Ray actor that loads the model once, or one in-process
instance) takes a chunk's sample ids and mapped points x_M, refines them from step M to 0
(:func:`dpmot_dist.diffusion.samplers.refine`), decodes latents to images when the run has a
VAE (:meth:`dpmot_dist.diffusion.vae.VaeSpec.decode`, on the worker's device, in batches) and
writes ``chunk-00000.parquet`` atomically::

    sample_id: int64, seed: int64, ot_index: int64 (−1 from noise), label: int64 (labelled
    runs: the OT winner's class, or the drawn class of a from-noise sample), nfe: int32,
    x: fixed_size_list<float32>[D] (data shape in the manifest),
    png: binary (images only: x itself, or the image decoded from the latent x)

A class-conditional model is called with each sample's label (and classifier-free guidance,
:class:`~dpmot_dist.diffusion.models.ClassConditioned`).

:func:`run_local` and :func:`run_ray` hand the chunks to the workers; a chunk whose actor dies
goes back to the queue. Since a sample is a pure function of (seed, sample_id), a chunk
written twice holds the same rows; a chunk file is committed first-writer-wins, so of two runs
writing one output the first to finish a chunk keeps it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dpmot_dist.diffusion.models import DTYPES, ClassConditioned, load_model
from dpmot_dist.diffusion.samplers import (
    STREAM_SAMPLER,
    RowNoise,
    SamplerSpec,
    prior_points,
    prior_scale,
    refine,
)
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.diffusion.vae import VaeSpec
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, storage
from dpmot_dist.ot.sources import Source
from dpmot_dist.runtime import actor_error, gpus_per_actor, remote_error, resolve_device

log = logging.getLogger(__name__)

PNG_RANGE = (-1.0, 1.0)  # data values mapped to pixel 0 and 255


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
    sample_ids: np.ndarray,
    seed: int,
    ot_index: np.ndarray,
    nfe: int,
    x: np.ndarray,
    png: bool,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> pa.Table:
    """One output file's rows; x (B, *shape) float32. ``images`` (B, C, H, W), decoded from
    the latents x, are what the PNG bytes show (x itself otherwise); ``labels`` (B,)."""
    b = len(sample_ids)
    flat = np.ascontiguousarray(x, np.float32).reshape(b, -1)
    cols = {
        "sample_id": pa.array(sample_ids, pa.int64()),
        "seed": pa.array(np.full(b, seed, np.int64)),
        "ot_index": pa.array(ot_index, pa.int64()),
    }
    if labels is not None:
        cols["label"] = pa.array(np.asarray(labels, np.int64))
    cols |= {
        "nfe": pa.array(np.full(b, nfe, np.int32)),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
    }
    if png:
        shown = x if images is None else images
        cols["png"] = pa.array([png_bytes(xi) for xi in shown], pa.binary())
    return pa.table(cols)


def write_table_atomic(uri: str, table: pa.Table, exclusive: bool = False) -> bool:
    """Write a Parquet file atomically; ``exclusive``: only if no other run wrote it first
    (:func:`~dpmot_dist.io.storage.create_exclusive`). True when this call wrote it."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    if exclusive:
        return storage.create_exclusive(uri, sink.getvalue().to_pybytes())
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    return True


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
    vae: VaeSpec | None = None  # decode the refined latents with it
    conditional: bool = False  # a TorchScript model takes labels: model(x_t, t, y)
    guidance: float = 1.0  # classifier-free guidance scale s (1: none)
    null_class: int | None = None  # the null class id of guidance


class ChunkWriter:
    """Loads the model once; ``write`` refines one chunk and writes its file atomically.

    Runs as a Ray actor (phase 2 with workers) or in process.
    """

    def __init__(self, job: ChunkJob) -> None:
        if job.threads:
            torch.set_num_threads(job.threads)
        self.job = job
        self.device = torch.device(resolve_device(job.device))
        self.schedule = Schedule.from_dict(job.schedule)
        self.model = load_model(
            job.model, self.schedule, self.device, job.dtype, job.prediction, job.conditional
        )
        declared = self.model.data_shape
        if declared is not None and math.prod(declared) != math.prod(job.data_shape):
            raise DpmotError(
                f"{job.model}: model data shape {list(declared)} does not match the data's "
                f"{list(job.data_shape)}"
            )
        if job.vae is not None:
            job.vae.load(self.device, DTYPES[job.dtype])

    def pid(self) -> int:
        return os.getpid()

    def conditioned(self, labels: np.ndarray | None):
        """The model with a batch's labels bound (itself when it is not class-conditional)."""
        if not getattr(self.model, "conditional", False):
            return self.model
        if labels is None:
            raise DpmotError(f"{self.job.model}: a class-conditional model needs labels")
        y = torch.from_numpy(np.asarray(labels, np.int64))
        return ClassConditioned(self.model, y, self.job.guidance, self.job.null_class)

    def generate(
        self, sample_ids: np.ndarray, x_start: np.ndarray | None, labels: np.ndarray | None = None
    ) -> tuple[np.ndarray, int]:
        """Refined samples (B, *shape) float32 and the NFE each used; ``labels`` (B,)."""
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
                self.conditioned(None if labels is None else labels[a : a + job.batch]),
                x.to(self.device),
                job.t_start,
                noise,
                from_noise=job.from_noise,
            )
            out.append(x.float().cpu().numpy())
        return np.concatenate(out), nfe

    def decode(self, x: np.ndarray) -> np.ndarray | None:
        """Images (B, C, H, W) float32 decoded from latents x (B, c, h, w); None without a VAE."""
        if self.job.vae is None:
            return None
        z = torch.from_numpy(x)
        return self.job.vae.decode(z, self.device, DTYPES[self.job.dtype]).cpu().numpy()

    def write(
        self,
        chunk: int,
        sample_ids: np.ndarray,
        ot_index: np.ndarray,
        x_start: np.ndarray | None,
        labels: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Generate chunk ``chunk`` and write it; returns its statistics."""
        t0 = time.perf_counter()
        x, nfe = self.generate(sample_ids, x_start, labels)
        t1 = time.perf_counter()
        if not np.isfinite(x).all():
            log.warning(
                "chunk %d: %d non-finite samples", chunk, int((~np.isfinite(x)).any(1).sum())
            )
        images = self.decode(x)
        t2 = time.perf_counter()
        table = chunk_table(
            sample_ids, self.job.seed, ot_index, nfe, x, self.job.png, images=images, labels=labels
        )
        uri = storage.join(self.job.out, datasets.chunk_name(chunk))
        committed = write_table_atomic(uri, table, exclusive=True)
        if not committed:
            log.info("%s: already written by another run; kept", uri)
        t3 = time.perf_counter()
        return {
            "chunk": chunk,
            "committed": committed,
            "rows": len(sample_ids),
            "nfe": nfe,
            "t_gen": t1 - t0,
            "t_decode": 0.0 if images is None else t2 - t1,
            "t_write": t3 - t2,
        }


@dataclass
class ChunkTask:
    chunk: int
    sample_ids: np.ndarray
    ot_index: np.ndarray
    x_start: Any  # (B, D) array, a Ray object ref to one, or None (from noise)
    labels: np.ndarray | None = None  # (B,) class ids of labelled runs


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
                stats["t_gen"] + stats["t_decode"] + stats["t_write"],
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
            stats.append(worker.write(t.chunk, t.sample_ids, t.ot_index, t.x_start, t.labels))
            progress.update(stats[-1])
    finally:
        progress.close()
    return stats


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
    gpus = gpus_per_actor(job.device)
    options = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 1, "max_task_retries": 1}
    job = replace(job, threads=max(1, int(cpus)))
    names = [f"dpmot-sample-{uuid.uuid4().hex[:8]}-{i}" for i in range(min(workers, len(tasks)))]
    actors = [ray.remote(ChunkWriter).options(name=name, **options).remote(job) for name in names]
    try:
        pids = ray.get([a.pid.remote() for a in actors])
    except Exception as e:
        for a in actors:
            ray.kill(a)
        raise actor_error(e, "sample worker") from None
    storage.write_json_atomic(
        storage.join(job.out, datasets.WORKERS), {"actors": names, "pids": pids}
    )
    pending, running, load = list(reversed(tasks)), {}, dict.fromkeys(actors, 0)
    progress, stats = Progress(len(tasks)), []

    def fill() -> None:
        for a in list(load):
            while load[a] < inflight and pending:
                t = pending.pop()
                ref = a.write.remote(t.chunk, t.sample_ids, t.ot_index, t.x_start, t.labels)
                running[ref] = (a, t)
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
                raise remote_error(e) from None
            else:
                load[actor] -= 1
            fill()
    finally:
        progress.close()
        for a in actors:
            ray.kill(a)
    return stats
