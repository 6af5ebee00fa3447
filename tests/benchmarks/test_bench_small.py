"""``dpmot bench overhead``, ``search``, ``fit`` and ``scale`` at toy sizes: they run, their
reports hold what the README quotes, and the checks they print can fail."""

from __future__ import annotations

import json

import pytest

from dpmot_dist.cli import main


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_overhead_reports_ratios(capsys):
    argv = ["bench", "overhead", "--n", "50", "--dim", "4", "--batches", "64,128"]
    assert main([*argv, "--repeat", "2", "--json"]) == 0
    r = last_json(capsys)
    assert [run["batch"] for run in r["runs"]] == [64, 128]
    for run in r["runs"]:
        assert run["search_ratio"] == pytest.approx(run["search_ms"] / run["bare_ms"])
        assert run["iteration_ratio"] > 0


def test_bench_search_rates_every_backend_against_the_matmul(capsys):
    argv = ["bench", "search", "--n", "300", "--dim", "16", "--batch", "128", "--repeat", "1"]
    assert main([*argv, "--lattice", "8", "--json"]) == 0
    r = last_json(capsys)
    assert r["matmul_gflops"] > 0 and r["default"] in r["backends"]
    for name, b in r["backends"].items():
        assert b["ratio"] == pytest.approx(b["gflops"] / r["matmul_gflops"]), name
        if name != "reference":
            assert b["disagree"] == 0.0, name  # exact winners
    assert r["lattice"]["points_per_projection"] == pytest.approx(8 / r["lattice"]["rank"])


@pytest.mark.timeout(300)
def test_bench_scale_runs_every_stage(capsys, ray_local):
    argv = ["bench", "scale", "--n", "3000", "--dim", "4", "--components", "5", "--json"]
    argv += ["--batch", "2048", "--iters", "2", "--resume-iters", "1", "--num", "500"]
    assert main(argv) == 0
    r = last_json(capsys)
    stages = {s["name"]: s for s in r["stages"]}
    assert list(stages) == ["prepare", "fit", "resume", "sample", "read"]
    assert stages["prepare"]["rows_written"] == 3000
    assert stages["fit"]["iterations"] == 2 and stages["resume"]["iterations"] == 3
    # the driver receives a few N-vectors per replica group, whatever the batch
    assert 0 < stages["fit"]["driver_bytes_per_iter"] <= 32 * 3000 * 2 + 2**20
    assert stages["read"]["distinct_sample_ids"] == 500
    assert all(s["seconds"] > 0 and s["driver_peak_rss_bytes"] > 0 for s in r["stages"])


def test_bench_tta_times_both_fits_to_the_same_tv(capsys):
    argv = ["bench", "tta", "--problem", "square", "--iters", "20", "--check-every", "5"]
    argv += ["--eval-curve"]
    assert main([*argv, "--json"]) == 0
    r = last_json(capsys)
    assert r["problem"] == "square-2d-uniform" and r["n"] == 100
    assert r["default"]["stop_reason"] in ("converged", "iteration cap")
    assert r["plain"]["options"]["tol_tv"] == r["default"]["tv"]
    assert r["plain"]["source"]["lattice"] == 0
    assert r["plain_reached"] == (r["plain"]["stop_reason"] == "tolerance")
    assert r["time_ratio"] == pytest.approx(r["plain"]["seconds"] / r["default"]["seconds"])
    # the same comparison on bench solver's evaluator (the square's TV is exact)
    curve = r["plain_curve"]
    assert curve and r["default_eval_floor"] == 0 and 0 < r["default_eval_tv"] < 1
    assert all(a["samples"] < b["samples"] and a["seconds"] < b["seconds"]
               for a, b in zip(curve, curve[1:], strict=False))  # fmt: skip
    reached = curve[-1]["tv"] <= r["default_eval_tv"]
    assert r["time_ratio_eval_lower_bound"] == (not reached)
    assert all(c["tv"] > r["default_eval_tv"] for c in curve[:-1])


def test_bench_cells_reports_exact_errors(capsys):
    argv = ["bench", "cells", "--n", "12", "--iters", "15", "--eval-samples", "4096"]
    assert main([*argv, "--variants", "default", "--json"]) == 0
    r = last_json(capsys)
    assert [(x["weighting"], x["variant"]) for x in r["runs"]] == [
        ("uniform", "default"),
        ("weighted", "default"),
    ]
    for x in r["runs"]:
        assert 0 <= x["tv"] <= 1 and x["iterations"] <= 15
        rel = x["worst_mass"] / x["worst_target_mass"] - 1
        assert x["worst_rel_err"] == pytest.approx(rel)
