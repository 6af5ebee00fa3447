"""The ``dpmot`` command: ``prepare``, ``fit``, ``sample``, ``eval``, ``demo``, ``bench``.

Each verb lives in its own module, which provides ``add_arguments(parser)`` and
``cli_main(args) -> int | None`` (turning the flags into its typed config and calling the
pipeline). Bad input ends the command with one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dpmot_dist.errors import DpmotError

VERBS = {
    "prepare": ("dpmot_dist.prepare", "forward-diffuse a data set into sharded OT targets"),
    "fit": ("dpmot_dist.fit", "fit the semi-discrete OT potential h (Ray shard actors)"),
    "sample": ("dpmot_dist.sample", "map noise through the OT map and refine with a model"),
    "eval": ("dpmot_dist.evaluate", "evaluate a samples data set (FID, mode mixture, ...)"),
    "demo": ("dpmot_dist.demo", "prepare → fit → sample → eval on the embedded default"),
    "bench": ("dpmot_dist.bench", "benchmarks: search, fit, solver, prepare, quality"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpmot", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (_module, help_text) in VERBS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpmot`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    head, rest = _parser().parse_known_args(argv)
    logging.basicConfig(
        level=head.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(VERBS[head.verb][0])
    parser = argparse.ArgumentParser(prog=f"dpmot {head.verb}", description=VERBS[head.verb][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.cli_main(args) or 0)
    except DpmotError as e:
        print(f"dpmot {head.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpmot {head.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
