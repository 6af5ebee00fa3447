"""``ray job submit`` entrypoint of the fit: targets → Brenier potential h on K shard actors.

Same options as ``dpmot fit`` (``--config FILE.yaml`` with keys under ``fit:``, plus flag
overrides). With RAY_ADDRESS set (as inside a Ray job) it joins that cluster; otherwise it
starts a local one. Example::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/fit.py --config jobs/configs/fit.yaml --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys

from dpmot_dist.cli import run_verb, verb_parser

PROG = "jobs/fit.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return verb_parser("fit", PROG).parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Run the job; 0 on success, 2 with a one-line error on bad input."""
    return run_verb("fit", args, PROG)


if __name__ == "__main__":
    import ray

    arguments = parse_args()
    # "local" rather than None: never attach to whichever cluster this machine ran last.
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    sys.exit(main(arguments))
