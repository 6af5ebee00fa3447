"""``ray job submit`` entrypoint of sampling: noise → OT map → M refinement steps → Parquet.

Same options as ``dpmot sample`` (``--config FILE.yaml`` with keys under ``sample:``, plus
flag overrides). With RAY_ADDRESS set (as inside a Ray job) it joins that cluster; otherwise
it starts a local one. A rerun with the same arguments writes only the chunks still missing
(nothing when the output is complete). Example::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/sample.py --config jobs/configs/sample.yaml --workers 8
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dpmot_dist.config import config_from_args
from dpmot_dist.errors import DpmotError
from dpmot_dist.sample import SampleConfig, add_arguments, run_sample


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Sample and write the output folder; 0 on success, 2 with a one-line error on bad input."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(SampleConfig, args, "sample")
        s = run_sample(cfg)
    except DpmotError as e:
        print(f"jobs/sample.py: error: {e}", file=sys.stderr)
        return 2
    if s["complete"]:
        print(f"{cfg.out}: already complete ({cfg.num} samples); nothing written")
        return 0
    print(
        f"wrote {s['written']} samples ({s['chunks_written']} chunks, NFE {s['nfe']}, "
        f"{cfg.workers} workers) to {cfg.out}: {s['samples_per_s']:.4g} samples/s, "
        f"{s['model_evals_per_s']:.4g} model evaluations/s; map "
        f"{100 * s['map_fraction']:.1f}% of phase-2 time"
    )
    return 0


if __name__ == "__main__":
    import ray

    arguments = parse_args()
    ray.init(address=os.environ.get("RAY_ADDRESS"))
    sys.exit(main(arguments))
