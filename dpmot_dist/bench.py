"""``dpmot bench NAME``: benchmarks that print ratios measured in one run.

Each benchmark is the module ``dpmot_dist.benchmarks.NAME`` with ``add_arguments(parser)``
and ``cli_main(args)``; ``--json`` makes it print one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "search": "search throughput of every backend ÷ plain matmul on the same shapes",
    "overhead": "a small plain iteration's cost ÷ a bare matmul + argmax of the same shapes",
    "cells": "the exact 2-D problem: exact TV, the worst cell and seconds, before and now",
    "tta": "wall seconds to a TV: the default fit against plain Monte Carlo (digits)",
    "fit": "distributed fit per (replicas, shards, batch): driver bytes and CPU, cost model",
    "solver": "samples and seconds to reach the reference schedule's accuracy (and OTT-JAX's)",
    "scale": "the whole path at ImageNet's N (small D) on local Ray, stage by stage",
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
