"""``dpmot bench NAME``: benchmarks that print ratios measured in one run.

Each benchmark is the module ``dpmot_dist.benchmarks.NAME`` with ``add_arguments(parser)``
and ``cli_main(args)``; ``--json`` makes it print one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "search": "search throughput of every backend ÷ plain matmul on the same shapes",
    "fit": "distributed fit: per-iteration time split, bytes moved, cost model",
    "solver": "samples needed to reach the reference schedule's accuracy",
    "prepare": "driver peak memory while preparing a large synthetic data set",
    "quality": "mode mixture and sample quality of DPM-OT vs DDIM / DPM-Solver++",
    "labels": "fit --by-label (one potential per class) against one global fit",
    "decode": "sample throughput of a latent class-conditional run with and without decoding",
    "device": "every GPU path in one run (search, fit, sample, CUDA tests): one JSON report",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, help_text in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"dpmot_dist.benchmarks.{name}")
        except ModuleNotFoundError:
            continue
        module.add_arguments(sub.add_parser(name, help=help_text))


def cli_main(args: argparse.Namespace) -> int | None:
    module = importlib.import_module(f"dpmot_dist.benchmarks.{args.benchmark}")
    return module.cli_main(args)
