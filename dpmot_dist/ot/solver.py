"""Semi-discrete optimal transport by stochastic gradient descent on the dual (Brenier) potential.

Problem (DESIGN §2). Source μ (a :class:`~dpmot_dist.ot.sources.Source`), targets y_1..y_N with
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

The cell statistics of each batch come from an :class:`~dpmot_dist.ot.assign.Assigner`
(:mod:`dpmot_dist.ot.assign`): in process, or the Ray shard pool of
:mod:`dpmot_dist.pipelines.shards`.
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
from typing import Literal

import numpy as np

from dpmot_dist.ot.assign import Assigner

log = logging.getLogger(__name__)

TRAIN_STREAM, EVAL_STREAM, PROBE_STREAM = 0, 1, 2


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
    adam_t: int = 0
    stop_reason: str = ""
    cv_off: bool = False
    cv_quick_refreshes: int = 0
    last_check: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # the run's source (fields of Source)
    calibration: dict = field(default_factory=dict)  # how it was chosen
    h_prev: np.ndarray = field(default_factory=lambda: np.zeros(0))  # last phase's average

    _ARRAYS = ("h", "m", "v", "h_avg", "snap_h", "snap_counts", "h_prev")

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
        scalars.setdefault("adam_t", scalars.get("iteration", 0))  # checkpoints before it
        return cls(**arrays, **scalars)


@dataclass
class SDOTResult:
    """What a solve returns.

    Attributes:
        h: (N,) the potential (the iterate average when averaging is on), mean 0.
        h_last: (N,) the last iterate.
        converged: whether the fit stopped by itself (converged, or a tolerance was met)
            rather than at ``max_iters``.
        stop_reason: ``converged`` (the schedule is exhausted and ‖ĝ‖ has stalled),
            ``tolerance`` (``tol_*`` met) or ``iteration cap``.
        iterations, samples: work done (samples count projections).
        metrics: one dict per logged iteration (see :meth:`SDOTSolver.step`).
        evaluation: TV, worst cell (``max_rel_err``, ``worst_cell``, its masses), empty
            fraction and energy of ``h`` on a fresh evaluation sample, with its size and noise
            floor (``tv_upper_bound`` when the sample cap kept the floor above TV/3); empty when
            not evaluated.
    """

    h: np.ndarray
    h_last: np.ndarray
    converged: bool
    iterations: int
    samples: int
    metrics: list[dict]
    evaluation: dict = field(default_factory=dict)
    stop_reason: str = ""


def cell_errors(mu: np.ndarray, nu: np.ndarray) -> dict[str, float]:
    """TV = ½Σ|μ_i − ν_i|, the worst cell i* = argmax_i |μ_i/ν_i − 1| (``max_rel_err``,
    ``worst_cell``) and the fraction of empty cells (ν_i > 0)."""
    pos = np.flatnonzero(nu > 0)
    rel = mu[pos] / nu[pos] - 1.0
    worst = int(np.argmax(np.abs(rel)))
    return {
        "tv": 0.5 * float(np.abs(mu - nu).sum()),
        "max_rel_err": float(abs(rel[worst])),
        "worst_cell": int(pos[worst]),
        "empty_frac": float(np.mean(mu[pos] == 0)),
    }


def tv_noise_floor(n: int, samples: int, nu: np.ndarray | None = None) -> float:
    """Expected TV of a perfect h measured with ``samples`` points:
    Σ_i sqrt(ν_i (1 − ν_i) / (2π B)), ≈ sqrt(N / (2π B)) for uniform weights."""
    if nu is None:
        return math.sqrt(n / (2 * math.pi * samples))
    return float(np.sqrt(nu * (1 - nu) / (2 * math.pi * samples)).sum())


def cell_noise(nu: np.ndarray, samples: int) -> np.ndarray:
    """Standard deviation of each cell's measured relative error μ̂_i/ν_i − 1 with ``samples``
    independent points at the optimum: sqrt((1 − ν_i) / (B ν_i))."""
    return np.sqrt((1 - nu) / (samples * np.maximum(nu, 1e-300)))


def _opt(default, help: str):
    """A solver field: its default and a one-line help (shown by ``dpmot fit --help``)."""
    return field(default=default, metadata={"help": help})


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
        tol_grad: stop when the batch ‖ĝ‖₂ falls below it with no empty cell. tol_tv,
            tol_rel_err: stop when the averaged potential's TV (resp. every cell's relative
            error) on a fresh sample, checked every ``check_every`` iterations and sized to
            resolve the tolerance (at most ``eval_max_samples``), is within it. ``None``
            disables. ``max_iters`` caps the run.
        stop: ``converged`` also stops when the schedule is exhausted (``max_growths``
            reached) and ‖ĝ‖ stalls once more: the batch no longer grows, the step no longer
            shrinks, and further iterations only average noise. ``cap``: run to
            ``max_iters`` (or a tolerance).
        adam_reset: ``phase`` restarts Adam's moments (and their bias correction) at every
            schedule change. With β2 = 0.999 the second moment otherwise remembers the
            transient's gradients for ~1,000 iterations: a cell that started far off (at h = 0
            a corner cell of the 2-D square holds 25× its mass) keeps a step ~20× too small
            long after its error has become the fit's largest.
        eval_samples: size of the fresh evaluation sample (0 disables evaluation); it grows
            until its noise floor is at most a third of the TV it reports, up to
            ``eval_max_samples``.
        epsilon: soft assignments at temperature ε = epsilon × the score gap over each
            sample's top ``soft_k`` cells (0: hard argmax); ε decays by ``epsilon_decay`` at
            each schedule step and is 0 after ``soft_phases`` of them.
        control_variate: ``snapshot`` estimates the cell masses at h as
            m̂(h) = [counts_B(h) − counts_B(h_s)] / B + (all counts at h_s since it was taken)
            / (their samples): the batch only has to measure how the cells moved since the
            snapshot h_s, while μ(W(h_s)) is averaged over every sample since (an SVRG-style
            control variate, Johnson & Zhang 2013, whose full gradient accumulates for free:
            the h_s argmax is read off the same top-``cv_k`` search). A new snapshot is taken
            at the current h when more than ``cv_refresh`` of a batch changed cells or more than
            ``cv_research_max`` of it had to be searched again (the CPU kernel finds both
            winners in one search, so there only the first test applies: with 0.1 rather than
            0.2 the TV after 1M projections, clustered N = 1,000, D = 32, lattice-16, was
            0.0095 (mean of 7 seeds) against 0.0109 (4 seeds); the top-k path with both tests
            at 0.2 gave 0.0094 (6 seeds), at 0.1 the same as the CPU's); when a fresh snapshot
            is used up again within two iterations, the control variate steps aside until the
            next schedule change (it would cost more searches than it saves). Hard phases only
            (ε = 0). ``none``: plain Monte Carlo counts.
    """

    lr: float | None = _opt(None, "Adam step (default: lr_scale × the median score gap)")
    lr_scale: float = _opt(0.1, "step size as a multiple of the median score gap at h = 0")
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam's β1, β2")
    adam_eps: float = _opt(1e-12, "Adam's ε")
    bias_correction: bool = _opt(True, "Adam bias correction (off in the reference code)")
    samples_per_cell: float = _opt(2.0, "first batch: this × N samples (at least min_batch)")
    min_batch: int = _opt(1024, "smallest batch")
    max_iters: int = _opt(1000, "iteration cap")
    patience: int = _opt(25, "iterations per stall window")
    growth: float = _opt(2.0, "batch growth at a stall")
    lr_decay: float = _opt(0.5, "step decay at a stall")
    max_growths: int = _opt(6, "at most this many stalls change the schedule")
    averaging: Literal["tail", "samples", "ema", "none"] = _opt("tail", "iterate averaging")
    tail_power: float = _opt(3.0, "polynomial-decay power of the averages")
    ema_decay: float = _opt(0.99, "decay of the ema average")
    tol_grad: float | None = _opt(None, "stop when ‖ĝ‖₂ falls below this with no empty cell")
    tol_tv: float | None = _opt(None, "stop when the batch TV falls below this, no empty cell")
    eval_samples: int = _opt(0, "fresh evaluation sample size (0: no evaluation)")
    log_every: int = _opt(10, "record (and log) every this many iterations")
    epsilon: float = _opt(0.0, "soft-assignment temperature × score gap (0: hard argmax)")
    epsilon_decay: float = _opt(0.3, "ε decay at each stall")
    soft_k: int = _opt(8, "top-k cells of the soft assignment")
    soft_phases: int = _opt(2, "schedule phases with soft assignments")
    stall_rule: Literal["window", "best"] = _opt("window", "what counts as a stall")
    optimizer: Literal["adam", "sgd"] = _opt("adam", "optimizer on h")
    control_variate: Literal["snapshot", "none"] = _opt(
        "snapshot", "snapshot: SVRG-style control variate on the cell masses"
    )
    cv_refresh: float = _opt(0.1, "new snapshot when more than this share of a batch moved")
    cv_k: int = _opt(4, "top-k that certifies the snapshot's cells")
    cv_research_max: float = _opt(
        0.2, "new snapshot when more than this share of a batch is searched again"
    )
    adam_reset: Literal["phase", "none"] = _opt(
        "phase", "phase: forget Adam's moments at every schedule change"
    )
    stop: Literal["converged", "cap"] = _opt(
        "converged", "converged: stop once the schedule is exhausted and ‖ĝ‖ has stalled"
    )
    tol_rel_err: float | None = _opt(
        None, "stop when every cell's mass is within this relative error (fresh sample)"
    )
    check_every: int = _opt(50, "iterations between the fresh-sample checks of tol_tv/rel_err")
    eval_max_samples: int = _opt(0, "cap of the growing evaluation sample (0: 16 × eval_samples)")

    def __post_init__(self) -> None:
        checks = {
            "lr > 0": self.lr is None or self.lr > 0,
            "lr_scale > 0": self.lr_scale > 0,
            "0 ≤ betas < 1": all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2,
            "samples_per_cell > 0": self.samples_per_cell > 0,
            "min_batch ≥ 1": self.min_batch >= 1,
            "max_iters ≥ 0": self.max_iters >= 0,
            "patience ≥ 1": self.patience >= 1,
            "growth ≥ 1": self.growth >= 1,
            "0 < lr_decay ≤ 1": 0 < self.lr_decay <= 1,
            "max_growths ≥ 0": self.max_growths >= 0,
            "tol_grad > 0": self.tol_grad is None or self.tol_grad > 0,
            "tol_tv > 0": self.tol_tv is None or self.tol_tv > 0,
            "eval_samples ≥ 0": self.eval_samples >= 0,
            "log_every ≥ 1": self.log_every >= 1,
            "epsilon ≥ 0": self.epsilon >= 0,
            "0 ≤ epsilon_decay ≤ 1": 0 <= self.epsilon_decay <= 1,
            "soft_k ≥ 2": self.soft_k >= 2,
            "cv_k ≥ 2": self.cv_k >= 2,
            "0 < cv_refresh ≤ 1": 0 < self.cv_refresh <= 1,
            "0 < cv_research_max ≤ 1": 0 < self.cv_research_max <= 1,
            "tol_rel_err > 0": self.tol_rel_err is None or self.tol_rel_err > 0,
            "check_every ≥ 1": self.check_every >= 1,
            "eval_max_samples ≥ 0": self.eval_max_samples >= 0,
        }
        choices = {
            "stall_rule": ("window", "best"),
            "control_variate": ("snapshot", "none"),
            "averaging": ("tail", "samples", "ema", "none"),
            "optimizer": ("adam", "sgd"),
            "adam_reset": ("phase", "none"),
            "stop": ("converged", "cap"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"solver options need {', '.join(failed)}")

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
        """Run from ``state`` (a fresh one if None) until it stops (see ``stop``, ``tol_*``)
        or ``max_iters``; then evaluate the potential on a fresh sample.

        ``callback(state, record)`` runs after every iteration (checkpoints, progress).
        """
        nu = uniform_weights(assigner.n) if nu is None else np.asarray(nu, np.float64)
        state = self.init_state(assigner) if state is None else state
        while state.iteration < self.max_iters and not state.converged:
            record = self.step(assigner, nu, state)
            if callback is not None:
                callback(state, record)
        if not state.converged:
            state.stop_reason = "iteration cap"
            if self._tolerances():
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
            stop_reason=state.stop_reason,
        )

    def _tolerances(self) -> bool:
        return any(t is not None for t in (self.tol_grad, self.tol_tv, self.tol_rel_err))

    def step(self, assigner: Assigner, nu: np.ndarray, state: SolverState) -> dict:
        """One iteration: assign a batch, optimizer step, centre, average, schedule, stop test.

        Returns the iteration's record (``iter``, ``energy``, ``grad_l2``, ``tv``,
        ``max_rel_err``, ``worst_cell``, ``empty_frac`` of the batch's cell masses, ``samples``
        so far, ``seconds``, ``lr``, ``batch``, timings, control-variate figures).
        """
        t0 = time.perf_counter()
        a, mu = self._cell_masses(assigner, nu, state)
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
        if a.snap_counts is not None:
            record.update(
                cv_changed=a.changed,
                cv_researched=a.researched,
                cv_researched_share=a.researched / max(1, a.samples),
                cv_snapshot_samples=state.snap_samples,
            )
            self._maybe_refresh_snapshot(state, a)
        self._schedule(state, grad_l2)
        self._stop_test(assigner, nu, state, grad_l2, errors, record)
        if (
            state.iteration % self.log_every == 0
            or state.iteration == 1
            or state.converged
            or state.iteration == self.max_iters
        ):
            state.metrics.append(record)
        return record

    def _cell_masses(self, assigner: Assigner, nu: np.ndarray, state: SolverState):
        """The batch's statistics and its estimate of μ(W(h)): plain counts, or with the
        snapshot control variate m̂(h) = [counts(h) − counts(h_s)]/B + Σ counts(h_s)/Σ B."""
        key = (TRAIN_STREAM, state.iteration)
        source = getattr(assigner, "source", None)
        if not self.uses_control_variate(source) or state.epsilon > 0 or state.cv_off:
            a = assigner.assign(state.h, key, state.batch, state.epsilon, self.soft_k)
            return a, a.cell_mass()
        if state.snap_samples == 0:
            state.snap_h, state.snap_counts = state.h.copy(), np.zeros(len(nu))
        a = assigner.assign_snapshot(state.h, state.snap_h, key, state.batch, self.cv_k)
        state.snap_counts += a.snap_counts
        state.snap_samples += a.samples
        mu = (a.counts - a.snap_counts) / a.samples + state.snap_counts / state.snap_samples
        a.hard_counts = a.counts
        return a, mu

    def uses_control_variate(self, source=None) -> bool:
        """Whether the snapshot control variate runs with points of ``source`` (a
        :class:`~dpmot_dist.ot.sources.Source`): with ``snapshot``, whatever the source."""
        return self.control_variate == "snapshot"

    def _maybe_refresh_snapshot(self, state: SolverState, a) -> None:
        """New snapshot when the batch moved or needed too many searches; step aside for
        the phase when a fresh snapshot is used up again at once."""
        fresh = state.snap_samples <= 2 * a.samples  # this snapshot lasted ≤ 2 iterations
        if a.changed <= self.cv_refresh and a.researched <= self.cv_research_max * a.samples:
            if not fresh:
                state.cv_quick_refreshes = 0  # it has paid for itself
            return
        state.cv_quick_refreshes = state.cv_quick_refreshes + 1 if fresh else 0
        state.snap_samples = 0  # the next iteration takes a new snapshot at h
        if state.cv_quick_refreshes >= 2:
            state.cv_off = True
            log.info(
                "iteration %d: the snapshot control variate steps aside until the next "
                "schedule change (%.0f%% of the batch searched again)",
                state.iteration,
                100 * a.researched / max(1, a.samples),
            )

    def _stop_test(self, assigner, nu, state: SolverState, grad_l2, errors, record) -> None:
        """Tolerances (``tol_grad`` on the batch; ``tol_tv``/``tol_rel_err`` on a fresh
        sample every ``check_every`` iterations) and, with ``stop="converged"``, the end of
        the schedule."""
        no_empty = errors["empty_frac"] == 0
        if self.tol_grad is not None and no_empty and grad_l2 < self.tol_grad:
            state.converged, state.stop_reason = True, "tolerance"
            return
        due = state.iteration % self.check_every == 0 or state.stop_reason == "exhausted"
        if (self.tol_tv is not None or self.tol_rel_err is not None) and due:
            check = self.check_tolerance(assigner, nu, self.potential(state), state.iteration)
            state.last_check = check
            record["check"] = check
            if check["met"]:
                state.converged, state.stop_reason = True, "tolerance"
                return
        if state.stop_reason == "exhausted":
            state.converged, state.stop_reason = True, "converged"
            log.info(
                "iteration %d: converged (the schedule is exhausted and ‖g‖ has stalled)",
                state.iteration,
            )
            if self._tolerances():
                log.warning("the fit converged before reaching its tolerance")

    def check_tolerance(
        self, assigner: Assigner, nu: np.ndarray, h: np.ndarray, index: int = 0
    ) -> dict:
        """Is h within ``tol_tv`` / ``tol_rel_err``? Measured on a fresh sample large enough
        that its noise resolves the tolerance (TV floor ≤ tol_tv/3; every cell's relative
        noise ≤ tol_rel_err/4), at most the evaluation cap."""
        need = self.eval_samples or 1 << 16
        if self.tol_tv is not None:
            need = max(need, math.ceil(9 * assigner.n / (2 * math.pi * self.tol_tv**2)))
        if self.tol_rel_err is not None:
            need = max(need, math.ceil(16 * (1 - nu.min()) / (nu.min() * self.tol_rel_err**2)))
        samples = min(need, self._eval_cap())
        a = assigner.assign(h, (EVAL_STREAM, 1, index), samples)  # a fresh sample per check
        out = cell_errors(a.cell_mass(), nu)
        out["samples"] = a.projections
        out["met"] = (self.tol_tv is None or out["tv"] <= self.tol_tv) and (
            self.tol_rel_err is None or out["max_rel_err"] <= self.tol_rel_err
        )
        return out

    def _eval_cap(self) -> int:
        return self.eval_max_samples or 16 * max(self.eval_samples, 1 << 16)

    def _adam(self, state: SolverState, grad: np.ndarray) -> None:
        """h ← h − lr · m̂ / (sqrt(v̂) + ε); without bias correction m̂ = m, v̂ = v (reference).

        After a restart of the moments at a schedule change (``adam_reset``) only v is
        bias-corrected: m then ramps up from 0 over ~1/(1 − β1) iterations. Corrected, the
        first steps would be lr·sign(ĝ) for every cell, noise or not, about 4× the steady
        step of a noise-dominated gradient, just when h is close to the optimum (1-D
        Gaussian, 16 targets, two of them 0.01 apart: TV 0.006 → 0.29 in one step).
        """
        b1, b2 = self.betas
        state.adam_t += 1
        state.m = b1 * state.m + (1 - b1) * grad
        state.v = b2 * state.v + (1 - b2) * grad * grad
        m_hat, v_hat = state.m, state.v
        if self.bias_correction:
            t = state.adam_t
            restarted = self.adam_reset == "phase" and state.growths > 0
            m_hat = m_hat if restarted else m_hat / (1 - b1**t)
            v_hat = v_hat / (1 - b2**t)
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
        """Grow the batch and decay the step when ‖ĝ‖₂ has stalled (see :meth:`_stalled`);
        a stall with the schedule exhausted marks the fit converged (``stop="converged"``)."""
        if not self._stalled(state, grad_l2):
            return
        if state.growths >= self.max_growths:
            if self.stop == "converged":
                state.stop_reason = "exhausted"
            return
        state.growths += 1
        state.batch = math.ceil(state.batch * self.growth)
        state.lr *= self.lr_decay
        state.epsilon *= self.epsilon_decay
        if state.growths >= min(self.soft_phases, self.max_growths):
            state.epsilon = 0.0  # later phases use the hard argmax: no entropic bias
        state.stall, state.best_grad, state.window_sum = 0, math.inf, 0.0
        state.prev_window = math.inf
        state.cv_off, state.cv_quick_refreshes = False, 0
        if self.adam_reset == "phase":
            state.m, state.v, state.adam_t = np.zeros_like(state.m), np.zeros_like(state.v), 0
        if self.averaging == "tail":
            if state.avg_count >= self.patience or not len(state.h_prev):
                state.h_prev = state.h_avg.copy()
            state.avg_count = 0
        log.info(
            "iteration %d: ‖g‖ stalled; batch → %d, lr → %.3g",
            state.iteration,
            state.batch,
            state.lr,
        )

    def potential(self, state: SolverState) -> np.ndarray:
        """The returned potential: the iterate average (or the last iterate), mean 0.

        With ``tail`` averaging, during the first ``patience`` iterations of a phase the
        previous phase's average stands in for the new one: a schedule change restarts Adam,
        whose first bias-corrected steps move every cell by about the step size, and an
        average of a few such iterates is worse than the full average it replaces (1-D
        Gaussian, 16 cells: TV 0.016 twenty iterations after a change, against 0.0005).
        """
        if self.averaging == "tail" and state.avg_count < self.patience and len(state.h_prev):
            h = state.h_prev
        elif self.averaging == "none" or state.avg_count == 0:
            h = state.h
        else:
            h = state.h_avg
        return h - h.mean()

    def evaluate(self, assigner: Assigner, nu: np.ndarray, h: np.ndarray) -> dict:
        """Cell errors and energy of ``h`` on a fresh sample that can judge them.

        The sample starts at ``eval_samples`` points and grows until its TV noise floor
        (:func:`tv_noise_floor`) is at most a third of the TV it measures, or it reaches the
        cap (``eval_max_samples``); then ``tv_upper_bound`` says the TV is mostly noise. The
        worst cell comes with its masses and its own noise (``worst_cell_noise``: the standard
        deviation of its measured relative error).
        """
        samples = self.eval_samples
        for rounds in range(8):
            a = assigner.assign(h, (EVAL_STREAM, 0, rounds), samples)
            out = cell_errors(a.cell_mass(), nu)
            # a lattice's points are correlated: the floor of its projections is conservative
            floor = tv_noise_floor(assigner.n, a.projections, nu)
            if floor <= out["tv"] / 3 or samples >= self._eval_cap():
                break
            samples = min(self._eval_cap(), math.ceil(samples * (3.3 * floor / out["tv"]) ** 2))
        i = out["worst_cell"]
        out.update(
            energy=a.u_sum / a.samples - float(nu @ h),
            grad_l2=float(np.linalg.norm(a.cell_mass() - nu)),
            samples=a.samples,
            tv_noise_floor=floor,
            tv_upper_bound=floor > out["tv"] / 3,
            worst_cell_mass=float(a.cell_mass()[i]),
            worst_cell_target=float(nu[i]),
            worst_cell_noise=float(cell_noise(nu[i : i + 1], a.projections)[0]),
        )
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
