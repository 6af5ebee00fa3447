"""Targets sharded over Ray actors in R replica groups × G shards; statistics where the points are.

Every replica group holds all N targets, split G ways: shard actor j holds rows
[start_j, stop_j) on its own device. Each iteration the driver puts h in the object store
once and splits the stream's micro-batches into R contiguous shares (the same streams as a
single process, partitioned by micro-batch index); group r regenerates the noise of its
share from (seed, key, micro-batch) and returns the share's cell statistics
(:class:`~dpmot_dist.ot.assign.Assignment`: counts, Σu, soft masses, snapshot counts):

- with G = 1 the shard actor computes them itself (it holds every target);
- with G > 1 the group's :class:`GroupReducer` actor receives its shards' per-point exact
  top-k through the object store (actor to actor: the driver only passes references),
  merges them (highest score, ties to the lowest index) and computes the statistics. For the
  snapshot control variate the shards return each point's exact winner under h and under
  h_s when their search finds both at once (the CPU's compiled top-1 kernel), else their
  top-k at h, and the reducer asks them to search again the rows it could not certify.

So the driver receives R Assignments per iteration — a few N-vectors — whatever the batch
or the source, and sums them in group order: integer counts exactly, so any (R, G) gives the
same h as one process for the same seed; float sums in a fixed order, so repeated runs are
identical too.

Actors are stateless apart from their slice of targets (the source and h come with every
call): one that dies is restarted by Ray (``max_restarts``), reloads its shard in
``__init__``, and the pending call is retried (``max_task_retries``); since a call is a pure
function of its arguments, the fit is unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets
from dpmot_dist.ot.assign import (
    Assignment,
    LocalAssigner,
    assignment_from_topk,
    batch_sizes,
    combine,
    pair_statistics,
    snapshot_statistics,
    stream_projections,
)
from dpmot_dist.ot.search import STORAGE_DTYPES, TargetIndex, merge_topk
from dpmot_dist.ot.sources import Source
from dpmot_dist.runtime import remote_error, resolve_device, set_threads

log = logging.getLogger(__name__)


def shard_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """K contiguous row ranges covering [0, n), sizes differing by at most one."""
    edges = np.linspace(0, n, workers + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def shares(n_batches: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous micro-batch ranges [b0, b1) of an iteration, one per replica group."""
    return shard_bounds(n_batches, groups) if n_batches else [(0, 0)] * groups


def shards_for_memory(n: int, dim: int, storage_dtype: str, budget: float) -> int:
    """The smallest G whose share of the targets fits ``budget`` bytes per shard actor: the
    storage copy the candidate search reads plus the fp32 copy of the exact re-score."""
    itemsize = STORAGE_DTYPES[storage_dtype].itemsize
    per_row = dim * (4 + (itemsize if itemsize != 4 else 0))
    return max(1, math.ceil(n * per_row / budget))


def default_shard_memory(device: str, actors: int) -> float:
    """A safe memory budget per shard actor: 70% of the GPU's memory on CUDA, half of the host
    RAM divided among the ``actors`` on CPU."""
    if resolve_device(device) == "cuda":
        return 0.7 * torch.cuda.get_device_properties(0).total_memory
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return 0.5 * pages * size / max(1, actors)


