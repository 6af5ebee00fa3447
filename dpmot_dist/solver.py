"""Semi-discrete optimal transport by stochastic gradient descent on the dual (Brenier) potential.

Problem (DESIGN §2). Source μ (a :class:`~dpmot_dist.sources.Source`), targets y_1..y_N with
weights ν (Σν = 1). Minimise over h ∈ R^N the convex energy

.. math::
    E(h) = \\int \\max_i (\\langle x, y_i \\rangle + h_i)\\, d\\mu(x) - \\sum_i \\nu_i h_i,
    \\qquad \\partial E / \\partial h_i = \\mu(W_i(h)) - \\nu_i .

With B Monte Carlo samples per iteration, ĝ_i = count_i / B − ν_i and
Ê = mean_x u_h(x) − Σ ν_i h_i. The update is Adam (Kingma & Ba 2015) on h, then h is
centred (E is invariant under h → h + c). When ‖ĝ‖₂ has not improved for ``patience``
iterations the batch grows by ``growth`` and the learning rate decays by ``lr_decay``
(at most ``max_growths`` times): the schedule of the reference code (Lei et al., AE-OT /
pyOMT; DPM-OT), whose source samples and search this module replaces. The returned
potential is a polynomial-decay average of the iterates since the last schedule change
(Shamir & Zhang 2013), which removes most of the Monte Carlo noise of the last iterates.

The search over targets sits behind an :class:`Assigner`: :class:`LocalAssigner` runs it in
process; the Ray shard actors of :mod:`dpmot_dist.fit` implement the same interface.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Protocol

import numpy as np
import torch

from dpmot_dist.search import TargetIndex
from dpmot_dist.sources import Source

log = logging.getLogger(__name__)

TRAIN_STREAM, EVAL_STREAM, PROBE_STREAM = 0, 1, 2


@dataclass
class Assignment:
    """Monte Carlo cell statistics of one batch of source samples.

    Attributes:
        counts: (N,) samples whose argmax is cell i (int64), or with soft assignments the
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
    """Anything that maps the stream (seed, *key) of source samples to cell statistics."""

    n: int

    def assign(
        self,
        h: np.ndarray,
        key: tuple[int, ...],
        samples: int,
        epsilon: float = 0.0,
        k: int = 8,
    ) -> Assignment: ...

    def score_gap(self, key: tuple[int, ...], samples: int) -> float: ...


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
    tensor of points or a :class:`~dpmot_dist.sources.Lattice` (``samples`` counts
    projections).

    ``batches`` = (b0, b1) generates only micro-batches b0 ≤ b < b1.
    """
    sizes = batch_sizes(samples, chunk)
    b0, b1 = batches if batches is not None else (0, len(sizes))
    for b in range(b0, min(b1, len(sizes))):
        yield source.draw(sizes[b], dim, seed, *key, b, device=device)


def stream_projections(source: Source, samples: int, chunk: int) -> int:
    """Projections the stream of ``samples`` spends (lattice batches round up to whole
    subspaces)."""
    return sum(source.projections(s) for s in batch_sizes(samples, chunk))


def assignment_from_winners(
    values: torch.Tensor, indices: torch.Tensor, n: int, chunk: int
) -> Assignment:
    """Counts and Σ u_h from each sample's winning score and cell (B,).

    Σ u_h is summed per micro-batch of ``chunk`` rows in float64, in stream order, so every
    assigner that finds the same winners returns bit-identical statistics.
    """
    values, indices = torch.as_tensor(values), torch.as_tensor(indices)
    counts = np.bincount(indices.cpu().numpy(), minlength=n).astype(np.int64)
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


class StreamAssigner:
    """An assigner built on ``stream_topk``: the exact top-k of every point of a stream.

    Subclasses provide ``stream_topk`` and, for :meth:`assign_snapshot`, ``source``,
    ``seed``, ``dim`` and ``search_points``.
    """

    n: int
    chunk: int
    dim: int
    source: Source
    seed: int
    stream_device: str = "cpu"

    def stream_topk(
        self, h: np.ndarray, key: tuple[int, ...], samples: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def search_points(self, x: torch.Tensor, h: np.ndarray, k: int):
        """Exact top-k (values, indices) of arbitrary points x (B, D)."""
        raise NotImplementedError

    def stream_rows(self, key: tuple[int, ...], samples: int, rows: torch.Tensor) -> torch.Tensor:
        """The points at positions ``rows`` of the stream, regenerating only their batches."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        out = torch.empty(len(rows), self.dim)
        sizes = [self.source.points_per_batch(s) for s in batch_sizes(samples, self.chunk)]
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
                batches=(b, b + 1),
            )
            x = x if isinstance(x, torch.Tensor) else x.points()
            out[sel] = x.cpu()[rows[sel] - int(starts[b])]
        return out

    def assign_snapshot(
        self,
        h: np.ndarray,
        h_snap: np.ndarray,
        key: tuple[int, ...],
        samples: int,
        k: int = 4,
    ) -> Assignment:
        """Hard statistics at ``h`` plus the argmax counts of the same samples at ``h_snap``.

        One search (top-k at h) serves both: the h_snap cell of a sample is read off its
        top-k when :func:`snapshot_winners` can prove it, and only the other rows are searched
        again at h_snap (few, while h_snap stays close to h).
        """
        values, indices, timings = self.timed_topk(h, key, samples, k)
        t0 = time.perf_counter()
        a = assignment_from_winners(values[:, 0], indices[:, 0], self.n, self.chunk)
        winners, certified = snapshot_winners(values, indices, h, h_snap)
        rows = torch.nonzero(~certified).flatten()
        if len(rows):
            _, idx = self.search_points(self.stream_rows(key, samples, rows), h_snap, 1)
            winners[rows] = torch.as_tensor(idx)[:, 0].to(winners.dtype)
        a.snap_counts = np.bincount(winners.numpy(), minlength=self.n).astype(np.int64)
        a.projections = stream_projections(self.source, samples, self.chunk)
        a.changed = float((winners != torch.as_tensor(indices)[:, 0]).double().mean())
        a.researched = len(rows)
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
    ) -> Assignment:
        """Cell statistics of ``samples`` points of the stream ``key`` (soft when ε > 0)."""
        values, indices, timings = self.timed_topk(h, key, samples, k if epsilon > 0 else 1)
        t0 = time.perf_counter()
        a = assignment_from_topk(values, indices, self.n, self.chunk, epsilon)
        a.projections = stream_projections(self.source, samples, self.chunk)
        timings["t_reduce"] = timings.get("t_reduce", 0.0) + time.perf_counter() - t0
        a.timings = timings
        return a

    def timed_topk(self, h: np.ndarray, key: tuple[int, ...], samples: int, k: int):
        """:meth:`stream_topk` and how its time split into search, transfer and reduce."""
        t0 = time.perf_counter()
        values, indices = self.stream_topk(h, key, samples, k)
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

    def search_points(self, x, h, k):
        return self.index.search(torch.as_tensor(x), torch.from_numpy(np.asarray(h, np.float64)), k)

    def stream_topk(self, h, key, samples, k):
        """Exact top-k (values float64, indices) of every point of the stream, (B, k)."""
        h_t = torch.from_numpy(np.asarray(h, np.float64))
        parts = [
            self.index.search_batch(x, h_t, k)
            for x in stream_points(
                self.source, self.seed, key, samples, self.chunk, self.index.dim, self.index.device
            )
        ]
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


