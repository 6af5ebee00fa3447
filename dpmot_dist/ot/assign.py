"""Cell statistics of a batch of source points: the assigners behind the SDOT solver.

For a batch of B source points x_b (a pure function of (seed, stream key, micro-batch), see
:mod:`dpmot_dist.ot.sources`) and the potential h, the solver needs

.. math::
    \\text{count}_i = \\#\\{b : i = \\arg\\max_j \\langle x_b, y_j \\rangle + h_j\\},
    \\qquad \\sum_b u_h(x_b) = \\sum_b \\max_j (\\langle x_b, y_j \\rangle + h_j),

(soft counts softmax_i(s_i / ε) at temperature ε > 0, and the argmax counts at a snapshot
potential h_s for the control variate). An :class:`Assigner` returns them as an
:class:`Assignment`. :class:`LocalAssigner` searches one :class:`~dpmot_dist.ot.search.TargetIndex`
in process; the Ray shard pool of :mod:`dpmot_dist.pipelines.shards` implements the same
interface over many devices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.sources import Source


@dataclass
class Assignment:
    """Monte Carlo cell statistics of one batch of source samples.

    Attributes:
        counts: (N,) samples whose argmax is cell i (int32: 4 bytes a cell to ship), or with
            soft assignments the
            summed probabilities softmax_i((⟨x, y⟩ + h) / ε) (float64).
        u_sum: Σ_x u_h(x) over the samples (float64); soft: Σ_x ε log Σ_i exp(s_i / ε).
        samples: number of samples B (points; with a lattice source, every lattice point).
        projections: source points projected onto the targets to get them (the cost unit:
            N·D flops each); equals ``samples`` for independent points.
        hard_counts: argmax counts when ``counts`` are soft (for the empty-cell test).
        dropped: soft only: an upper bound on the mean probability the top-k drops.
        snap_counts: with a snapshot potential h_s (:meth:`StreamAssigner.assign_snapshot`),
            the argmax counts of the same samples at h_s; ``changed`` is the fraction of
            samples whose cell differs between h and h_s, ``researched`` the number whose
            h_s cell was not certified by their top-k and was searched again.
    """

    counts: np.ndarray
    u_sum: float
    samples: int
    timings: dict = field(default_factory=dict)
    hard_counts: np.ndarray | None = None
    dropped: float = 0.0
    snap_counts: np.ndarray | None = None
    changed: float = 0.0
    researched: int = 0
    projections: int = 0

    def __post_init__(self) -> None:
        self.projections = self.projections or self.samples

    def cell_mass(self) -> np.ndarray:
        """μ̂_i = count_i / B."""
        return self.counts / self.samples


class Assigner(Protocol):
    """Anything that maps the stream (seed, *key) of source samples to cell statistics:
    :class:`LocalAssigner` in process, the Ray shard pool of :mod:`dpmot_dist.pipelines.shards`
    across devices."""

    n: int

    def assign(
        self,
        h: np.ndarray,
        key: tuple[int, ...],
        samples: int,
        epsilon: float = 0.0,
        k: int = 8,
    ) -> Assignment: ...

    def assign_snapshot(
        self, h: np.ndarray, h_snap: np.ndarray, key: tuple[int, ...], samples: int, k: int = 4
    ) -> Assignment: ...

    def score_gap(self, key: tuple[int, ...], samples: int) -> float: ...

    def set_source(self, source: Source) -> None: ...


def batch_sizes(samples: int, chunk: int) -> list[int]:
    """Split ``samples`` into micro-batches of at most ``chunk`` rows (the stream's batches)."""
    return [min(chunk, samples - s) for s in range(0, samples, chunk)]


def stream_points(
    source: Source,
    seed: int,
    key: tuple[int, ...],
    samples: int,
    chunk: int,
    dim: int,
    device: torch.device | str = "cpu",
    batches: tuple[int, int] | None = None,
):
    """Micro-batch b of the stream ``key`` is ``source.draw(size, D, seed, *key, b)``: a
    tensor of points or a :class:`~dpmot_dist.ot.sources.Lattice` (``samples`` counts
    projections).

    ``batches`` = (b0, b1) generates only micro-batches b0 ≤ b < b1.
    """
    sizes = batch_sizes(samples, chunk)
    b0, b1 = batches if batches is not None else (0, len(sizes))
    for b in range(b0, min(b1, len(sizes))):
        yield source.draw(sizes[b], dim, seed, *key, b, device=device)


def stream_projections(
    source: Source, samples: int, chunk: int, batches: tuple[int, int] | None = None
) -> int:
    """Projections the stream of ``samples`` spends in micro-batches ``batches`` (default
    all; lattice batches round up to whole subspaces)."""
    sizes = batch_sizes(samples, chunk)
    b0, b1 = batches if batches is not None else (0, len(sizes))
    return sum(source.projections(s) for s in sizes[b0:b1])


def combine(parts: list[Assignment]) -> Assignment:
    """The statistics of disjoint sets of samples, summed in the order given (integer
    counts exactly; float sums in a fixed order, so a repeated run is bit for bit the same)."""
    first = parts[0]
    samples = sum(a.samples for a in parts)

    def total(name: str):
        if getattr(first, name) is None:
            return None
        out = getattr(first, name).astype(
            np.float64 if first.counts.dtype.kind == "f" else np.int64
        )
        for a in parts[1:]:
            out += getattr(a, name)  # in place, in order: one pass over each N-vector
        return out

    def mean(name: str) -> float:
        return sum(getattr(a, name) * a.samples for a in parts) / max(1, samples)

    timings = {}
    for name in {k for a in parts for k in a.timings}:
        values = [a.timings.get(name, 0.0) for a in parts]
        timings[name] = sum(values) if name.startswith("bytes") else max(values)
    return Assignment(
        counts=total("counts"),
        u_sum=float(sum(a.u_sum for a in parts)),
        samples=samples,
        timings=timings,
        hard_counts=total("hard_counts"),
        dropped=mean("dropped"),
        snap_counts=total("snap_counts") if first.snap_counts is not None else None,
        changed=mean("changed"),
        researched=sum(a.researched for a in parts),
        projections=sum(a.projections for a in parts),
    )


def assignment_from_winners(
    values: torch.Tensor, indices: torch.Tensor, n: int, chunk: int
) -> Assignment:
    """Counts and Σ u_h from each sample's winning score and cell (B,).

    Σ u_h is summed per micro-batch of ``chunk`` rows in float64, in stream order, so every
    assigner that finds the same winners returns bit-identical statistics.
    """
    values, indices = torch.as_tensor(values), torch.as_tensor(indices)
    counts = np.bincount(indices.cpu().numpy(), minlength=n).astype(np.int32)
    u_sum = 0.0
    for start in range(0, len(values), chunk):
        u_sum += float(values[start : start + chunk].double().sum())
    return Assignment(counts, u_sum, len(values))


def assignment_from_topk(
    values: torch.Tensor, indices: torch.Tensor, n: int, chunk: int, epsilon: float = 0.0
) -> Assignment:
    """Cell statistics from each sample's exact top-k (B, k); soft at temperature ε > 0.

    With ε > 0 the sample's mass is spread as p_i = softmax(s_i / ε) over its top-k cells (the
    gradient of the entropic semi-dual, Genevay et al. 2016), which tends to the hard argmax
    as ε → 0. The mass outside the top-k is at most (N − k)·p_k per sample: reported as
    ``dropped``.
    """
    values, indices = torch.as_tensor(values), torch.as_tensor(indices)
    hard = assignment_from_winners(values[:, 0], indices[:, 0], n, chunk)
    if epsilon <= 0 or values.shape[1] < 2:
        return hard
    logits = values.double() / epsilon
    lse = torch.logsumexp(logits, dim=1)
    p = torch.exp(logits - lse[:, None])
    counts = np.bincount(
        indices.reshape(-1).cpu().numpy(), weights=p.reshape(-1).cpu().numpy(), minlength=n
    )
    u = epsilon * lse
    u_sum = sum(float(u[s : s + chunk].sum()) for s in range(0, len(u), chunk))
    dropped = float(torch.clamp(p[:, -1] * (n - values.shape[1]), max=1.0).mean())
    return Assignment(counts, u_sum, len(values), hard_counts=hard.counts, dropped=dropped)


def snapshot_winners(
    values: torch.Tensor, indices: torch.Tensor, h: np.ndarray, h_snap: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's argmax at ``h_snap`` from its exact top-k at ``h``, where provable.

    Scores move by Δ = h_snap − h. The best candidate c* at h_snap wins outright when
    s_c* + Δ_c* > s_(k) + max Δ, since no target outside the top-k scored above s_(k) at h.
    Returns (winners (B,), certified (B,) bool); ties among candidates go to the lowest index.
    """
    values, indices = torch.as_tensor(values).double(), torch.as_tensor(indices)
    delta = torch.from_numpy(np.asarray(h_snap, np.float64) - np.asarray(h, np.float64))
    moved = values + delta[indices]
    best = moved.max(dim=1, keepdim=True).values
    big = torch.iinfo(indices.dtype).max
    winners = torch.where(moved == best, indices, torch.full_like(indices, big)).min(dim=1).values
    if values.shape[1] >= len(delta):
        return winners, torch.ones(len(winners), dtype=torch.bool)
    certified = best[:, 0] > values[:, -1] + float(delta.max())
    return winners, certified


def snapshot_statistics(
    values: torch.Tensor,
    indices: torch.Tensor,
    h: np.ndarray,
    h_snap: np.ndarray,
    n: int,
    chunk: int,
    research,
) -> Assignment:
    """Hard statistics at h and the argmax counts of the same samples at h_snap, from their
    exact top-k at h (B, k).

    The h_snap cell of a sample is read off its top-k when :func:`snapshot_winners` can prove
    it; ``research(rows)`` returns the h_snap winners (int64) of the other rows, searched again
    (few, while h_snap stays close to h).
    """
    a = assignment_from_winners(values[:, 0], indices[:, 0], n, chunk)
    winners, certified = snapshot_winners(values, indices, h, h_snap)
    rows = torch.nonzero(~certified).flatten()
    if len(rows):
        winners[rows] = torch.as_tensor(research(rows)).to(winners.dtype)
    a.snap_counts = np.bincount(winners.numpy(), minlength=n).astype(np.int32)
    a.changed = float((winners != torch.as_tensor(indices)[:, 0]).double().mean())
    a.researched = len(rows)
    return a


def pair_statistics(values: torch.Tensor, indices: torch.Tensor, n: int, chunk: int) -> Assignment:
    """Hard statistics at h and the argmax counts at h_snap of the same samples, from their
    exact winners under both, columns 0 and 1 of (B, 2) values and indices."""
    values, indices = torch.as_tensor(values), torch.as_tensor(indices)
    a = assignment_from_winners(values[:, 0], indices[:, 0], n, chunk)
    a.snap_counts = np.bincount(indices[:, 1].numpy(), minlength=n).astype(np.int32)
    a.changed = float((indices[:, 1] != indices[:, 0]).double().mean())
    return a


class StreamAssigner:
    """An assigner built on ``stream_topk``: the exact top-k of every point of a stream.

    Subclasses provide ``stream_topk``, ``search_points``, ``source``, ``seed`` and ``dim``.
    Every method takes ``batches`` = (b0, b1): only the micro-batches b0 ≤ b < b1 of the
    stream (a replica's share of an iteration); None: all of them.
    """

    n: int
    chunk: int
    dim: int
    source: Source
    seed: int
    stream_device: str = "cpu"
    top1_pair: bool = False  # stream_top1 finds the winners under h and h_s in one search

    def stream_topk(
        self,
        h: np.ndarray,
        key: tuple[int, ...],
        samples: int,
        k: int,
        batches: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def stream_top1(
        self,
        hs: list[np.ndarray],
        key: tuple[int, ...],
        samples: int,
        batches: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact winners (values float64, global indices) of every point of a stream under
        each offset vector of ``hs``: (B, P) each."""
        raise NotImplementedError

    def search_points(self, x: torch.Tensor, h: np.ndarray, k: int):
        """Exact top-k (values, indices) of arbitrary points x (B, D)."""
        raise NotImplementedError

    def stream_rows(
        self,
        key: tuple[int, ...],
        samples: int,
        rows: torch.Tensor,
        batches: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The points at positions ``rows`` (counted from the first point of micro-batch b0)
        of the stream, regenerating only their micro-batches."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        out = torch.empty(len(rows), self.dim)
        b0 = batches[0] if batches is not None else 0
        sizes = [self.source.points_per_batch(s) for s in batch_sizes(samples, self.chunk)[b0:]]
        starts = torch.tensor(np.cumsum([0, *sizes]))
        b_of = torch.searchsorted(starts, rows, right=True) - 1
        for b in torch.unique(b_of).tolist():
            sel = torch.nonzero(b_of == b).flatten()
            (x,) = stream_points(
                self.source,
                self.seed,
                key,
                samples,
                self.chunk,
                self.dim,
                self.stream_device,
                batches=(b0 + b, b0 + b + 1),
            )
            x = x if isinstance(x, torch.Tensor) else x.points()
            out[sel] = x.cpu()[rows[sel] - int(starts[b])]
        return out

    def research(self, h_snap: np.ndarray, key, samples: int, rows, batches=None) -> np.ndarray:
        """The argmax at ``h_snap`` of the stream's points at ``rows`` (see :meth:`stream_rows`)."""
        _, idx = self.search_points(self.stream_rows(key, samples, rows, batches), h_snap, 1)
        return np.asarray(idx)[:, 0]

    def assign_snapshot(
        self,
        h: np.ndarray,
        h_snap: np.ndarray,
        key: tuple[int, ...],
        samples: int,
        k: int = 4,
        batches: tuple[int, int] | None = None,
    ) -> Assignment:
        """Hard statistics at ``h`` plus the argmax counts of the same samples at ``h_snap``:
        with :attr:`top1_pair`, one search finds both winners (:func:`pair_statistics`); else
        one top-k search at h serves both (:func:`snapshot_statistics`)."""
        if self.top1_pair:
            t0 = time.perf_counter()
            values, indices = self.stream_top1([h, h_snap], key, samples, batches)
            t1 = time.perf_counter()
            a = pair_statistics(values, indices, self.n, self.chunk)
            a.projections = stream_projections(self.source, samples, self.chunk, batches)
            a.timings = {"t_search": t1 - t0, "t_transfer": 0.0}
            a.timings["t_reduce"] = time.perf_counter() - t1
            return a
        values, indices, timings = self.timed_topk(h, key, samples, k, batches)
        t0 = time.perf_counter()
        a = snapshot_statistics(
            values,
            indices,
            h,
            h_snap,
            self.n,
            self.chunk,
            lambda rows: self.research(h_snap, key, samples, rows, batches),
        )
        a.projections = stream_projections(self.source, samples, self.chunk, batches)
        timings["t_reduce"] = timings.get("t_reduce", 0.0) + time.perf_counter() - t0
        a.timings = timings
        return a

    def assign(
        self,
        h: np.ndarray,
        key: tuple[int, ...],
        samples: int,
        epsilon: float = 0.0,
        k: int = 8,
        batches: tuple[int, int] | None = None,
    ) -> Assignment:
        """Cell statistics of ``samples`` points of the stream ``key`` (soft when ε > 0)."""
        values, indices, timings = self.timed_topk(
            h, key, samples, k if epsilon > 0 else 1, batches
        )
        t0 = time.perf_counter()
        a = assignment_from_topk(values, indices, self.n, self.chunk, epsilon)
        a.projections = stream_projections(self.source, samples, self.chunk, batches)
        timings["t_reduce"] = timings.get("t_reduce", 0.0) + time.perf_counter() - t0
        a.timings = timings
        return a

    def timed_topk(self, h, key, samples: int, k: int, batches=None):
        """:meth:`stream_topk` and how its time split into search, transfer and reduce."""
        t0 = time.perf_counter()
        values, indices = self.stream_topk(h, key, samples, k, batches)
        return values, indices, {"t_search": time.perf_counter() - t0, "t_transfer": 0.0}

    def score_gap(self, key: tuple[int, ...], samples: int) -> float:
        """Median over samples of (best − second-best score) at h = 0."""
        if self.n < 2:
            return 1.0
        values, _ = self.stream_topk(np.zeros(self.n), key, samples, 2)
        return float(torch.as_tensor(values[:, 0] - values[:, 1]).median())


class LocalAssigner(StreamAssigner):
    """In-process assigner over one :class:`TargetIndex`."""

    def __init__(self, index: TargetIndex, source: Source, seed: int, chunk: int = 4096):
        self.index, self.source, self.seed, self.chunk = index, source, seed, chunk
        self.n, self.dim = index.n, index.dim
        self.stream_device = str(index.device)
        self.top1_pair = index.fused_top1

    def search_points(self, x, h, k):
        return self.index.search(torch.as_tensor(x), torch.from_numpy(np.asarray(h, np.float64)), k)

    def set_source(self, source: Source) -> None:
        """Draw the stream's batches from ``source`` from now on."""
        self.source = source

    def stream_topk(self, h, key, samples, k, batches: tuple[int, int] | None = None):
        """Exact top-k (values float64, global indices) of every point of the stream, (B, k).

        ``batches`` = (b0, b1) searches only micro-batches b0 ≤ b < b1 (a shard actor's share).
        """
        h_t = torch.from_numpy(np.asarray(h, np.float64))
        points = stream_points(
            self.source, self.seed, key, samples, self.chunk, self.dim, self.index.device, batches
        )
        parts = [self.index.search_batch(x, h_t, k) for x in points]
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])

    def stream_top1(self, hs, key, samples, batches: tuple[int, int] | None = None):
        hs_t = [torch.from_numpy(np.asarray(h, np.float64)) for h in hs]
        points = stream_points(
            self.source, self.seed, key, samples, self.chunk, self.dim, self.index.device, batches
        )
        parts = [self.index.search_top1(x, hs_t) for x in points]
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
