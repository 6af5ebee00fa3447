"""``dpmot bench solver``: samples *and seconds* to reach the reference schedule's accuracy.

For each problem, in one run on the same threads:

(a) the reference: the DPM-OT reference code's schedule (DESIGN §5: Adam without bias
    correction, 10 samples per cell, ×2 samples and ×0.8 step after 50 stalled iterations, at
    most 3 times, the last iterate, lr the best of a grid) with the reference code's own
    search (:class:`ReferenceAssigner`: plain random points of the problem's measure, scores
    against chunks of 1,000 targets and a running max, then a bincount);
(b) ours: ``dpmot fit``'s defaults (the source calibrated on the problem, see
    :mod:`dpmot_dist.ot.calibrate`; the default solver, which stops by itself);
(c) the peer, when ``ott-jax`` is installed: OTT-JAX's ``SemidiscreteSolver`` (SGD on the dual
    with an EMA of the potential, as its documentation uses it) at its best setting from a
    small grid (step size × decay schedule × ε ∈ {0, small}).

Seconds count the whole fit loop (point generation, search, statistics, update; for ours the
calibration too), not the evaluations. Samples count projections: source points whose
scores against every target are computed. A potential's accuracy is the TV of its cell
masses: exact (2-D uniform square, polygon clipping) or on a fresh evaluation sample whose
noise floor is at most a third of the reported TV. For the Gaussian source in D ≥ 3 that
sample is lattice points (unbiased, with several times less variance per projection than
independent points) in ``EVAL_GROUPS`` independent groups, and the floor is measured: the
expected TV of a perfect potential, Σ_i σ̂_i / sqrt(2π), with σ̂_i the standard error of cell
i's mass from the spread between groups (for independent points it is ≈ sqrt(N / 2πB)).

``sample_ratio`` (``time_ratio``) = the reference's samples (seconds) to its final TV ÷ ours
to the same TV, interpolating log TV against log samples (seconds) between our budgets;
``peer_time_ratio`` = the peer's seconds to the reference's final TV ÷ ours; when the peer
does not reach it within its largest budget, its seconds there ÷ ours, a lower bound
(``peer_time_ratio_lower_bound``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dpmot_dist.errors import DpmotError
from dpmot_dist.ot import exact
from dpmot_dist.ot.assign import Assignment, LocalAssigner
from dpmot_dist.ot.calibrate import calibrate, candidate_sources
from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.solver import EVAL_STREAM, SDOTSolver
from dpmot_dist.ot.sources import Source, default_source

REFERENCE = SDOTSolver(
    bias_correction=False,
    averaging="none",
    adam_eps=1e-8,
    samples_per_cell=10.0,
    min_batch=1,
    patience=50,
    growth=2.0,
    lr_decay=0.8,
    max_growths=3,
    max_iters=10**9,
    stall_rule="best",
    control_variate="none",
    adam_reset="none",
    stop="cap",
)

MAX_EVAL = 1 << 25
EVAL_GROUPS = 16
EVAL_LATTICE = 64


@dataclass(frozen=True)
class Problem:
    name: str
    y: np.ndarray
    source: str
    budgets: tuple[int, ...] | None = None  # sample budgets (None: --budgets)

    @property
    def n(self) -> int:
        return len(self.y)


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Targets in ``clusters`` tight groups (spread 0.3) around centres ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(clusters, size=n)
    return (centres[labels] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def digits_targets(step: int = 10) -> np.ndarray:
    """The 1,797 scikit-learn 8×8 digits scaled to [−1, 1] and prepared by ``dpmot prepare``
    (VP-linear, step M = 10, seed 0): real data, N = 1,797, D = 64."""
    from sklearn.datasets import load_digits

    from dpmot_dist.io import datasets
    from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare

    x = (load_digits().images / 8.0 - 1.0).astype(np.float32)[:, None]
    with tempfile.TemporaryDirectory(prefix="dpmot-digits-") as tmp:
        np.save(Path(tmp) / "digits.npy", x)
        out = str(Path(tmp) / "targets")
        run_prepare(
            PrepareConfig(data=str(Path(tmp) / "digits.npy"), out=out, step=step, workers=0)
        )
        return datasets.load_targets(out)


def problems(quick: bool = False) -> list[Problem]:
    rng = np.random.default_rng(3)
    square = rng.uniform(-0.5, 0.5, size=(100 if quick else 200, 2)).astype(np.float32)
    out = [
        Problem("clustered-N1000-D32", clustered(1000, 32, 10, 1), "gaussian"),
        Problem("square-2d-uniform", square, "uniform"),
        Problem("digits-N1797-D64", digits_targets(), "gaussian"),
    ]
    if not quick:
        # here the GEMM dominates, as at ImageNet scale; smaller budgets: a projection costs
        # 2·N·D = 4.1 MFLOP, 32× the clustered D = 32 problem's
        big = clustered(2000, 1024, 10, 4)
        budgets = (100_000, 300_000, 1_000_000)
        out.insert(2, Problem("clustered-N2000-D1024", big, "gaussian", budgets))
        out.append(Problem("clustered-N5000-D128", clustered(5000, 128, 20, 2), "gaussian"))
    return out


class ReferenceAssigner:
    """The reference code's cell statistics: plain random points, their scores against chunks
    of 1,000 targets in fp32 with a running max across chunks, then a bincount."""

    def __init__(self, y: np.ndarray, source: Source, seed: int, chunk: int = 8192) -> None:
        self.y = torch.as_tensor(y, dtype=torch.float32)
        self.n, self.dim = self.y.shape
        self.source, self.seed, self.chunk = source, seed, chunk

    def assign(self, h, key, samples: int, epsilon: float = 0.0, k: int = 1) -> Assignment:
        from dpmot_dist.benchmarks.search import reference_search

        h32 = torch.as_tensor(h, dtype=torch.float32)
        counts, u_sum = np.zeros(self.n, np.int64), 0.0
        for b, start in enumerate(range(0, samples, self.chunk)):
            x = self.source.sample(min(self.chunk, samples - start), self.dim, self.seed, *key, b)
            v, i = reference_search(x, self.y, h32)
            counts += np.bincount(i.numpy(), minlength=self.n)
            u_sum += float(v.double().sum())
        return Assignment(counts, u_sum, samples)


def evaluator_for(problem: Problem, index: TargetIndex) -> LocalAssigner:
    """The assigner that measures every method's potentials: lattice points for the Gaussian
    source in D ≥ 3, else the problem's own measure."""
    lattice = EVAL_LATTICE if problem.source == "gaussian" and problem.y.shape[1] >= 3 else 0
    return LocalAssigner(index, Source(kind=problem.source, lattice=lattice), 0, chunk=8192)


