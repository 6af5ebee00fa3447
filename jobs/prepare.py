"""``ray job submit`` entrypoint of prepare: a data set → forward-diffused, sharded targets.

Same options as ``dpmot prepare`` (``--config FILE.yaml`` with keys under ``prepare:``, plus
flag overrides). With RAY_ADDRESS set (as inside a Ray job) it joins that cluster; otherwise
it starts a local one. One Ray task per output part, ``--workers`` in flight. Example::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/prepare.py --config jobs/configs/prepare.yaml --workers 64
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dpmot_dist.config import config_from_args
from dpmot_dist.errors import DpmotError
from dpmot_dist.prepare import PrepareConfig, add_arguments, run_prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Prepare the targets data set; 0 on success, 2 with a one-line error on bad input."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(PrepareConfig, args, "prepare")
        m = run_prepare(cfg)
    except DpmotError as e:
        print(f"jobs/prepare.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {m['n']:,} targets × {m['dim']:,} ({m['source_rows']:,} rows × {m['copies']} "
        f"copies, shape {m['data_shape']}, {len(m['parts'])} parts) to {cfg.out}"
    )
    return 0


if __name__ == "__main__":
    import ray

    arguments = parse_args()
    ray.init(address=os.environ.get("RAY_ADDRESS"))
    sys.exit(main(arguments))
