"""``dpmot bench overhead``: what a small plain iteration costs beyond its GEMM.

At small N and batches of a few thousand points (N = 1,000, D = 32, B = 1k–4k by default) a
plain (independent points) iteration should cost what its matmul costs. For each batch size
this times, interleaved in one run (best of ``--repeat`` rounds):

* ``bare``: ``(x @ yᵀ + h).argmax(1)`` in torch, float32, x given (the floor);
* ``search``: :meth:`~dpmot_dist.ot.search.TargetIndex.search` of the same x, k = 1 (exact
  float64 winners);
* ``bare_iteration``: drawing x, the bare argmax, and ``bincount`` of the winners;
* ``iteration``: :meth:`~dpmot_dist.ot.assign.LocalAssigner.assign` of the same number of
  points (the stream's draw, the search and the cell statistics, as the fit runs it).

It reports ``search / bare`` and ``iteration / bare_iteration``; the issue's target is ≤ 1.5.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from dpmot_dist.benchmarks.search import best_times
from dpmot_dist.ot.assign import LocalAssigner
from dpmot_dist.ot.search import TargetIndex, default_backend
from dpmot_dist.ot.sources import Source


def run(n: int, dim: int, batches: list[int], repeat: int, backend: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, dim, generator=gen)
    h64 = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    h32, h_np = h64.float(), h64.numpy()
    index = TargetIndex(y, backend=backend)
    runs = []
    for b in batches:
        x = torch.randn(b, dim, generator=gen)
        assigner = LocalAssigner(index, Source(), seed, chunk=b)
        key = iter(range(1 << 30))

        def bare_iteration(b=b) -> None:
            xs = torch.randn(b, dim)
            winners = (xs @ y.T + h32).argmax(1)
            np.bincount(winners.numpy(), minlength=n)

        fns = {
            "bare": lambda x=x: (x @ y.T + h32).argmax(1),
            "search": lambda x=x: index.search(x, h64, 1),
            "bare_iteration": bare_iteration,
            "iteration": lambda b=b, a=assigner, key=key: a.assign(h_np, (next(key),), b),
        }
        t = best_times(fns, repeat, lambda: None)
        runs.append(
            {
                "batch": b,
                **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                "search_ratio": t["search"] / t["bare"],
                "iteration_ratio": t["iteration"] / t["bare_iteration"],
            }
        )
    return {
        "n": n,
        "dim": dim,
        "backend": index.backend,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1000, help="targets N")
    parser.add_argument("--dim", type=int, default=32, help="dimension D")
    parser.add_argument("--batches", default="1024,2048,4096", help="points per call")
    parser.add_argument("--repeat", type=int, default=50, help="interleaved timing rounds")
    parser.add_argument("--backend", default=None, help="search backend (default: the CPU's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    batches = [int(b) for b in args.batches.split(",")]
    report = run(args.n, args.dim, batches, args.repeat, args.backend or default_backend("cpu"))
    print(
        f"N={report['n']} D={report['dim']} backend {report['backend']}, "
        f"{report['threads']} threads (best of {args.repeat})"
    )
    print("  batch    bare  search  ratio   bare it.  iteration  ratio")
    for r in report["runs"]:
        print(
            f"  {r['batch']:5d} {r['bare_ms']:6.3f}  {r['search_ms']:6.3f}  "
            f"{r['search_ratio']:5.2f}   {r['bare_iteration_ms']:8.3f}  "
            f"{r['iteration_ms']:9.3f}  {r['iteration_ratio']:5.2f}   (ms)"
        )
    if args.json:
        print(json.dumps(report))
    return 0
