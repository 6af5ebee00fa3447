"""``ray job submit`` entrypoint of prepare: a data set → forward-diffused, sharded targets.

Same options as ``dpmot prepare`` (``--config FILE.yaml`` with keys under ``prepare:``, plus flag
overrides). With RAY_ADDRESS set (as inside a Ray job) it joins that cluster; otherwise it
starts a local one. One Ray task per output part, ``--workers`` in flight. Example::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/prepare.py --config jobs/configs/prepare.yaml --workers 64
"""

from __future__ import annotations

import argparse
import os
import sys

from dpmot_dist.cli import run_verb, verb_parser

PROG = "jobs/prepare.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return verb_parser("prepare", PROG).parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Run the job; 0 on success, 2 with a one-line error on bad input."""
    return run_verb("prepare", args, PROG)


if __name__ == "__main__":
    import ray

    arguments = parse_args()
    # "local" rather than None: never attach to whichever cluster this machine ran last.
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    sys.exit(main(arguments))
