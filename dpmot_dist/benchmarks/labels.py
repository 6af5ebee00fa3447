"""``dpmot bench labels``: ``fit --by-label`` against one global fit of the same targets.

A synthetic labelled set: C classes (default 1,000) of ``--per-class`` targets each in R^D,
class c's targets drawn around its own random mean, in shuffled target order (the classes
interleave, as in a Parquet data set). Both fits go through
:func:`dpmot_dist.pipelines.fit.run_fit` with the same solver options, iteration cap,
workers, source and evaluation size per problem: one SDOT problem over all N = C × per-class
targets, then C independent problems of ``--per-class`` targets. The source defaults to plain
Monte Carlo points (``--lattice 0``): on CPU the lattice source costs more wall-clock per
iteration than it saves, worst of all on problems of a few targets. Reported: wall-clock seconds
of each, their ratio, and the fresh-sample TV of each (the global map's over all N cells;
the per-class maps' mixed by class mass, TV = Σ_c ν(I_c) TV_c — what sampling a class by its
mass, then its map, gives).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dpmot_dist.io import datasets
from dpmot_dist.pipelines.fit import FitConfig, run_fit


def labelled_targets(classes: int, per_class: int, dim: int, seed: int) -> tuple:
    """(y (N, D) float32, labels (N,)): class c around mean 3·m_c, m_c ~ N(0, I), shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    means = 3 * rng.standard_normal((classes, dim))
    y = means[labels] + rng.standard_normal((len(labels), dim))
    return y.astype(np.float32), labels


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)  # the in-process global fit's, as each worker's
    y, labels = labelled_targets(args.classes, args.per_class, args.dim, args.seed)
    options = {
        "iters": args.iters,
        "workers": args.workers,
        "cpus_per_worker": args.threads,
        "eval_samples": args.eval_samples,
        "seed": args.seed,
        "lattice": args.lattice,
        "backend": args.backend,
    }
    report = {"classes": args.classes, "per_class": args.per_class, "n": len(y), "dim": args.dim}
    report |= {"iters": args.iters, "workers": args.workers, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="dpmot-bench-labels-") as tmp:
        targets = str(Path(tmp) / "targets")
        datasets.write_targets(targets, y, labels=labels)
        for name, by_label in (("global", False), ("by_label", True)):
            t0 = time.perf_counter()
            out = str(Path(tmp) / name)
            result = run_fit(FitConfig(targets=targets, out=out, by_label=by_label, **options))
            report[name] = {
                "seconds": time.perf_counter() - t0,
                "samples": result.samples,
                "tv": result.evaluation.get("tv"),
                "converged": result.converged,
            }
    report["ratio"] = report["by_label"]["seconds"] / report["global"]["seconds"]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, default=1000, help="number of classes C")
    parser.add_argument("--per-class", type=int, default=8, help="targets per class")
    parser.add_argument("--dim", type=int, default=16, help="dimension D")
    parser.add_argument("--iters", type=int, default=200, help="iteration cap of every fit")
    parser.add_argument("--workers", type=int, default=0, help="Ray actors of both fits")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of each worker (and in process)"
    )
    parser.add_argument(
        "--eval-samples", type=int, default=65536, help="fresh evaluation sample per problem"
    )
    parser.add_argument("--lattice", type=int, default=0, help="lattice source points (0: MC)")
    parser.add_argument("--backend", default="auto", help="search backend of both fits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    r = run(args)
    print(
        f"{r['classes']} classes × {r['per_class']} targets (N={r['n']:,}, D={r['dim']}), "
        f"{r['iters']} iterations per fit, {r['workers']} workers × {r['threads']} threads"
    )
    for name in ("global", "by_label"):
        f = r[name]
        tv = "n/a" if f["tv"] is None else f"{f['tv']:.4f}"
        print(f"  {name:>8}: {f['seconds']:8.1f} s, {f['samples']:>14,} samples, TV {tv}")
    print(f"  by-label / global time: {r['ratio']:.2f}")
    if args.json:
        print(json.dumps(r))
    return 0