def merge_shards(parts: list[tuple[np.ndarray, np.ndarray]], k: int):
    """Global exact top-k from the shards' answers, listed in shard (= index) order.

    For k = 1 a running fold keeps a shard's winner only when strictly better, so equal
    scores keep the earlier shard, i.e. the lowest index: the same answer as
    :func:`~dpmot_dist.ot.search.merge_topk`, about 10× faster.
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


def _nbytes(a: Assignment) -> int:
    """Bytes of an Assignment's arrays (what it costs to ship)."""
    arrays = (a.counts, a.hard_counts, a.snap_counts)
    return sum(x.nbytes for x in arrays if x is not None) + 256


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
        self.local = LocalAssigner(self.index, Source(), seed, chunk)

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def _use(self, source: dict) -> None:
        self.local.set_source(Source(**source))

    def _h(self, h: np.ndarray) -> np.ndarray:
        return np.asarray(h[self.start : self.stop], np.float64)

    def topk(self, h, key, samples: int, k: int, batches, source: dict):
        """Exact top-k over this shard of micro-batches [b0, b1) of the stream ``key``.

        Returns (values (B', k) float64, global indices (B', k) int64, seconds searching).
        """
        self._use(source)
        t0 = time.perf_counter()
        v, i = self.local.stream_topk(self._h(h), key, samples, k, batches)
        return v.cpu().numpy(), i.cpu().numpy(), time.perf_counter() - t0

    def fused_top1(self) -> bool:
        """Whether this shard finds the winners under h and h_s in one search (:meth:`top1`)."""
        return self.local.top1_pair

    def top1(self, h, h_snap, key, samples: int, batches, source: dict):
        """Exact winners over this shard under h and h_snap of micro-batches [b0, b1):
        (values (B', 2) float64, global indices (B', 2) int64, seconds searching)."""
        self._use(source)
        t0 = time.perf_counter()
        v, i = self.local.stream_top1([self._h(h), self._h(h_snap)], key, samples, batches)
        return v.cpu().numpy(), i.cpu().numpy(), time.perf_counter() - t0

    def assign(self, h, key, samples: int, epsilon: float, k: int, batches, source: dict):
        """The statistics of micro-batches [b0, b1) (this shard must hold every target)."""
        self._use(source)
        return self.local.assign(self._h(h), key, samples, epsilon, k, batches)

    def assign_snapshot(self, h, h_snap, key, samples: int, k: int, batches, source: dict):
        """The snapshot statistics of micro-batches [b0, b1) (this shard holds every target)."""
        self._use(source)
        return self.local.assign_snapshot(self._h(h), self._h(h_snap), key, samples, k, batches)

    def research(self, h_snap, key, samples: int, rows, batches, source: dict):
        """Exact top-1 over this shard of the stream's points at ``rows`` (counted from the
        first point of micro-batch b0), regenerated here: (values, global indices)."""
        self._use(source)
        x = self.local.stream_rows(key, samples, rows, batches)
        v, i = self.index.search(x, torch.from_numpy(self._h(h_snap)), 1)
        return v.cpu().numpy(), i.cpu().numpy()

    def search(self, x: np.ndarray, h: np.ndarray, k: int):
        """Exact top-k of given points over this shard: (values, global indices)."""
        v, i = self.index.search(torch.as_tensor(x), torch.from_numpy(self._h(h)), k)
        return v.cpu().numpy(), i.cpu().numpy()


class GroupReducer:
    """A replica group's statistics from its G shards' top-k (a Ray actor beside them)."""

    def __init__(self, shards: list, n: int, chunk: int) -> None:
        self.shards, self.n, self.chunk = shards, n, chunk

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def _merged(self, parts, k: int):
        v, i = merge_shards([(p[0], p[1]) for p in parts], k)
        return torch.from_numpy(v), torch.from_numpy(i), max(p[2] for p in parts)

    def assign(self, h, key, samples, epsilon, k, batches, source: dict, *parts):
        t0 = time.perf_counter()
        values, indices, t_search = self._merged(parts, k if epsilon > 0 else 1)
        a = assignment_from_topk(values, indices, self.n, self.chunk, epsilon)
        a.projections = stream_projections(Source(**source), samples, self.chunk, batches)
        a.timings = {"t_search": t_search, "t_reduce": time.perf_counter() - t0}
        return a

    def assign_pair(self, h, h_snap, key, samples, k, batches, source: dict, *parts):
        """Snapshot statistics from the shards' winners under h and h_snap
        (:meth:`ShardWorker.top1`)."""
        t0 = time.perf_counter()
        values, indices, t_search = self._merged(parts, 1)
        a = pair_statistics(values, indices, self.n, self.chunk)
        a.projections = stream_projections(Source(**source), samples, self.chunk, batches)
        a.timings = {"t_search": t_search, "t_reduce": time.perf_counter() - t0}
        return a

    def assign_snapshot(self, h, h_snap, key, samples, k, batches, source: dict, *parts):
        import ray

        t0 = time.perf_counter()
        values, indices, t_search = self._merged(parts, k)

        def research(rows):
            rows = np.asarray(rows, np.int64)
            answers = [
                s.research.remote(h_snap, key, samples, rows, batches, source) for s in self.shards
            ]
            return merge_shards(ray.get(answers), 1)[1][:, 0]

        a = snapshot_statistics(values, indices, h, h_snap, self.n, self.chunk, research)
        a.projections = stream_projections(Source(**source), samples, self.chunk, batches)
        a.timings = {"t_search": t_search, "t_reduce": time.perf_counter() - t0}
        return a


