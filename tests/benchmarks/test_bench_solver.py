"""``dpmot bench solver``: interpolation of the sample ratio, the lr grid, the report's shape."""

from __future__ import annotations

import json
import math

import numpy as np

from dpmot_dist.benchmarks.solver import Problem, bench_problem, samples_to_reach
from dpmot_dist.ot.solver import SDOTSolver


def test_samples_to_reach_interpolates_log_log():
    curve = [{"samples": s, "tv": 10.0 / math.sqrt(s)} for s in (1e4, 1e6)]
    # TV = 10 / sqrt(S) is a straight line in log-log: TV 0.1 is reached at S = 10^4 exactly,
    # 10 / sqrt(10^5) at S = 10^5
    assert math.isclose(samples_to_reach(curve, 10 / math.sqrt(1e5)), 1e5, rel_tol=1e-9)
    assert samples_to_reach(curve, 1.0) == 1e4  # already below at the first budget
    assert samples_to_reach(curve, 1e-3) == math.inf  # never reached


def test_bench_problem_report_and_lr_grid_extension():
    y = np.random.default_rng(0).uniform(-0.5, 0.5, size=(16, 2)).astype(np.float32)
    problem = Problem("tiny-square", y, "uniform")
    logs: list[str] = []
    solver = SDOTSolver(max_iters=10**9)
    r = bench_problem(problem, solver, [100_000, 300_000], [0.1], logs.append, peer=False)
    json.dumps(r, allow_nan=False)  # strict JSON
    assert [b["samples"] for b in r["budgets"]] == [100_000, 300_000]
    assert all(b["noise_floor"] == 0.0 for b in r["budgets"])  # exact TV in 2-D
    # a one-point grid always holds the best on its edge: it is extended at least once
    grid = r["reference_lr_grid"]
    assert len(grid) >= 2 and len(logs) == len(grid) + 1  # one line per lr tried, one for ours
    assert r["reference_lr"] == min(grid, key=lambda g: g["tv"])["lr"]
    assert r["reference_final_tv"] == r["budgets"][-1]["reference_tv"]
    chosen = r["ours_calibration"]["chosen"]  # 2-D uniform: Monte Carlo or Sobol, by cost
    assert r["ours_qmc"] is (chosen == "sobol") and r["ours_lattice"] == 0
    assert r["reference_qmc"] is False
    needed = r["ours_samples_to_reference_tv"]
    assert needed < math.inf and math.isclose(r["sample_ratio"], 300_000 / needed, rel_tol=0.05)
    assert all(0 <= b["ours_tv"] <= 1 and 0 <= b["reference_tv"] <= 1 for b in r["budgets"])
    # seconds: the fit loop only, growing along each curve; the time ratio is the reference's
    # seconds to its final TV over ours to the same TV
    for curve in (r["reference_curve"], r["ours_curve"]):
        seconds = [c["seconds"] for c in curve]
        assert all(s > 0 for s in seconds) and seconds == sorted(seconds)
    ours_s = r["ours_seconds_to_reference_tv"]
    assert math.isclose(r["time_ratio"], r["reference_final_seconds"] / ours_s, rel_tol=1e-9)
    assert all(b["reference_seconds"] > 0 and b["ours_seconds"] > 0 for b in r["budgets"])


def test_reach_interpolates_seconds_and_the_reference_assigner_counts_every_sample():
    from dpmot_dist.benchmarks.solver import ReferenceAssigner, reach
    from dpmot_dist.ot.sources import Source

    curve = [{"seconds": s, "tv": 1.0 / s} for s in (1.0, 100.0)]
    assert math.isclose(reach(curve, 0.1, "seconds"), 10.0, rel_tol=1e-9)
    y = np.random.default_rng(1).normal(size=(2500, 3)).astype(np.float32)
    a = ReferenceAssigner(y, Source(), seed=0, chunk=1000)
    out = a.assign(np.zeros(2500), (0, 1), 3000)
    assert out.counts.sum() == 3000 and out.samples == 3000
    from dpmot_dist.ot.assign import LocalAssigner
    from dpmot_dist.ot.search import TargetIndex

    # the reference's chunked running max finds the same cells as the exact search
    ours = LocalAssigner(TargetIndex(y), Source(), seed=0, chunk=1000).assign(
        np.zeros(2500), (0, 1), 3000
    )
    assert np.array_equal(out.counts, ours.counts)
