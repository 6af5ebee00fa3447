"""The ``dpmot`` command line: version, help with defaults and option groups, config files."""

from __future__ import annotations

import re

import pytest

from dpmot_dist import __version__
from dpmot_dist.cli import VERBS, main, verb_parser
from dpmot_dist.config import build_config
from dpmot_dist.errors import DpmotError
from dpmot_dist.pipelines.fit import FitConfig

PIPELINE_VERBS = [name for name, verb in VERBS.items() if verb.config]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dpmot-dist {__version__}"


@pytest.mark.parametrize("verb", PIPELINE_VERBS)
def test_every_option_shows_its_default(verb):
    parser = verb_parser(verb)
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        text = action.help or ""
        assert "default" in text or "(required)" in text, f"dpmot {verb} {action.option_strings}"
    assert "(default: " in parser.format_help()


def test_fit_help_groups_and_defaults():
    text = verb_parser("fit").format_help()
    for group in ("data", "source", "solver", "cluster", "output"):
        assert f"\n{group} options:\n" in text
    solver = text.split("solver options:", 1)[1].split("cluster options:", 1)[0]
    assert "--patience" in solver and "--control-variate" in solver and "--iters" in solver
    assert re.search(r"--iters ITERS\s+iteration cap \(default: 1000\)", text)
    assert "--max-iters" not in text  # the fit names its cap --iters


def test_solver_options_are_flat_keys_in_files_and_flags(tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text("fit:\n  targets: y.npy\n  out: out\n  patience: 7\n  lr: 0.05\n")
    cfg = build_config(FitConfig, str(path), {"cv_k": 5, "iters": 3}, "fit")
    assert (cfg.solver.patience, cfg.solver.lr, cfg.solver.cv_k) == (7, 0.05, 5)
    solver = cfg.make_solver(100)
    assert solver.max_iters == 3 and solver.eval_samples == 1 << 16
    with pytest.raises(DpmotError, match="option 'averaging'"):
        build_config(FitConfig, None, {"targets": "y", "out": "o", "averaging": "bad"}, "fit")
    with pytest.raises(DpmotError, match="patience ≥ 1"):
        build_config(FitConfig, None, {"targets": "y", "out": "o", "patience": 0}, "fit")
    with pytest.raises(DpmotError, match="option 'nonsense'"):
        build_config(FitConfig, None, {"targets": "y", "out": "o", "nonsense": 1}, "fit")
