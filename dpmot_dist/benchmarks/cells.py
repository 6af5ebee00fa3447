"""``dpmot bench cells``: the exact 2-D problem, every cell's error, and the wall seconds.

N = 100 targets uniform in [−0.4, 0.4]² (seed 0), the uniform source on [−½, ½]², uniform
weights and weights uniform in [0.5, 2] (seed 1, normalised). Cell masses at the fitted h are
exact (:func:`dpmot_dist.ot.exact.cell_areas_2d_square`, half-plane clipping), so the TV and
the worst cell carry no sampling noise. Per weighting it runs, in one process:

* ``default``: ``dpmot fit --source uniform`` with its defaults (Adam's moments reset at each
  phase, stopping once converged);
* ``before``: the earlier behaviour, ``--adam-reset none --stop cap --iters 1000`` (Adam's
  second moment carries the start's gradients; the full 1,000 iterations).

Each run reports seconds, iterations, projections, exact TV, the worst cell (its index, exact
and target mass, relative error) and the stop reason.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dpmot_dist.ot.exact import cell_areas_2d_square, total_variation
from dpmot_dist.pipelines.fit import FitConfig, run_fit

VARIANTS = {
    "default": {},
    "before": {"adam_reset": "none", "stop": "cap", "iters": 1000},
}


def problem(n: int = 100) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The targets and the two weightings."""
    y = np.random.default_rng(0).uniform(-0.4, 0.4, size=(n, 2))
    w = np.random.default_rng(1).uniform(0.5, 2.0, size=n)
    return y, {"uniform": np.full(n, 1.0 / n), "weighted": w / w.sum()}


def exact_errors(y: np.ndarray, h: np.ndarray, nu: np.ndarray) -> dict:
    mu = cell_areas_2d_square(y, h)
    rel = mu / nu - 1.0
    worst = int(np.argmax(np.abs(rel)))
    return {
        "tv": total_variation(mu, nu),
        "worst_cell": worst,
        "worst_rel_err": float(rel[worst]),
        "worst_mass": float(mu[worst]),
        "worst_target_mass": float(nu[worst]),
        "worst_target": [float(v) for v in y[worst]],
    }


def run(args: argparse.Namespace) -> dict:
    y, weightings = problem(args.n)
    report: dict = {"n": args.n, "runs": []}
    with tempfile.TemporaryDirectory(prefix="dpmot-bench-cells-") as tmp:
        targets = Path(tmp) / "y.npy"
        np.save(targets, y.astype(np.float32))
        # the fit's targets are float32: the exact masses are of those points
        y32 = y.astype(np.float32).astype(np.float64)
        for weighting, nu in weightings.items():
            weights = Path(tmp) / f"{weighting}.npy"
            np.save(weights, nu)
            for variant in args.variants.split(","):
                options = {"iters": args.iters, **VARIANTS[variant]}
                t0 = time.perf_counter()
                result = run_fit(
                    FitConfig(
                        targets=str(targets),
                        weights=str(weights),
                        out=str(Path(tmp) / f"{weighting}-{variant}"),
                        source="uniform",
                        seed=args.seed,
                        eval_samples=args.eval_samples,
                        **options,
                    )
                )
                seconds = time.perf_counter() - t0
                record = {
                    "weighting": weighting,
                    "variant": variant,
                    "options": options,
                    "seconds": seconds,
                    "iterations": result.iterations,
                    "projections": result.samples,
                    "stop_reason": result.stop_reason,
                    **exact_errors(y32, result.h, nu),
                }
                report["runs"].append(record)
                print(
                    f"{weighting:8s} {variant:8s} {seconds:7.1f} s  {result.iterations:5d} it  "
                    f"{result.samples:.3g} projections  exact TV {record['tv']:.5f}  worst cell "
                    f"{record['worst_cell']} {record['worst_rel_err']:+.1%}  "
                    f"({result.stop_reason})",
                    flush=True,
                )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=100, help="targets N")
    parser.add_argument("--variants", default="default,before", help="comma-separated")
    parser.add_argument("--iters", type=int, default=1000, help="iteration cap (default run)")
    parser.add_argument("--eval-samples", type=int, default=None, help="final evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    report = run(args)
    if args.json:
        print(json.dumps(report))
    return 0
