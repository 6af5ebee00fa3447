"""``dpmot bench solver``: Monte Carlo samples needed to reach the reference schedule's accuracy.

For each problem, (a) the reference code's schedule (DESIGN §5: Adam without bias correction,
10 samples per cell, ×2 samples and ×0.8 step after 50 stalled iterations, at most 3 times,
the last iterate, lr the best of a grid) and (b) this project's default solver run on the
same source (ours draws its default source: scrambled Sobol points for D ≤ 16, lattice
points in random subspaces for the Gaussian source above; the reference, like the DPM-OT
reference code, plain random points unless ``--reference-qmc``). Samples count projections:
source points whose scores against every target are computed (N·D flops each; a lattice's
extra points cost (2m + 1)·N flops each, see :mod:`dpmot_dist.ot.sources`).
Their potential is snapshot when the samples used cross each budget, and its accuracy is the
TV of the cell masses: exact (2-D uniform square, by polygon clipping) or measured on a
fresh evaluation sample whose noise floor sqrt(N / 2πB) is at most a third of the reported
TV. ``sample_ratio`` = reference's samples ÷ ours to reach the reference's final
TV, interpolating log TV against log samples between our budgets.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from dpmot_dist.errors import DpmotError
from dpmot_dist.ot import exact
from dpmot_dist.ot.assign import LocalAssigner
from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.solver import EVAL_STREAM, SDOTSolver, tv_noise_floor
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
)


MAX_EVAL = 1 << 25


@dataclass(frozen=True)
class Problem:
    name: str
    y: np.ndarray
    source: str

    @property
    def n(self) -> int:
        return len(self.y)


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Targets in ``clusters`` tight groups (spread 0.3) around centres ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(clusters, size=n)
    return (centres[labels] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def problems(quick: bool = False) -> list[Problem]:
    rng = np.random.default_rng(3)
    square = rng.uniform(-0.5, 0.5, size=(100 if quick else 200, 2)).astype(np.float32)
    out = [
        Problem("clustered-N1000-D32", clustered(1000, 32, 10, 1), "gaussian"),
        Problem("square-2d-uniform", square, "uniform"),
    ]
    if not quick:
        out.insert(1, Problem("clustered-N5000-D128", clustered(5000, 128, 20, 2), "gaussian"))
    return out


def accuracy(problem: Problem, assigner: LocalAssigner, h: np.ndarray, eval_samples: int):
    """(TV, noise floor): exact for the 2-D square, else on a fresh evaluation sample.

    The evaluation sample grows (up to ``MAX_EVAL``) until its own noise floor
    sqrt(N / 2πB) is at most a third of the TV it measures.
    """
    nu = np.full(problem.n, 1.0 / problem.n)
    if problem.source == "uniform" and problem.y.shape[1] == 2:
        mu = exact.cell_areas_2d_square(problem.y.astype(float), h)
        return exact.total_variation(mu, nu), 0.0
    samples = eval_samples
    while True:
        a = assigner.assign(h, (EVAL_STREAM, 7), samples)
        tv, floor = exact.total_variation(a.cell_mass(), nu), tv_noise_floor(problem.n, samples)
        if floor <= tv / 3 or samples >= MAX_EVAL:
            return tv, floor
        samples = min(MAX_EVAL, math.ceil(samples * (3.3 * floor / tv) ** 2))


def run_method(
    problem: Problem,
    solver: SDOTSolver,
    budgets: list[int],
    eval_samples: int,
    seed: int = 0,
    source: Source | None = None,
) -> list[dict]:
    """TV of ``solver``'s potential each time its samples cross a budget.

    The solver draws its batches from ``source`` (default: plain random points of the
    problem's measure); the evaluation sample is always plain Monte Carlo, so its noise floor
    formula holds.
    """
    index = TargetIndex(problem.y)
    source = source or Source(kind=problem.source)
    assigner = LocalAssigner(index, source, seed, chunk=8192)
    evaluator = LocalAssigner(index, Source(kind=problem.source), seed, chunk=8192)
    nu = np.full(problem.n, 1.0 / problem.n)
    state = solver.init_state(assigner)
    out = []
    pending = sorted(budgets)
    while pending:
        solver.step(assigner, nu, state)
        while pending and state.samples >= pending[0]:
            tv, floor = accuracy(problem, evaluator, solver.potential(state), eval_samples)
            out.append(
                {"budget": pending.pop(0), "samples": state.samples, "tv": tv, "noise_floor": floor}
            )
    return out


def samples_to_reach(curve: list[dict], target: float) -> float:
    """Samples at which ``curve`` first reaches TV ≤ target (log-log interpolation)."""
    for prev, cur in zip([None, *curve[:-1]], curve, strict=True):
        if cur["tv"] > target:
            continue
        if prev is None:
            return float(cur["samples"])
        x0, x1 = math.log(prev["samples"]), math.log(cur["samples"])
        y0, y1 = math.log(prev["tv"]), math.log(cur["tv"])
        return math.exp(x0 + (math.log(target) - y0) * (x1 - x0) / (y1 - y0))
    return math.inf


def lr_grid(problem: Problem, scales: list[float]) -> list[float]:
    """Reference step sizes: ``scales`` × the score gap of the problem (scale-free grid)."""
    assigner = LocalAssigner(TargetIndex(problem.y), Source(kind=problem.source), 0)
    gap = assigner.score_gap((2,), min(4096, 64 * problem.n))
    return [s * gap for s in scales]


def bench_problem(
    problem: Problem,
    ours: SDOTSolver,
    budgets: list[int],
    scales: list[float],
    log,
    reference_qmc: bool = False,
    lattice: int | None = None,
) -> dict:
    eval_samples = int(min(max(64 * problem.n, 1 << 18), 1 << 24))
    ref_source = Source(kind=problem.source, qmc=reference_qmc)
    tried: dict[float, float] = {}
    curves: dict[float, list[dict]] = {}

    def try_lr(lr: float) -> None:
        t0 = time.perf_counter()
        curves[lr] = run_method(
            problem, replace(REFERENCE, lr=lr), budgets, eval_samples, source=ref_source
        )
        tried[lr] = curves[lr][-1]["tv"]
        log(f"  reference lr {lr:.4g}: TV {tried[lr]:.4f} ({time.perf_counter() - t0:.0f} s)")

    grid = lr_grid(problem, scales)
    for lr in grid:
        try_lr(lr)
    # a best step size on the edge of the grid may not be the best: extend the grid past
    # that edge (by the grid's own ratio, at most twice) until the best is inside it
    ratio = grid[-1] / grid[0] if len(grid) > 1 else 3.0
    ratio = ratio ** (1 / max(1, len(grid) - 1))
    for _ in range(2):
        lo, hi, best_lr = min(tried), max(tried), min(tried, key=tried.get)
        if len(tried) > 1 and best_lr not in (lo, hi):
            break
        try_lr(best_lr / ratio if best_lr == lo else best_lr * ratio)
    best = min(tried.items(), key=lambda item: item[1])
    ref = curves[best[0]]  # each lr's run is evaluated at every budget: no re-run
    ours_budgets = sorted({*budgets, *[b // 10 for b in budgets], *[b // 30 for b in budgets]})
    source = default_source(problem.source, problem.y.shape[1], lattice=lattice)
    t0 = time.perf_counter()
    mine = run_method(problem, ours, ours_budgets, eval_samples, source=source)
    log(f"  ours (qmc {source.qmc}, lattice {source.lattice}): {time.perf_counter() - t0:.0f} s")
    target = ref[-1]["tv"]
    needed = samples_to_reach(mine, target)
    by_budget = {c["budget"]: c for c in mine}
    return {
        "name": problem.name,
        "n": problem.n,
        "dim": int(problem.y.shape[1]),
        "source": problem.source,
        "ours_qmc": source.qmc,
        "ours_lattice": source.lattice,
        "reference_qmc": reference_qmc,
        "reference_lr": best[0],
        "reference_lr_grid": [{"lr": lr, "tv": tv} for lr, tv in sorted(tried.items())],
        "budgets": [
            {
                "samples": r["budget"],
                "reference_tv": r["tv"],
                "ours_tv": by_budget[r["budget"]]["tv"],
                "noise_floor": r["noise_floor"],
            }
            for r in ref
        ],
        "ours_curve": mine,
        "reference_final_tv": target,
        # not reached within our budgets: null (strict JSON has no Infinity) and ratio 0
        "ours_samples_to_reference_tv": needed if math.isfinite(needed) else None,
        "sample_ratio": ref[-1]["samples"] / needed,
    }


def plot(report: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = report["problems"]
    fig, axes = plt.subplots(1, len(probs), figsize=(4.5 * len(probs), 3.8))
    for ax, p in zip(np.atleast_1d(axes), probs, strict=True):
        ax.loglog(
            [b["samples"] for b in p["budgets"]],
            [b["reference_tv"] for b in p["budgets"]],
            "o-",
            label="reference schedule",
        )
        ax.loglog(
            [c["samples"] for c in p["ours_curve"]],
            [c["tv"] for c in p["ours_curve"]],
            "s-",
            label="dpmot default",
        )
        ax.set(title=f"{p['name']}\nratio {p['sample_ratio']:.1f}×", xlabel="samples", ylabel="TV")
        ax.legend()
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
    parser.add_argument("--quick", action="store_true", help="small problems only")
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
        help="ours: lattice points per random subspace (default: the solver's default "
        "source; 0: independent points)",
    )
    parser.add_argument("--json", action="store_true")


def cli_main(args: argparse.Namespace) -> int:
    budgets = [int(float(b)) for b in args.budgets.split(",")]
    scales = [float(s) for s in args.lr_scales.split(",")]
    ours = SDOTSolver(max_iters=10**9)
    report = {"problems": []}
    chosen = problems(args.quick)
    if args.problems:
        names = args.problems.split(",")
        unknown = sorted(set(names) - {p.name for p in chosen})
        if unknown:
            raise DpmotError(f"--problems: unknown problem(s) {', '.join(unknown)}")
        chosen = [p for p in chosen if p.name in names]
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
        )
        report["problems"].append(r)
        for b in r["budgets"]:
            print(
                f"  {b['samples']:>12,d} samples: reference TV {b['reference_tv']:.4f}   "
                f"ours {b['ours_tv']:.4f}"
            )
        if r["ours_samples_to_reference_tv"] is not None:
            print(
                f"  ours reaches the reference's final TV {r['reference_final_tv']:.4f} with "
                f"{r['ours_samples_to_reference_tv']:,.0f} samples: "
                f"ratio {r['sample_ratio']:.1f}×",
                flush=True,
            )
        else:
            print(
                f"  ours does not reach the reference's final TV {r['reference_final_tv']:.4f} "
                f"within {budgets[-1]:,d} samples: ratio < 1 (reported as 0)",
                flush=True,
            )
    plot(report, args.png)
    print(f"plot: {args.png}")
    if args.json:
        print(json.dumps(report))
    return 0