def accuracy(problem: Problem, assigner: LocalAssigner, h: np.ndarray, eval_samples: int):
    """(TV, noise floor): exact for the 2-D square, else on a fresh evaluation sample.

    The sample (``EVAL_GROUPS`` independent groups) grows, up to ``MAX_EVAL`` projections,
    until its noise floor is at most a third of the TV it measures; the floor is measured from
    the groups' spread (see the module docstring).
    """
    nu = np.full(problem.n, 1.0 / problem.n)
    if problem.source == "uniform" and problem.y.shape[1] == 2:
        mu = exact.cell_areas_2d_square(problem.y.astype(float), h)
        return exact.total_variation(mu, nu), 0.0
    samples = eval_samples
    while True:
        per = -(-samples // EVAL_GROUPS)
        masses = np.stack(
            [assigner.assign(h, (EVAL_STREAM, 7, samples, g), per).cell_mass()
             for g in range(EVAL_GROUPS)]
        )  # fmt: skip
        tv = exact.total_variation(masses.mean(0), nu)
        se = np.sqrt(masses.var(0, ddof=1) / EVAL_GROUPS)
        floor = float(se.sum()) / math.sqrt(2 * math.pi)
        if floor <= tv / 3 or samples >= MAX_EVAL:
            return tv, floor
        samples = min(MAX_EVAL, math.ceil(samples * (3.3 * floor / tv) ** 2))


def eval_samples_for(problem: Problem) -> int:
    """The first evaluation sample's size: 64 per cell in [2^18, 2^24] (it grows from there)."""
    return int(min(max(64 * problem.n, 1 << 18), 1 << 24))


def run_method(
    problem: Problem,
    solver: SDOTSolver,
    budgets: list[int],
    eval_samples: int,
    assigner,
    evaluator: LocalAssigner,
    seconds: float = 0.0,
    target: float | None = None,
) -> list[dict]:
    """TV of ``solver``'s potential each time its samples cross a budget, and the seconds of
    fit loop spent so far (starting from ``seconds``, e.g. a calibration's). A solver that
    stops (by itself, or at ``solver.max_iters``) is evaluated once more where it stopped;
    given ``target``, the run ends at the first evaluation with TV ≤ target."""
    t0 = time.perf_counter()
    state = solver.init_state(assigner)
    seconds += time.perf_counter() - t0
    nu = np.full(problem.n, 1.0 / problem.n)
    out, pending = [], sorted(budgets)
    while pending:
        t0 = time.perf_counter()
        solver.step(assigner, nu, state)
        seconds += time.perf_counter() - t0
        stopped = state.converged or state.iteration >= solver.max_iters
        while pending and (state.samples >= pending[0] or stopped):
            tv, floor = accuracy(problem, evaluator, solver.potential(state), eval_samples)
            point = {"budget": pending.pop(0), "samples": state.samples, "seconds": seconds}
            out.append({**point, "tv": tv, "noise_floor": floor, "stopped": state.converged})
            if stopped or (target is not None and tv <= target):
                return out
    return out


def reach(curve: list[dict], target: float, axis: str = "samples") -> float:
    """The ``axis`` value (samples or seconds) at which ``curve`` first reaches TV ≤ target,
    interpolating log TV against log ``axis``; inf if never."""
    for prev, cur in zip([None, *curve[:-1]], curve, strict=True):
        if cur["tv"] > target:
            continue
        if prev is None or prev[axis] <= 0 or cur[axis] <= prev[axis]:
            return float(cur[axis])
        x0, x1 = math.log(prev[axis]), math.log(cur[axis])
        y0, y1 = math.log(prev["tv"]), math.log(cur["tv"])
        if y1 == y0:
            return float(cur[axis])
        return math.exp(x0 + (math.log(target) - y0) * (x1 - x0) / (y1 - y0))
    return math.inf


def samples_to_reach(curve: list[dict], target: float) -> float:
    """Samples at which ``curve`` first reaches TV ≤ target (log-log interpolation)."""
    return reach(curve, target, "samples")


def lr_grid(problem: Problem, scales: list[float]) -> list[float]:
    """Reference step sizes: ``scales`` × the score gap of the problem (scale-free grid)."""
    assigner = LocalAssigner(TargetIndex(problem.y), Source(kind=problem.source), 0)
    gap = assigner.score_gap((2,), min(4096, 64 * problem.n))
    return [s * gap for s in scales]


def _ratio(ref: float, ours: float) -> float:
    return ref / ours if ours and math.isfinite(ours) else 0.0


def _final(value: float) -> float | None:
    """Strict JSON: a value never reached is null."""
    return value if math.isfinite(value) else None


def run_reference(problem, budgets, scales, eval_samples, evaluator, log, reference_qmc):
    """The reference's best curve over the lr grid (extended past an edge holding the best)."""
    ref_source = Source(kind=problem.source, qmc=reference_qmc)
    tried: dict[float, float] = {}
    curves: dict[float, list[dict]] = {}

    def try_lr(lr: float) -> None:
        t0 = time.perf_counter()
        assigner = ReferenceAssigner(problem.y, ref_source, 0)
        solver = replace(REFERENCE, lr=lr)
        curves[lr] = run_method(problem, solver, budgets, eval_samples, assigner, evaluator)
        tried[lr] = curves[lr][-1]["tv"]
        log(f"  reference lr {lr:.4g}: TV {tried[lr]:.4f} ({time.perf_counter() - t0:.0f} s)")

    grid = lr_grid(problem, scales)
    for lr in grid:
        try_lr(lr)
    ratio = grid[-1] / grid[0] if len(grid) > 1 else 3.0
    ratio = ratio ** (1 / max(1, len(grid) - 1))
    for _ in range(2):
        lo, hi, best_lr = min(tried), max(tried), min(tried, key=tried.get)
        if len(tried) > 1 and best_lr not in (lo, hi):
            break
        try_lr(best_lr / ratio if best_lr == lo else best_lr * ratio)
    best = min(tried.items(), key=lambda item: item[1])
    return best[0], curves[best[0]], tried


def run_ours(problem, ours, budgets, eval_samples, evaluator, log, lattice):
    """``dpmot fit``'s defaults: the calibrated source (or ``lattice``), the default solver."""
    index = TargetIndex(problem.y)
    dim = problem.y.shape[1]
    assigner = LocalAssigner(index, default_source(problem.source, dim), 0, chunk=8192)
    t0 = time.perf_counter()
    calibration = {}
    if lattice is None:
        candidates = candidate_sources(problem.source, dim)
        projections = max(8 * 4096, 4 * problem.n)  # as dpmot fit calibrates
        calibration = calibrate(
            assigner, candidates, np.zeros(problem.n), projections, 8, ours.uses_control_variate
        )
    else:
        assigner.set_source(default_source(problem.source, dim, lattice=lattice))
    seconds = time.perf_counter() - t0
    ours_budgets = sorted({*budgets, *[b // 10 for b in budgets], *[b // 30 for b in budgets]})
    t0 = time.perf_counter()
    mine = run_method(problem, ours, ours_budgets, eval_samples, assigner, evaluator, seconds)
    source = assigner.source
    log(
        f"  ours (qmc {source.qmc}, lattice {source.lattice}; calibration "
        f"{seconds:.1f} s): {time.perf_counter() - t0:.0f} s"
    )
    return mine, source, calibration


def bench_problem(
    problem: Problem,
    ours: SDOTSolver,
    budgets: list[int],
    scales: list[float],
    log,
    reference_qmc: bool = False,
    lattice: int | None = None,
    peer: bool = True,
) -> dict:
    eval_samples = eval_samples_for(problem)
    index = TargetIndex(problem.y)
    evaluator = evaluator_for(problem, index)
    budgets = list(problem.budgets or budgets)
    best_lr, ref, tried = run_reference(
        problem, budgets, scales, eval_samples, evaluator, log, reference_qmc
    )
    mine, source, calibration = run_ours(
        problem, ours, budgets, eval_samples, evaluator, log, lattice
    )
    target = ref[-1]["tv"]
    needed, seconds = reach(mine, target, "samples"), reach(mine, target, "seconds")
    by_budget = {c["budget"]: c for c in mine}
    last = mine[-1]
    report = {
        "name": problem.name,
        "n": problem.n,
        "dim": int(problem.y.shape[1]),
        "source": problem.source,
        "ours_qmc": source.qmc,
        "ours_lattice": source.lattice,
        "ours_calibration": calibration,
        "reference_qmc": reference_qmc,
        "reference_lr": best_lr,
        "reference_lr_grid": [{"lr": lr, "tv": tv} for lr, tv in sorted(tried.items())],
        "budgets": [
            {
                "samples": r["budget"],
                "reference_tv": r["tv"],
                "reference_seconds": r["seconds"],
                "ours_tv": by_budget.get(r["budget"], last)["tv"],
                "ours_seconds": by_budget.get(r["budget"], last)["seconds"],
                "noise_floor": r["noise_floor"],
            }
            for r in ref
        ],
        "ours_curve": mine,
        "reference_curve": ref,
        "reference_final_tv": target,
        "reference_final_seconds": ref[-1]["seconds"],
        # not reached within our budgets: null (strict JSON has no Infinity) and ratio 0
        "ours_samples_to_reference_tv": _final(needed),
        "ours_seconds_to_reference_tv": _final(seconds),
        "sample_ratio": _ratio(ref[-1]["samples"], needed),
        "time_ratio": _ratio(ref[-1]["seconds"], seconds),
    }
    if peer and peer_available():
        curve, setting = run_peer(problem, budgets, evaluator, eval_samples, log)
        peer_seconds = reach(curve, target, "seconds")
        for b, c in zip(report["budgets"], curve, strict=True):
            b["peer_tv"], b["peer_seconds"] = c["tv"], c["seconds"]
        bound = not math.isfinite(peer_seconds)  # not reached: its last seconds bound it
        report.update(
            peer_curve=curve,
            peer_setting=setting,
            peer_seconds_to_reference_tv=_final(peer_seconds),
            peer_time_ratio=_ratio(curve[-1]["seconds"] if bound else peer_seconds, seconds),
            peer_time_ratio_lower_bound=bound,
        )
    return report


# ---------------------------------------------------------------------------------------------
# The peer: OTT-JAX's semidiscrete solver


def peer_available() -> bool:
    """Whether ``ott-jax`` (the optional ``bench`` extra) is installed."""
    try:
        import ott.solvers.linear.semidiscrete  # noqa: F401
    except ImportError:
        return False
    return True


PEER_BATCH = 1024
PEER_SCALES = (0.03, 0.1, 0.3)  # lr = scale × N × score gap (the dual's natural step)


def peer_fit(problem: Problem, samples: int, setting: dict) -> tuple[np.ndarray, float]:
    """OTT-JAX's ``SemidiscreteSolver`` on the problem for ``samples`` source points:
    h (our convention) and the seconds of its compiled run (compiled first, then timed)."""
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import optax
    from ott.geometry import costs
    from ott.geometry import semidiscrete_pointcloud as sdpc
    from ott.problems.linear import semidiscrete_linear_problem as sdlp
    from ott.solvers.linear import semidiscrete

    iters = max(1, samples // PEER_BATCH)
    lr = setting["lr"]
    schedule = optax.cosine_decay_schedule(lr, iters) if setting["schedule"] == "cosine" else lr
    if problem.source == "uniform":

        def sampler(rng, shape, dtype):
            return jr.uniform(rng, shape, dtype, -0.5, 0.5)
    else:
        sampler = jr.normal
    y = jnp.asarray(problem.y)
    geom = sdpc.SemidiscretePointCloud(
        sampler,
        y,
        cost_fn=costs.NegDotProduct(),
        epsilon=setting["epsilon"],
        relative_epsilon="std",
    )
    prob = sdlp.SemidiscreteLinearProblem(geom)
    solver = semidiscrete.SemidiscreteSolver(
        num_iterations=iters,
        batch_size=PEER_BATCH,
        optimizer=optax.sgd(schedule),
        error_eval_every=iters,
        error_num_repeats=1,
        threshold=0.0,
    )
    run = jax.jit(solver)
    run(jr.key(0), prob).g.block_until_ready()  # compile
    t0 = time.perf_counter()
    out = run(jr.key(1), prob)
    g = np.asarray(out.g.block_until_ready(), np.float64)
    return g - g.mean(), time.perf_counter() - t0


def run_peer(problem, budgets, evaluator, eval_samples, log) -> tuple[list[dict], dict]:
    """The peer's curve at its best setting, chosen at the smallest budget in two stages: the
    step size (cosine decay, ε = 0), then that step with a constant schedule or a small ε."""
    gap = lr_grid(problem, [1.0])[0]

    def score(setting: dict) -> float:
        h, _ = peer_fit(problem, min(budgets), setting)
        return accuracy(problem, evaluator, h, eval_samples)[0] if np.isfinite(h).all() else 1.0

    tried = {}
    for scale in PEER_SCALES:
        setting = {"lr": scale * problem.n * gap, "schedule": "cosine", "epsilon": 0.0}
        tried[json.dumps(setting)] = score(setting)
    best = json.loads(min(tried, key=tried.get))
    for change in ({"schedule": "constant"}, {"epsilon": 1e-3}):
        setting = {**best, **change}
        tried[json.dumps(setting)] = score(setting)
    best = json.loads(min(tried, key=tried.get))
    curve = []
    for budget in sorted(budgets):
        h, seconds = peer_fit(problem, budget, best)
        tv, floor = accuracy(problem, evaluator, h, eval_samples)
        curve.append({"budget": budget, "samples": budget, "seconds": seconds, "tv": tv})
        curve[-1]["noise_floor"] = floor
    log(f"  peer (OTT-JAX {best}): TV {curve[-1]['tv']:.4f} in {curve[-1]['seconds']:.1f} s")
    return curve, {**best, "grid": [{**json.loads(k), "tv": v} for k, v in tried.items()]}


# ---------------------------------------------------------------------------------------------
# Report


def plot(report: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = report["problems"]
    fig, axes = plt.subplots(2, len(probs), figsize=(4.5 * len(probs), 7.2), squeeze=False)
    for col, p in enumerate(probs):
        curves = {"reference schedule": p["reference_curve"], "dpmot default": p["ours_curve"]}
        if "peer_curve" in p:
            curves["OTT-JAX"] = p["peer_curve"]
        for row, axis in enumerate(("samples", "seconds")):
            ax = axes[row, col]
            for (label, curve), marker in zip(curves.items(), "os^", strict=False):
                ax.loglog(
                    [c[axis] for c in curve], [c["tv"] for c in curve], marker + "-", label=label
                )
            ratio = p["sample_ratio"] if axis == "samples" else p["time_ratio"]
            ax.set(title=f"{p['name']}\n{axis} ratio {ratio:.1f}×", xlabel=axis, ylabel="TV")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budgets", default="1e6,3e6,1e7", help="sample budgets")
    parser.add_argument(
        "--lr-scales",
        default="0.03,0.1,0.3",
        help="reference lr grid × score gap (extended past an edge that holds the best)",
    )
    parser.add_argument("--quick", action="store_true", help="the small problems only")
    parser.add_argument(
        "--problems", default=None, help="comma-separated problem names to run (default: all)"
    )
    parser.add_argument("--png", default="bench-solver.png", help="plot path")
    parser.add_argument(
        "--reference-qmc",
        action="store_true",
        help="the reference draws scrambled Sobol points too (as pyOMT does; the DPM-OT "
        "reference code draws plain uniform random points)",
    )
    parser.add_argument(
        "--lattice",
        type=int,
        default=None,
        help="ours: lattice points per random subspace (default: the calibrated source; "
        "0: independent points)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip OTT-JAX even if installed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--json", action="store_true")


def cli_main(args: argparse.Namespace) -> int:
    from dpmot_dist.runtime import set_threads

    set_threads(args.threads or os.cpu_count())
    budgets = [int(float(b)) for b in args.budgets.split(",")]
    scales = [float(s) for s in args.lr_scales.split(",")]
    ours = SDOTSolver(max_iters=10**9)
    report = {"problems": [], "threads": torch.get_num_threads()}
    chosen = problems(args.quick)
    if args.problems:
        names = args.problems.split(",")
        chosen = problems(quick=False) + [p for p in chosen if p.name == "square-2d-uniform"]
        unknown = sorted(set(names) - {p.name for p in chosen})
        if unknown:
            raise DpmotError(f"--problems: unknown problem(s) {', '.join(unknown)}")
        chosen = [p for p in chosen if p.name in names]
        chosen = list({p.name: p for p in chosen}.values())
    for problem in chosen:
        print(f"{problem.name}: N={problem.n}, D={problem.y.shape[1]}", flush=True)
        r = bench_problem(
            problem,
            ours,
            budgets,
            scales,
            lambda s: print(s, flush=True),
            reference_qmc=args.reference_qmc,
            lattice=args.lattice,
            peer=not args.no_peer,
        )
        report["problems"].append(r)
        print_problem(r)
    plot(report, args.png)
    print(f"plot: {args.png}")
    if args.json:
        print(json.dumps(report))
    return 0


def print_problem(r: dict) -> None:
    peer = "peer_tv" in r["budgets"][0]
    head = f"  {'samples':>12}  {'reference TV (s)':>18}  {'ours TV (s)':>18}"
    print(head + (f"  {'OTT-JAX TV (s)':>18}" if peer else ""))
    for b in r["budgets"]:
        line = (
            f"  {b['samples']:>12,d}  {b['reference_tv']:9.4f} ({b['reference_seconds']:6.1f})"
            f"  {b['ours_tv']:9.4f} ({b['ours_seconds']:6.1f})"
        )
        if peer:
            line += f"  {b['peer_tv']:9.4f} ({b['peer_seconds']:6.1f})"
        print(line)
    target = r["reference_final_tv"]
    if r["ours_samples_to_reference_tv"] is None:
        print(f"  ours does not reach the reference's final TV {target:.4f}: ratios 0", flush=True)
        return
    print(
        f"  ours reaches the reference's final TV {target:.4f} with "
        f"{r['ours_samples_to_reference_tv']:,.0f} samples in "
        f"{r['ours_seconds_to_reference_tv']:.1f} s: sample ratio {r['sample_ratio']:.1f}×, "
        f"time ratio {r['time_ratio']:.1f}×"
        + (
            f", OTT-JAX ÷ ours {'> ' if r['peer_time_ratio_lower_bound'] else ''}"
            f"{r['peer_time_ratio']:.1f}×"
            if r.get("peer_time_ratio")
            else ""
        ),
        flush=True,
    )
