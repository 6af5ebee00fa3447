"""The ``dpmot`` command: ``prepare``, ``fit``, ``sample``, ``eval``, ``demo``, ``bench``.

The four pipeline verbs are their typed config (flags generated from its fields, plus
``--config FILE.yaml``), the pipeline function it is passed to, and a one-paragraph summary of
the result printed here. ``demo`` and ``bench`` are faces of their own, modules with
``add_arguments(parser)`` and ``cli_main(args) -> int | None``. Bad input ends the command
with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpmot_dist import __version__
from dpmot_dist.errors import DpmotError

log = logging.getLogger("dpmot_dist.cli")


@dataclass(frozen=True)
class Verb:
    """A verb: ``module`` holds either ``config`` (a Config model) and ``run`` (the pipeline
    function taking it), or its own ``add_arguments`` / ``cli_main``."""

    module: str
    help: str
    config: str | None = None
    run: str | None = None


VERBS = {
    "prepare": Verb(
        "dpmot_dist.pipelines.prepare",
        "forward-diffuse a data set into sharded OT targets",
        "PrepareConfig",
        "run_prepare",
    ),
    "fit": Verb(
        "dpmot_dist.pipelines.fit",
        "fit the semi-discrete OT potential h (Ray shard actors)",
        "FitConfig",
        "run_fit",
    ),
    "sample": Verb(
        "dpmot_dist.pipelines.sample",
        "map noise through the OT map and refine with a model",
        "SampleConfig",
        "run_sample",
    ),
    "eval": Verb(
        "dpmot_dist.evaluation.evaluate",
        "evaluate a samples data set (FID, mode mixture, ...)",
        "EvalConfig",
        "run_eval",
    ),
    "demo": Verb("dpmot_dist.demo", "prepare → fit → sample → eval on the embedded default"),
    "bench": Verb("dpmot_dist.bench", "benchmarks: search, fit, solver, prepare, quality"),
}


# ---------------------------------------------------------------------------------------------
# What each pipeline verb prints when it is done


def _report_prepare(cfg, m: dict) -> None:
    labels = f", {m['labels']['num_classes']} classes" if m.get("labels") else ""
    print(
        f"wrote {m['n']:,} targets × {m['dim']:,} ({m['source_rows']:,} rows × {m['copies']} "
        f"copies, shape {m['data_shape']}{labels}) to {cfg.out}"
    )


def _report_fit(cfg, result) -> None:
    if result is None:
        print(f"{cfg.out}: already complete")
        return
    ev = result.evaluation
    tv = f", fresh-sample TV {ev['tv']:.4f}" if ev else ""
    each = " (one potential per label) after at most" if cfg.by_label else " after"
    print(
        f"wrote {cfg.out.rstrip('/')}/h.npy{each} {result.iterations} iterations "
        f"({result.samples:,} samples){tv}"
    )
    tolerance = cfg.solver.tol_grad or cfg.solver.tol_tv
    if math.isfinite(ev.get("tv", 0.0)) and not result.converged and tolerance:
        log.warning("the tolerance was not reached within %d iterations", cfg.iters)


def _report_sample(cfg, s: dict) -> None:
    if s["complete"]:
        print(f"{cfg.out}: already complete ({s['num']} samples); nothing written")
        return
    print(
        f"wrote {s['written']} samples ({s['chunks_written']} chunks, NFE {s['nfe']}) to "
        f"{cfg.out}: {s['samples_per_s']:.4g} samples/s, {s['model_evals_per_s']:.4g} model "
        f"evaluations/s; map {100 * s['map_fraction']:.1f}% of phase-2 time"
    )
    if s["decode_seconds"]:
        print(
            f"decoding took {100 * s['decode_fraction']:.1f}% of the workers' time: "
            f"{s['samples_per_s_without_decode']:.4g} samples/s without it"
        )


def _report_eval(cfg, report: dict) -> None:
    from dpmot_dist.evaluation.evaluate import format_report

    if cfg.make_ref_stats:
        print(f"wrote FID statistics of {report['num']} images of {cfg.data} to {cfg.out}")
        return
    print(format_report(report))
    if cfg.out:
        print(f"report written to {cfg.out}")


REPORTS: dict[str, Callable[[Any, Any], None]] = {
    "prepare": _report_prepare,
    "fit": _report_fit,
    "sample": _report_sample,
    "eval": _report_eval,
}


# ---------------------------------------------------------------------------------------------
# Parsers and running


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpmot", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dpmot-dist {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        sub.add_parser(name, help=verb.help, add_help=False)
    return parser


def verb_parser(verb: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one verb: ``--config``, the verb's flags and ``--log-level``."""
    from dpmot_dist.config import add_model_flags

    spec = VERBS[verb]
    module = importlib.import_module(spec.module)
    parser = argparse.ArgumentParser(prog=prog or f"dpmot {verb}", description=spec.help)
    if spec.config is not None:
        parser.add_argument(
            "--config", help=f"YAML file of options (flat keys, or under '{verb}:')"
        )
        add_model_flags(parser, getattr(module, spec.config))
    else:
        module.add_arguments(parser)
    if not any("--log-level" in a.option_strings for a in parser._actions):
        parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    return parser


def _cli_main(verb: str, args: argparse.Namespace) -> int:
    """Build the verb's config from the flags, run its pipeline, print its summary."""
    from dpmot_dist.config import config_from_args

    spec = VERBS[verb]
    module = importlib.import_module(spec.module)
    if spec.config is None:
        return int(module.cli_main(args) or 0)
    cfg = config_from_args(getattr(module, spec.config), args, verb)
    REPORTS[verb](cfg, getattr(module, spec.run)(cfg))
    return 0


def run_verb(verb: str, args: argparse.Namespace, prog: str | None = None) -> int:
    """Run a verb on parsed flags: its exit code, or 2 with a one-line error on bad input."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _cli_main(verb, args)
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
