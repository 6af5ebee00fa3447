"""``dpmot bench tta``: wall-clock time to a TV, the default fit against plain Monte Carlo.

On the digits targets (the 1,797 scikit-learn digits prepared at VP-linear step 10, N = 1,797,
D = 64; ``--problem`` picks another of ``dpmot bench solver``'s problems), in one process and
on the same threads:

1. ``dpmot fit`` with its defaults (calibrated source, snapshot control variate, stopping by
   itself), timed wall clock (calibration and the final evaluation included); its final
   fresh-sample TV is T;
2. ``dpmot fit --lattice 0 --control-variate none --tol-tv T``: plain independent points,
   stopping once its fresh-sample TV (checked every ``--check-every`` iterations) reaches T.

It reports each run's seconds, iterations, projections, stop reason and TV, and
``time_ratio`` = plain seconds ÷ default seconds (> 1: the default reaches T sooner).

The fit's own tolerance checks are Monte Carlo samples of at most 16 × 64·N points, whose
noise floor (≈ 0.0125 on digits) hides a TV below it. So with ``--eval-curve`` the bench also
measures both with ``bench solver``'s evaluator (lattice points, measured noise floor; not
timed): the default fit's potential gives T_eval, and plain Monte Carlo (the solver
``--lattice 0 --control-variate none`` runs, iterated to the cap without stopping, so it gets
every chance) is evaluated each time its projections double, until its TV ≤ T_eval. Its
fit-loop seconds to T_eval (log-log interpolation, evaluations excluded) ÷ the default's wall
seconds (calibration, final evaluation and writes included) is ``time_ratio_eval``; when
plain never gets there, its seconds at the cap bound it from below
(``time_ratio_eval_lower_bound``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from dpmot_dist.benchmarks.solver import (
    accuracy,
    eval_samples_for,
    evaluator_for,
    problems,
    reach,
    run_method,
)
from dpmot_dist.ot.assign import LocalAssigner
from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.solver import SDOTSolver
from dpmot_dist.ot.sources import Source
from dpmot_dist.pipelines.fit import FitConfig, run_fit


def _fit(targets: str, out: str, **options) -> dict:
    t0 = time.perf_counter()
    result = run_fit(FitConfig(targets=targets, out=out, overwrite=True, **options))
    seconds = time.perf_counter() - t0
    manifest = json.loads((Path(out) / "_manifest.json").read_text())
    fit_seconds = sum(m.get("t_iter", 0.0) for m in result.metrics)
    return {
        "options": options,
        "seconds": seconds,
        "logged_iter_seconds": fit_seconds,
        "iterations": result.iterations,
        "projections": result.samples,
        "stop_reason": result.stop_reason,
        "tv": result.evaluation.get("tv"),
        "max_rel_err": result.evaluation.get("max_rel_err"),
        "source": {k: manifest[k] for k in ("qmc", "lattice", "lattice_rank")},
        "calibration": manifest.get("calibration", {}).get("chosen"),
    }, result.h


def plain_curve(problem, evaluator, target: float, iters: int, seed: int) -> list[dict]:
    """Plain Monte Carlo's TV (bench evaluator) each time its projections double, with its
    fit-loop seconds, until TV ≤ ``target`` or ``iters`` iterations."""
    solver = SDOTSolver(control_variate="none", stop="cap", max_iters=iters)
    assigner = LocalAssigner(evaluator.index, Source(kind=problem.source), seed, chunk=8192)
    budgets = [8 * problem.n << k for k in range(64)]  # doubling; the cap or the target ends it
    return run_method(
        problem, solver, budgets, eval_samples_for(problem), assigner, evaluator, target=target
    )


def run(args: argparse.Namespace) -> dict:
    problem = next(p for p in problems(quick=True) if p.name.startswith(args.problem))
    with tempfile.TemporaryDirectory(prefix="dpmot-bench-tta-") as tmp:
        targets = str(Path(tmp) / "y.npy")
        np.save(targets, problem.y)
        common = {"seed": args.seed, "iters": args.iters, "source": problem.source}
        print(f"{problem.name}: default fit …", flush=True)
        default, h = _fit(targets, str(Path(tmp) / "default"), **common)
        tv = default["tv"]
        print(f"  {default['seconds']:.1f} s to TV {tv:.4f}; plain to the same TV …", flush=True)
        plain, _ = _fit(
            targets,
            str(Path(tmp) / "plain"),
            **common,
            lattice=0,
            control_variate="none",
            tol_tv=max(tv, args.tv_floor),
            check_every=args.check_every,
        )
    out = {
        "problem": problem.name,
        "n": int(problem.y.shape[0]),
        "dim": int(problem.y.shape[1]),
        "default": default,
        "plain": plain,
        "time_ratio": plain["seconds"] / default["seconds"],
        "plain_reached": plain["stop_reason"] == "tolerance",
    }
    if args.eval_curve:
        evaluator = evaluator_for(problem, TargetIndex(problem.y))
        target, floor = accuracy(problem, evaluator, h, eval_samples_for(problem))
        print(f"  default TV {target:.4f} (floor {floor:.4f}) on the bench evaluator …")
        curve = plain_curve(problem, evaluator, target, args.iters, args.seed)
        seconds = reach(curve, target, "seconds")
        bound = not math.isfinite(seconds)
        out.update(
            default_eval_tv=target,
            default_eval_floor=floor,
            plain_curve=curve,
            plain_seconds_to_default_eval_tv=None if bound else seconds,
            time_ratio_eval=(curve[-1]["seconds"] if bound else seconds) / default["seconds"],
            time_ratio_eval_lower_bound=bound,
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", default="digits", help="a bench solver problem (prefix)")
    parser.add_argument("--iters", type=int, default=1000, help="iteration cap of both fits")
    parser.add_argument("--check-every", type=int, default=10, help="plain run's TV checks")
    parser.add_argument("--tv-floor", type=float, default=0.0, help="lowest TV asked of plain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-curve",
        action="store_true",
        help="also compare on bench solver's evaluator (slow: at TV ≈ 0.006 on digits each "
        "evaluation takes up to 2^25 lattice projections)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    r = run(args)
    print(f"{r['problem']} (N={r['n']}, D={r['dim']}):")
    for name in ("default", "plain"):
        f = r[name]
        print(
            f"  {name:8s} {f['seconds']:8.1f} s  {f['iterations']:5d} it  "
            f"{f['projections']:.3g} projections  TV {f['tv']:.4f}  ({f['stop_reason']}; "
            f"source {f['source']})"
        )
    print(f"  time ratio plain ÷ default: {r['time_ratio']:.2f}")
    if "time_ratio_eval" in r:
        reached = r["plain_seconds_to_default_eval_tv"]
        print(
            f"  on the bench evaluator: default TV {r['default_eval_tv']:.4f} "
            f"(floor {r['default_eval_floor']:.4f}); plain "
            + (f"reaches it in {reached:.1f} s" if reached else "never reaches it")
            + f": time ratio plain ÷ default {'> ' if reached is None else ''}"
            f"{r['time_ratio_eval']:.2f}"
        )
    if args.json:
        print(json.dumps(r))
    return 0