@dataclass
class SolverState:
    """Everything the iteration depends on; saving it and restarting reproduces the run."""

    h: np.ndarray
    m: np.ndarray
    v: np.ndarray
    lr: float
    batch: int
    h_avg: np.ndarray
    iteration: int = 0
    avg_count: int = 0
    avg_weight: float = 0.0
    growths: int = 0
    best_grad: float = math.inf
    stall: int = 0
    window_sum: float = 0.0
    prev_window: float = math.inf
    samples: int = 0
    seconds: float = 0.0
    converged: bool = False
    epsilon: float = 0.0
    metrics: list[dict] = field(default_factory=list)
    snap_h: np.ndarray = field(default_factory=lambda: np.zeros(0))
    snap_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    snap_samples: int = 0

    _ARRAYS = ("h", "m", "v", "h_avg", "snap_h", "snap_counts")

    def to_bytes(self) -> bytes:
        """Serialise as an ``.npz`` (arrays, plus the scalars and metrics as JSON)."""
        scalars = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._ARRAYS
        }
        buf = io.BytesIO()
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        np.savez(buf, state=np.array(json.dumps(scalars)), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SolverState:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            scalars = json.loads(str(z["state"]))
            arrays = {name: z[name].copy() for name in cls._ARRAYS if name in z.files}
        return cls(**arrays, **scalars)


@dataclass
class SDOTResult:
    """What a solve returns.

    Attributes:
        h: (N,) the potential (the iterate average when averaging is on), mean 0.
        h_last: (N,) the last iterate.
        converged: whether a tolerance was met before ``max_iters``.
        iterations, samples: work done.
        metrics: one dict per logged iteration (see :meth:`SDOTSolver.record`).
        evaluation: TV, max relative error, empty fraction and energy of ``h`` on a fresh
            evaluation sample (and its size and noise floor); empty when not evaluated.
    """

    h: np.ndarray
    h_last: np.ndarray
    converged: bool
    iterations: int
    samples: int
    metrics: list[dict]
    evaluation: dict = field(default_factory=dict)


def cell_errors(mu: np.ndarray, nu: np.ndarray) -> dict[str, float]:
    """TV = ½Σ|μ_i − ν_i|, max_i |μ_i/ν_i − 1| and the fraction of empty cells (ν_i > 0)."""
    pos = nu > 0
    return {
        "tv": 0.5 * float(np.abs(mu - nu).sum()),
        "max_rel_err": float(np.max(np.abs(mu[pos] / nu[pos] - 1.0))),
        "empty_frac": float(np.mean(mu[pos] == 0)),
    }


def tv_noise_floor(n: int, samples: int) -> float:
    """Expected TV of a perfect h measured with ``samples`` points: ≈ sqrt(N / (2π B))."""
    return math.sqrt(n / (2 * math.pi * samples))


@dataclass(frozen=True, kw_only=True)
class SDOTSolver:
    """Hyper-parameters of the Monte Carlo SDOT solver; call :meth:`solve` on an assigner.

    Attributes:
        lr: Adam step size; ``None`` sets it to ``lr_scale`` × the median gap between the
            best and second-best score of a source sample at h = 0 (scale-free).
        samples_per_cell: initial batch is max(min_batch, samples_per_cell · N). Small
            batches early buy iterations, which the transient needs more than precision
            (bench solver, 2-D square N=100: TV 0.031 after 100k samples with min_batch 1,024
            against 0.35 with 4,096); the stall rule grows the batch when noise dominates.
        averaging: ``tail`` (polynomial-decay average since the last schedule change,
            power ``tail_power``), ``samples`` (over the whole run, each iterate weighted by
            its batch × (samples so far)^``tail_power``, so no schedule change throws the
            average's samples away), ``ema`` (decay ``ema_decay``) or ``none``.
        tol_grad, tol_tv: stop when ‖ĝ‖₂ (resp. the batch TV) falls below it with no empty
            cell; ``None`` disables. ``max_iters`` caps the run.
        eval_samples: size of the fresh evaluation sample (0 disables evaluation).
        epsilon: soft assignments at temperature ε = epsilon × the score gap over each
            sample's top ``soft_k`` cells (0: hard argmax); ε decays by ``epsilon_decay`` at
            each schedule step and is 0 after ``soft_phases`` of them.
        control_variate: ``snapshot`` estimates the cell masses at h as
            m̂(h) = [counts_B(h) − counts_B(h_s)] / B + (all counts at h_s since it was taken)
            / (their samples): the batch only has to measure how the cells moved since the
            snapshot h_s, while μ(W(h_s)) is averaged over every sample since (an SVRG-style
            control variate, Johnson & Zhang 2013, whose full gradient accumulates for free:
            the h_s argmax is read off the same top-``cv_k`` search). A new snapshot is taken
            at the current h when more than ``cv_refresh`` of a batch changed cells (or more than
            half of it had to be searched again). Hard
            phases only (ε = 0). ``none``: plain Monte Carlo counts.
    """

    lr: float | None = None
    lr_scale: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-12
    bias_correction: bool = True
    samples_per_cell: float = 2.0
    min_batch: int = 1024
    max_iters: int = 1000
    patience: int = 25
    growth: float = 2.0
    lr_decay: float = 0.5
    max_growths: int = 6
    averaging: Literal["tail", "samples", "ema", "none"] = "tail"
    tail_power: float = 3.0
    ema_decay: float = 0.99
    tol_grad: float | None = None
    tol_tv: float | None = None
    eval_samples: int = 0
    log_every: int = 10
    epsilon: float = 0.0
    epsilon_decay: float = 0.3
    soft_k: int = 8
    soft_phases: int = 2
    stall_rule: Literal["window", "best"] = "window"
    optimizer: Literal["adam", "sgd"] = "adam"
    control_variate: Literal["snapshot", "none"] = "snapshot"
    cv_refresh: float = 0.2
    cv_k: int = 4

    def __post_init__(self) -> None:
        if self.stall_rule not in ("window", "best"):
            raise ValueError(f"stall_rule must be window or best, got {self.stall_rule!r}")
        if self.control_variate not in ("snapshot", "none"):
            raise ValueError(
                f"control_variate must be snapshot or none, got {self.control_variate!r}"
            )
        if self.cv_k < 2 or not 0 < self.cv_refresh <= 1:
            raise ValueError("cv_k ≥ 2 and 0 < cv_refresh ≤ 1 are required")
        if self.averaging not in ("tail", "samples", "ema", "none"):
            raise ValueError(
                f"averaging must be tail, samples, ema or none, got {self.averaging!r}"
            )
        if self.max_iters < 0 or self.min_batch < 1 or self.samples_per_cell <= 0:
            raise ValueError("max_iters ≥ 0, min_batch ≥ 1 and samples_per_cell > 0 are required")

    def init_state(self, assigner: Assigner) -> SolverState:
        """Zero potential, zero Adam moments, the initial batch and step size."""
        n = assigner.n
        gap = 1.0
        if self.lr is None or self.epsilon > 0:
            gap = assigner.score_gap((PROBE_STREAM,), min(4096, 64 * n))
        lr = self.lr if self.lr is not None else self.lr_scale * gap
        batch = max(self.min_batch, math.ceil(self.samples_per_cell * n))
        zeros = np.zeros(n)
        return SolverState(
            h=zeros,
            m=zeros.copy(),
            v=zeros.copy(),
            lr=lr,
            batch=batch,
            h_avg=zeros.copy(),
            epsilon=self.epsilon * gap,
        )

    def solve(
        self,
        assigner: Assigner,
        nu: np.ndarray | None = None,
        state: SolverState | None = None,
        callback: Callable[[SolverState, dict], None] | None = None,
    ) -> SDOTResult:
        """Run from ``state`` (a fresh one if None) until a tolerance or ``max_iters``.

        ``callback(state, record)`` runs after every iteration (checkpoints, progress).
        """
        nu = uniform_weights(assigner.n) if nu is None else np.asarray(nu, np.float64)
        state = self.init_state(assigner) if state is None else state
        while state.iteration < self.max_iters and not state.converged:
            record = self.step(assigner, nu, state)
            if callback is not None:
                callback(state, record)
        if not state.converged and (self.tol_grad is not None or self.tol_tv is not None):
            warnings.warn(
                f"SDOT stopped at max_iters={self.max_iters} before reaching the tolerance",
                RuntimeWarning,
                stacklevel=2,
            )
        h = self.potential(state)
        evaluation = self.evaluate(assigner, nu, h) if self.eval_samples else {}
        return SDOTResult(
            h=h,
            h_last=state.h.copy(),
            converged=state.converged,
            iterations=state.iteration,
            samples=state.samples,
            metrics=list(state.metrics),
            evaluation=evaluation,
        )

    def step(self, assigner: Assigner, nu: np.ndarray, state: SolverState) -> dict:
        """One iteration: assign a batch, Adam step, centre, average, schedule, stop test."""
        t0 = time.perf_counter()
        key = (TRAIN_STREAM, state.iteration)
        snapshot = self.control_variate == "snapshot" and state.epsilon == 0
        if snapshot:
            if state.snap_samples == 0:
                state.snap_h, state.snap_counts = state.h.copy(), np.zeros(len(nu))
            a = assigner.assign_snapshot(state.h, state.snap_h, key, state.batch, self.cv_k)
            state.snap_counts += a.snap_counts
            state.snap_samples += a.samples
            mu = (a.counts - a.snap_counts) / a.samples + state.snap_counts / state.snap_samples
            a.hard_counts = a.counts
        else:
            a = assigner.assign(state.h, key, state.batch, state.epsilon, self.soft_k)
            mu = a.cell_mass()
        grad = mu - nu
        energy = a.u_sum / a.samples - float(nu @ state.h)
        state.iteration += 1
        state.samples += a.projections
        if self.optimizer == "sgd":
            state.h = state.h - state.lr * grad / np.maximum(nu, 1e-300)
        else:
            self._adam(state, grad)
        state.h -= state.h.mean()
        self._average(state)
        grad_l2 = float(np.linalg.norm(grad))
        errors = cell_errors(mu, nu)
        if a.hard_counts is not None:
            errors["empty_frac"] = float(np.mean(a.hard_counts[nu > 0] == 0))
        state.seconds += time.perf_counter() - t0
        record = {
            "iter": state.iteration,
            "energy": energy,
            "grad_l2": grad_l2,
            **errors,
            "samples": state.samples,
            "seconds": state.seconds,
            "lr": state.lr,
            "batch": a.projections,
            "points": a.samples,
            "epsilon": state.epsilon,
            "dropped": a.dropped,
            **a.timings,
        }
        if snapshot:
            record.update(
                cv_changed=a.changed,
                cv_researched=a.researched,
                cv_snapshot_samples=state.snap_samples,
            )
            if a.changed > self.cv_refresh or a.researched > 0.5 * a.samples:
                state.snap_samples = 0  # the next iteration takes a new snapshot at h
        self._schedule(state, grad_l2)
        no_empty = errors["empty_frac"] == 0
        state.converged = no_empty and (
            (self.tol_grad is not None and grad_l2 < self.tol_grad)
            or (self.tol_tv is not None and errors["tv"] < self.tol_tv)
        )
        if (
            state.iteration % self.log_every == 0
            or state.iteration == 1
            or state.converged
            or state.iteration == self.max_iters
        ):
            state.metrics.append(record)
        return record

    def _adam(self, state: SolverState, grad: np.ndarray) -> None:
        """h ← h − lr · m̂ / (sqrt(v̂) + ε); without bias correction m̂ = m, v̂ = v (reference)."""
        b1, b2 = self.betas
        state.m = b1 * state.m + (1 - b1) * grad
        state.v = b2 * state.v + (1 - b2) * grad * grad
        m_hat, v_hat = state.m, state.v
        if self.bias_correction:
            t = state.iteration
            m_hat, v_hat = m_hat / (1 - b1**t), v_hat / (1 - b2**t)
        state.h = state.h - state.lr * m_hat / (np.sqrt(v_hat) + self.adam_eps)

    def _average(self, state: SolverState) -> None:
        """Update the iterate average: weights ∝ t^power since the last reset (``tail``),
        ∝ batch × samples^power over the whole run (``samples``), or an EMA."""
        state.avg_count += 1
        if self.averaging == "samples":
            w = state.batch * float(state.samples) ** self.tail_power
            state.avg_weight += w
            state.h_avg += (w / state.avg_weight) * (state.h - state.h_avg)
            return
        if self.averaging == "ema":
            rate = max(1.0 - self.ema_decay, 1.0 / state.avg_count)
        else:
            rate = (self.tail_power + 1) / (state.avg_count + self.tail_power)
        state.h_avg += min(rate, 1.0) * (state.h - state.h_avg)

    def _stalled(self, state: SolverState, grad_l2: float) -> bool:
        """Has ‖ĝ‖₂ stopped improving?

        ``best`` (the reference): no new minimum for ``patience`` iterations — slow to fire
        when the noise of ĝ keeps producing new minima. ``window``: the mean of ‖ĝ‖₂ over the
        last ``patience`` iterations is not 5% below the previous window's.
        """
        if self.stall_rule == "best":
            if grad_l2 < state.best_grad:
                state.best_grad, state.stall = grad_l2, 0
                return False
            state.stall += 1
            return state.stall >= self.patience
        state.stall += 1
        state.window_sum += grad_l2
        if state.stall < self.patience:
            return False
        mean, state.window_sum, state.stall = state.window_sum / state.stall, 0.0, 0
        stalled = mean > 0.95 * state.prev_window
        state.prev_window = mean
        return stalled

    def _schedule(self, state: SolverState, grad_l2: float) -> None:
        """Grow the batch and decay the step when ‖ĝ‖₂ has stalled (see :meth:`_stalled`)."""
        if not self._stalled(state, grad_l2) or state.growths >= self.max_growths:
            return
        state.growths += 1
        state.batch = math.ceil(state.batch * self.growth)
        state.lr *= self.lr_decay
        state.epsilon *= self.epsilon_decay
        if state.growths >= min(self.soft_phases, self.max_growths):
            state.epsilon = 0.0  # later phases use the hard argmax: no entropic bias
        state.stall, state.best_grad, state.window_sum = 0, math.inf, 0.0
        state.prev_window = math.inf
        if self.averaging == "tail":
            state.avg_count = 0
        log.info(
            "iteration %d: ‖g‖ stalled; batch → %d, lr → %.3g",
            state.iteration,
            state.batch,
            state.lr,
        )

    def potential(self, state: SolverState) -> np.ndarray:
        """The returned potential: the iterate average (or the last iterate), mean 0."""
        h = state.h if self.averaging == "none" or state.avg_count == 0 else state.h_avg
        return h - h.mean()

    def evaluate(self, assigner: Assigner, nu: np.ndarray, h: np.ndarray) -> dict:
        """Cell errors and energy of ``h`` on a fresh sample of ``eval_samples`` points."""
        a = assigner.assign(h, (EVAL_STREAM,), self.eval_samples)
        out = cell_errors(a.cell_mass(), nu)
        out["energy"] = a.u_sum / a.samples - float(nu @ h)
        out["samples"] = a.samples
        # a lattice's points are correlated: the floor of its projections is conservative
        out["tv_noise_floor"] = tv_noise_floor(assigner.n, a.projections)
        return out


def uniform_weights(n: int) -> np.ndarray:
    """ν_i = 1/N."""
    return np.full(n, 1.0 / n)


def solver_from_dict(params: dict) -> SDOTSolver:
    """Build a solver from a dict of its field names (unknown keys are an error)."""
    names = {f.name for f in fields(SDOTSolver)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown solver option(s): {', '.join(unknown)}")
    if "betas" in params:
        params = {**params, "betas": tuple(params["betas"])}
    return SDOTSolver(**params)


def solver_to_dict(solver: SDOTSolver) -> dict:
    """The solver's hyper-parameters as a JSON-able dict (for manifests)."""
    return asdict(solver)
