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
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dpmot_dist.benchmarks.solver import problems
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
    }


def run(args: argparse.Namespace) -> dict:
    problem = next(p for p in problems(quick=True) if p.name.startswith(args.problem))
    with tempfile.TemporaryDirectory(prefix="dpmot-bench-tta-") as tmp:
        targets = str(Path(tmp) / "y.npy")
        np.save(targets, problem.y)
        common = {"seed": args.seed, "iters": args.iters, "source": problem.source}
        print(f"{problem.name}: default fit …", flush=True)
        default = _fit(targets, str(Path(tmp) / "default"), **common)
        tv = default["tv"]
        print(f"  {default['seconds']:.1f} s to TV {tv:.4f}; plain to the same TV …", flush=True)
        plain = _fit(
            targets,
            str(Path(tmp) / "plain"),
            **common,
            lattice=0,
            control_variate="none",
            tol_tv=max(tv, args.tv_floor),
            check_every=args.check_every,
        )
    return {
        "problem": problem.name,
        "n": int(problem.y.shape[0]),
        "dim": int(problem.y.shape[1]),
        "default": default,
        "plain": plain,
        "time_ratio": plain["seconds"] / default["seconds"],
        "plain_reached": plain["stop_reason"] == "tolerance",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", default="digits", help="a bench solver problem (prefix)")
    parser.add_argument("--iters", type=int, default=1000, help="iteration cap of both fits")
    parser.add_argument("--check-every", type=int, default=10, help="plain run's TV checks")
    parser.add_argument("--tv-floor", type=float, default=0.0, help="lowest TV asked of plain")
    parser.add_argument("--seed", type=int, default=0)
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
    if args.json:
        print(json.dumps(r))
    return 0
