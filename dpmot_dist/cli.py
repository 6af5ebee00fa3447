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


def verb_parser(verb: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one verb: ``--config``, the verb's flags and ``--log-level``."""
    module = importlib.import_module(VERBS[verb][0])
    parser = argparse.ArgumentParser(prog=prog or f"dpmot {verb}", description=VERBS[verb][1])
    module.add_arguments(parser)
    if not any("--log-level" in a.option_strings for a in parser._actions):
        parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def run_verb(verb: str, args: argparse.Namespace, prog: str | None = None) -> int:
    """Run a verb on parsed flags: its exit code, or 2 with a one-line error on bad input."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(VERBS[verb][0])
    try:
        return int(module.cli_main(args) or 0)
    except DpmotError as e:
        print(f"{prog or f'dpmot {verb}'}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog or f'dpmot {verb}'}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpmot`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    head, rest = _parser().parse_known_args(argv)
    args = verb_parser(head.verb).parse_args(rest)
    args.log_level = head.log_level if args.log_level == "INFO" else args.log_level
    return run_verb(head.verb, args)


if __name__ == "__main__":
    sys.exit(main())
