"""Targets sharded over Ray actors: each holds rows [start, stop) on its own device.

The driver owns h. Each iteration it puts h in the object store once; every actor
regenerates the same noise stream from (seed, key, micro-batch), searches its own rows
and returns only (best exact score, best global index) per sample. The driver merges the
K answers: the highest score wins, and on equal scores the lowest shard (hence the lowest
index), which is the single-process answer bit for bit (see :mod:`dpmot_dist.ot.search`).

Actors are stateless apart from their slice of targets: one that dies is restarted by
Ray (``max_restarts``), reloads its shard in ``__init__`` and the pending call is retried
(``max_task_retries``); since a call is a pure function of (h, key), the fit is unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets
from dpmot_dist.ot.assign import LocalAssigner, StreamAssigner, batch_sizes
from dpmot_dist.ot.search import TargetIndex, merge_topk
from dpmot_dist.ot.sources import Source
from dpmot_dist.runtime import remote_error, resolve_device, set_threads

log = logging.getLogger(__name__)


def shard_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """K contiguous row ranges covering [0, n), sizes differing by at most one."""
    edges = np.linspace(0, n, workers + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


class ShardWorker:
    """One shard's search over a noise stream; run as a Ray actor or in process."""

    def __init__(
        self,
        targets_uri: str,
        start: int,
        stop: int,
        *,
        backend: str = "auto",
        storage_dtype: str = "float32",
        device: str = "cpu",
        source: dict | None = None,
        seed: int = 0,
        chunk: int = 4096,
        threads: int | None = None,
    ) -> None:
        set_threads(threads)
        self.start, self.stop = start, stop
        y = datasets.load_targets(targets_uri, start, stop)
        self.index = TargetIndex(
            y,
            backend=backend,
            storage_dtype=storage_dtype,
            device=resolve_device(device),
            offset=start,
        )
        self.local = LocalAssigner(self.index, Source(**(source or {})), seed, chunk)

    def pid(self) -> int:
        return os.getpid()

    def stream_topk(
        self, h: np.ndarray, key: tuple[int, ...], batches: tuple[int, int], samples: int, k: int
    ):
        """Exact top-k over this shard for micro-batches [b0, b1) of the stream ``key``.

        Returns (values (B', k) float64, global indices (B', k) int64, seconds searching).
        """
        t0 = time.perf_counter()
        h_local = np.asarray(h[self.start : self.stop], np.float64)
        v, i = self.local.stream_topk(h_local, key, samples, k, batches)
        values, indices = v.cpu().numpy(), i.cpu().numpy()
        return values, indices, time.perf_counter() - t0

    def search(self, x: np.ndarray, h: np.ndarray, k: int):
        """Exact top-k of given points over this shard: (values, global indices)."""
        h_local = torch.from_numpy(np.asarray(h[self.start : self.stop], np.float64))
        v, i = self.index.search(torch.as_tensor(x), h_local, k)
        return v.cpu().numpy(), i.cpu().numpy()


def merge_shards(parts: list[tuple[np.ndarray, np.ndarray]], k: int):
    """Global exact top-k from the shards' answers, listed in shard (= index) order.

    For k = 1 a running fold keeps a shard's winner only when strictly better, so equal
    scores keep the earlier shard, i.e. the lowest index: the same answer as
    :func:`~dpmot_dist.ot.search.merge_topk`, about 10× faster on the driver.
    """
    if k > 1:
        v, i = merge_topk(parts, k)
        return v.numpy(), i.numpy()
    best_v, best_i = parts[0][0].copy(), parts[0][1].copy()
    for v, i in parts[1:]:
        better = v > best_v
        np.copyto(best_v, v, where=better)
        np.copyto(best_i, i, where=better)
    return best_v, best_i


