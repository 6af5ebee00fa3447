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
    r = bench_problem(problem, SDOTSolver(max_iters=10**9), [100_000, 300_000], [0.1], logs.append)
    json.dumps(r, allow_nan=False)  # strict JSON
    assert [b["samples"] for b in r["budgets"]] == [100_000, 300_000]
    assert all(b["noise_floor"] == 0.0 for b in r["budgets"])  # exact TV in 2-D
    # a one-point grid always holds the best on its edge: it is extended at least once
    grid = r["reference_lr_grid"]
    assert len(grid) >= 2 and len(logs) == len(grid) + 1  # one line per lr tried, one for ours
    assert r["reference_lr"] == min(grid, key=lambda g: g["tv"])["lr"]
    assert r["reference_final_tv"] == r["budgets"][-1]["reference_tv"]
    assert r["ours_qmc"] is True and r["reference_qmc"] is False and r["ours_lattice"] == 0
    needed = r["ours_samples_to_reference_tv"]
    assert needed < math.inf and math.isclose(r["sample_ratio"], 300_000 / needed, rel_tol=0.05)
    assert all(0 <= b["ours_tv"] <= 1 and 0 <= b["reference_tv"] <= 1 for b in r["budgets"])