class ShardPool:
    """R replica groups × G shard actors (or one in-process worker), as the solver's
    :class:`~dpmot_dist.ot.assign.Assigner`; ``search(x, h, k)`` serves the sampler's map."""

    def __init__(
        self,
        groups: list[list],
        reducers: list,
        bounds: list[tuple[int, int]],
        dim: int,
        chunk: int,
        source: Source,
        seed: int,
    ) -> None:
        self.groups, self.reducers, self.bounds = groups, reducers, bounds
        self.dim, self.chunk, self.source, self.seed = dim, chunk, source, seed
        self.n = bounds[-1][1]
        self.remote = not isinstance(groups[0][0], ShardWorker)
        self._top1_pair: bool | None = None

    @property
    def top1_pair(self) -> bool:
        """Whether the shards find the winners under h and h_s in one search (asked once)."""
        if self._top1_pair is None:
            worker = self.groups[0][0]
            if self.remote:
                import ray

                self._top1_pair = bool(ray.get(worker.fused_top1.remote()))
            else:
                self._top1_pair = worker.fused_top1()
        return self._top1_pair

    @property
    def replicas(self) -> int:
        return len(self.groups)

    @property
    def shards(self) -> int:
        return len(self.groups[0])

    @property
    def handles(self) -> list:
        """Every actor of the pool: shards group by group, then the reducers."""
        return [w for g in self.groups for w in g] + [r for r in self.reducers if r is not None]

    @classmethod
    def create(
        cls,
        targets_uri: str,
        *,
        workers: int = 0,
        replicas: int | None = None,
        shards: int | None = None,
        backend: str = "auto",
        storage_dtype: str = "float32",
        device: str = "cpu",
        source: Source | None = None,
        seed: int = 0,
        chunk: int = 4096,
        cpus_per_worker: float = 1.0,
        max_restarts: int = 3,
        placement: str = "default",
    ) -> ShardPool:
        """Start the actors, each shard loading only its own rows of ``targets_uri``.

        ``replicas`` × ``shards`` actors (+ one reducer per group when ``shards`` > 1);
        ``workers`` = K alone means 1 × K; nothing (or 0): one in-process worker.
        ``placement`` ``spread``: Ray's SPREAD strategy (actors over as many nodes as can
        take them; an actor whose node dies restarts on another).
        """
        n, dim = datasets.targets_shape(targets_uri)
        source = source or Source()
        kwargs = {"backend": backend, "storage_dtype": storage_dtype, "device": device}
        kwargs.update(seed=seed, chunk=chunk)
        r = replicas or 1
        g = shards or (workers if not replicas else 1) or 0
        if g == 0:
            worker = ShardWorker(targets_uri, 0, n, **kwargs)
            return cls([[worker]], [None], [(0, n)], dim, chunk, source, seed)
        import ray

        if g > n:
            raise DpmotError(f"{targets_uri}: {g} shards for only {n} targets")
        options = {
            "num_cpus": cpus_per_worker,
            "max_restarts": max_restarts,
            "max_task_retries": max_restarts,
        }
        if placement == "spread":
            options["scheduling_strategy"] = "SPREAD"
        gpus = 1 if resolve_device(device) == "cuda" else 0
        shard = ray.remote(ShardWorker).options(num_gpus=gpus, **options)
        threads = max(1, int(cpus_per_worker))
        bounds = shard_bounds(n, g)
        groups = [
            [shard.remote(targets_uri, a, b, threads=threads, **kwargs) for a, b in bounds]
            for _ in range(r)
        ]
        reducer = ray.remote(GroupReducer).options(**{**options, "num_cpus": 0.1})
        reducers = [reducer.remote(grp, n, chunk) if g > 1 else None for grp in groups]
        pool = cls(groups, reducers, bounds, dim, chunk, source, seed)
        try:
            pool.pids()  # surfaces load errors (missing object, NaN, ...) now
        except Exception as e:
            pool.close()
            raise remote_error(e) from None
        return pool

    def set_source(self, source: Source) -> None:
        """Draw every stream from ``source`` from now on (it goes with every call)."""
        self.source = source

    def pids(self) -> list[int]:
        """Process ids of the actors (for monitoring, and for fault-injection tests)."""
        if not self.remote:
            return [os.getpid()]
        import ray

        return ray.get([w.pid.remote() for w in self.handles])

    def layout(self) -> dict:
        """Replicas, shards, row bounds, and every actor's process id and node (monitoring)."""
        out = {"replicas": self.replicas, "shards": self.shards, "bounds": self.bounds}
        if not self.remote:
            return {**out, "pids": [os.getpid()]}
        import ray

        actors = self.handles
        out["pids"] = ray.get([a.pid.remote() for a in actors])
        out["nodes"] = ray.get([a.node_id.remote() for a in actors])
        return out

    # -- statistics -------------------------------------------------------------------------

    def assign(self, h, key, samples: int, epsilon: float = 0.0, k: int = 8) -> Assignment:
        k_eff = k if epsilon > 0 else 1
        return self._statistics("assign", h, None, key, samples, epsilon, k_eff)

    def assign_snapshot(self, h, h_snap, key, samples: int, k: int = 4) -> Assignment:
        return self._statistics("assign_snapshot", h, h_snap, key, samples, None, k)

    def _statistics(self, kind: str, h, h_snap, key, samples, epsilon, k) -> Assignment:
        """Each group's statistics of its share of the micro-batches, summed in group order."""
        t0 = time.perf_counter()
        source = asdict(self.source)
        ranges = shares(len(batch_sizes(samples, self.chunk)), self.replicas)
        extra = () if kind == "assign_snapshot" else (epsilon,)
        if not self.remote:
            head = (h, h_snap) if h_snap is not None else (h,)
            a = getattr(self.groups[0][0], kind)(*head, key, samples, *extra, k, None, source)
            return a
        import ray

        h_ref = ray.put(np.asarray(h, np.float64))
        heads = (h_ref,) if h_snap is None else (h_ref, ray.put(np.asarray(h_snap, np.float64)))
        futures = []
        for group, reducer, batches in zip(self.groups, self.reducers, ranges, strict=True):
            if batches[1] <= batches[0]:
                continue
            args = (*heads, key, samples, *extra, k, batches, source)
            if reducer is None:
                futures.append(getattr(group[0], kind).remote(*args))
                continue
            if kind == "assign_snapshot" and self.top1_pair:
                parts = [s.top1.remote(*heads, key, samples, batches, source) for s in group]
                futures.append(reducer.assign_pair.remote(*args, *parts))
                continue
            parts = [s.topk.remote(h_ref, key, samples, k, batches, source) for s in group]
            futures.append(getattr(reducer, kind).remote(*args, *parts))
        try:
            parts = ray.get(futures)
        except Exception as e:
            raise remote_error(e) from None
        t1 = time.perf_counter()
        a = combine(parts)
        t_reduce = time.perf_counter() - t1
        a.timings = {
            "t_search": a.timings.get("t_search", 0.0),
            "t_reduce": t_reduce,
            "t_transfer": max(0.0, t1 - t0 - a.timings.get("t_search", 0.0)),
            "bytes_moved": sum(_nbytes(p) for p in parts),
            "bytes_out": len(self.handles) * (len(heads) * 8 * self.n),
        }
        return a

    def score_gap(self, key: tuple[int, ...], samples: int) -> float:
        """Median over samples of (best − second-best score) at h = 0 (a one-off probe: the
        top-2 of this small sample comes to the driver)."""
        if self.n < 2:
            return 1.0
        h = np.zeros(self.n)
        source = asdict(self.source)
        batches = (0, len(batch_sizes(samples, self.chunk)))
        group = self.groups[0]
        if not self.remote:
            parts = [group[0].topk(h, key, samples, 2, batches, source)]
        else:
            import ray

            parts = ray.get([s.topk.remote(h, key, samples, 2, batches, source) for s in group])
        values, _ = merge_shards([(p[0], p[1]) for p in parts], 2)
        gaps = torch.from_numpy(values[:, 0] - values[:, 1])
        return float(gaps.median())  # torch's median (the lower middle), as LocalAssigner's

    # -- the sampler's map ------------------------------------------------------------------

    def search(self, x, h: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact merged top-k of the points x (B, D) over one group's shards."""
        x = np.ascontiguousarray(torch.as_tensor(x, dtype=torch.float32).cpu().numpy())
        group = self.groups[0]
        if not self.remote:
            return group[0].search(x, h, k)
        import ray

        refs = ray.put(x), ray.put(np.asarray(h, np.float64))
        try:
            parts = ray.get([w.search.remote(refs[0], refs[1], k) for w in group])
        except Exception as e:
            raise remote_error(e) from None
        return merge_shards(parts, k)

    def close(self) -> None:
        """Stop the actors this pool started."""
        if self.remote:
            import ray

            for w in self.handles:
                ray.kill(w)
        self.groups, self.reducers = [[]], []