class ShardPool(StreamAssigner):
    """K shard workers (Ray actors, or one in-process worker when ``workers == 0``).

    Implements the solver's assigner interface (``assign``, ``score_gap``) with the
    driver-side reduce, and ``search(x, h, k)`` for the sampler's map.
    """

    def __init__(
        self, handles: list, bounds: list[tuple[int, int]], dim: int, chunk: int, waves: int = 4
    ) -> None:
        self.handles, self.bounds, self.dim, self.chunk = handles, bounds, dim, chunk
        self.n = bounds[-1][1]
        self.waves = waves
        self.remote = not isinstance(handles[0], ShardWorker)

    @classmethod
    def create(
        cls,
        targets_uri: str,
        *,
        workers: int = 0,
        backend: str = "auto",
        storage_dtype: str = "float32",
        device: str = "cpu",
        source: Source | None = None,
        seed: int = 0,
        chunk: int = 4096,
        cpus_per_worker: float = 1.0,
        max_restarts: int = 3,
    ) -> ShardPool:
        """Start the workers, each loading only its own rows of ``targets_uri``."""
        n, dim = datasets.targets_shape(targets_uri)
        kwargs = {
            "backend": backend,
            "storage_dtype": storage_dtype,
            "device": device,
            "source": asdict(source or Source()),
            "seed": seed,
            "chunk": chunk,
        }
        if workers == 0:
            pool = cls([ShardWorker(targets_uri, 0, n, **kwargs)], [(0, n)], dim, chunk)
            return pool._stream_of(source, seed, device)
        import ray

        if workers > n:
            raise DpmotError(f"{targets_uri}: {workers} workers for only {n} targets")
        gpus = 1 if resolve_device(device) == "cuda" else 0
        actor = ray.remote(ShardWorker).options(
            num_cpus=cpus_per_worker,
            num_gpus=gpus,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )
        threads = max(1, int(cpus_per_worker))
        bounds = shard_bounds(n, workers)
        handles = [actor.remote(targets_uri, a, b, threads=threads, **kwargs) for a, b in bounds]
        pool = cls(handles, bounds, dim, chunk)._stream_of(source, seed, device)
        try:
            pool.pids()  # surfaces load errors (missing object, NaN, ...) now
        except Exception as e:
            pool.close()
            raise remote_error(e) from None
        return pool

    def _stream_of(self, source: Source | None, seed: int, device: str) -> ShardPool:
        """Record the workers' noise stream, so the driver can regenerate single rows."""
        self.source, self.seed = source or Source(), seed
        self.stream_device = resolve_device(device)
        return self

    def pids(self) -> list[int]:
        """Process ids of the workers (for monitoring, and for fault-injection tests)."""
        if not self.remote:
            return [os.getpid()]
        import ray

        return ray.get([w.pid.remote() for w in self.handles])

    def stream_topk(self, h, key, samples, k):
        values, indices, _ = self._stream(h, key, samples, k)
        return torch.from_numpy(values), torch.from_numpy(indices)

    def timed_topk(self, h, key, samples, k):
        """Merged top-k of the stream and the split of its time (driver-side reduce)."""
        t0 = time.perf_counter()
        values, indices, t = self._stream(h, key, samples, k)
        timings = {
            "t_search": t["search"],
            "t_reduce": t["reduce"],
            "t_transfer": max(0.0, time.perf_counter() - t0 - t["search"] - t["reduce"]),
            "bytes_moved": t["bytes"],
        }
        return torch.from_numpy(values), torch.from_numpy(indices), timings

    def _stream(self, h, key, samples, k):
        """Submit every wave of micro-batches, then merge each wave as it arrives."""
        nb = len(batch_sizes(samples, self.chunk))
        edges = np.linspace(0, nb, min(self.waves, nb) + 1).round().astype(int)
        waves = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
        if not self.remote:
            v, i, s = self.handles[0].stream_topk(h, key, (0, nb), samples, k)
            return v, i, {"search": s, "reduce": 0.0, "bytes": 0}
        import ray

        h_ref = ray.put(np.asarray(h, np.float64))
        futures = [
            [w.stream_topk.remote(h_ref, key, wave, samples, k) for w in self.handles]
            for wave in waves
        ]
        out_v, out_i, search, reduce, nbytes = [], [], [0.0] * len(self.handles), 0.0, 0
        for wave in futures:
            try:
                parts = ray.get(wave)
            except Exception as e:
                raise remote_error(e) from None
            t0 = time.perf_counter()
            for j, (_, _, s) in enumerate(parts):
                search[j] += s
            v, i = merge_shards([(p[0], p[1]) for p in parts], k)
            out_v.append(v)
            out_i.append(i)
            nbytes += sum(p[0].nbytes + p[1].nbytes for p in parts)
            reduce += time.perf_counter() - t0
        nbytes += len(self.handles) * np.asarray(h).nbytes
        timing = {"search": max(search), "reduce": reduce, "bytes": nbytes}
        return np.concatenate(out_v), np.concatenate(out_i), timing

    def search_points(self, x, h, k):
        return self.search(x, h, k)

    def search(self, x, h: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact merged top-k of the points x (B, D) over all shards (values, indices)."""
        x = np.ascontiguousarray(torch.as_tensor(x, dtype=torch.float32).cpu().numpy())
        if not self.remote:
            return self.handles[0].search(x, h, k)
        import ray

        refs = ray.put(x), ray.put(np.asarray(h, np.float64))
        try:
            parts = ray.get([w.search.remote(refs[0], refs[1], k) for w in self.handles])
        except Exception as e:
            raise remote_error(e) from None
        return merge_shards(parts, k)

    def close(self) -> None:
        """Stop the actors this pool started."""
        if self.remote:
            import ray

            for w in self.handles:
                ray.kill(w)
        self.handles = []
