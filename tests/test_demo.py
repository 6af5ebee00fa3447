"""`dpmot demo` end to end at a small size: the table's rows, the PNGs and the report."""

from __future__ import annotations

import json

from dpmot_dist.demo import format_table, grid_mixture, mode_metrics, run_demo


def test_mode_metrics_exact_cases():
    mix = grid_mixture()
    assert mode_metrics(mix.means.copy(), mix) == {"mode_mixture": 0.0, "mode_weight_err": 0.0}
    between = mix.means[:1] + [[0.25, 0.0]]  # half-way between two modes
    assert mode_metrics(between, mix)["mode_mixture"] == 1.0


def test_demo_small(ray_local, tmp_path):
    rows = run_demo(tmp_path, workers=2, n_data=500, num=200, iters=60)
    assert [(r["method"], r["nfe"]) for r in rows] == [
        ("DPM-OT copy", 10),
        ("DDIM", 10),
        ("DPM-Solver++", 10),
        ("DDIM", 50),
    ]
    ot, ddim = rows[0], rows[1]
    assert ot["mode_mixture"] < ddim["mode_mixture"]
    for name in ("fit_curve.png", "samples.png", "report.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["fit"]["iterations"] == 60
    assert "| DDIM | 10 |" in format_table(rows)
