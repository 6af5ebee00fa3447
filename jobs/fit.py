"""``ray job submit`` entrypoint of the fit: targets → Brenier potential h on K shard actors.

Same options as ``dpmot fit`` (``--config FILE.yaml`` with keys under ``fit:``, plus flag
overrides). With RAY_ADDRESS set (as inside a Ray job) it joins that cluster; otherwise it
starts a local one. Example::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/fit.py --config jobs/configs/fit.yaml --workers 8
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dpmot_dist import storage
from dpmot_dist.config import config_from_args
from dpmot_dist.errors import DpmotError
from dpmot_dist.fit import FitConfig, add_arguments, run_fit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Fit and write the output folder; 0 on success, 2 with a one-line error on bad input."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(FitConfig, args, "fit")
        result = run_fit(cfg)
    except DpmotError as e:
        print(f"jobs/fit.py: error: {e}", file=sys.stderr)
        return 2
    if result is None:
        print(f"{cfg.out}: already complete")
        return 0
    ev = result.evaluation
    tv = f", fresh-sample TV {ev['tv']:.4f}" if ev else ""
    print(
        f"wrote {storage.join(cfg.out, 'h.npy')} after {result.iterations} iterations "
        f"({result.samples:,} samples, {cfg.workers} workers){tv}"
    )
    return 0


if __name__ == "__main__":
    import ray

    arguments = parse_args()
    # "local" rather than None: never attach to whichever cluster this machine ran last.
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    sys.exit(main(arguments))
