"""``dpmot bench device`` on the CPU at tiny sizes (Triton in its interpreter): the report's
shape and figures, and failing, hanging or impossible steps recorded while the others run."""

from __future__ import annotations

import json
import math
import sys

import pytest

from dpmot_dist import cli
from dpmot_dist.benchmarks import device
from dpmot_dist.benchmarks.device import STEPS, DeviceCheck, format_report, with_settings


def numbers(tree):
    """Every int or float in a JSON tree (bools left out)."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from numbers(v)
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield tree


def test_quick_cpu_check_runs_every_step_and_writes_one_report(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "device", "--device", "cpu", "--quick", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "search" in printed and "samples/s" in printed and "skipped" in printed
    report = json.loads((out / device.REPORT).read_text())
    assert set(report) == {"device", "check", "environment", "steps", "summary"}
    assert report["device"] == "cpu" and report["check"]["fit_n"] == device.QUICK["fit_n"]
    assert list(report["steps"]) == list(STEPS)
    assert report["summary"]["errors"] == {}
    for name in STEPS:
        step = report["steps"][name]
        assert "error" not in step and step["seconds"] > 0
        assert json.loads((out / f"{name}.json").read_text()) == step
    assert (out / device.COMMANDS_LOG).read_text().count("[ok]") == 4
    assert all(math.isfinite(v) for v in numbers(report))

    search = report["steps"]["search"]
    assert search["n"] == 600 and search["matmul_gflops"] > 0
    ran = set(search["backends"]) - {"reference"}
    assert {"torch", "torch:bfloat16", "faiss"} <= ran
    assert ran | set(search["unavailable"]) >= {"triton:bfloat16"}
    for name in ran:
        b = search["backends"][name]
        assert b["gflops"] > 0 and b["disagree"] == 0.0
        assert 0 <= b["winner_changed"] <= b["rescored_rows"] <= 1
    assert search["lattice"]["gflops"] > 0 and search["lattice"]["backend"] == "torch"

    fit = report["steps"]["fit"]
    assert fit["iterations"] == device.QUICK["fit_iters"]
    assert fit["seconds_per_iter"] > 0 and 0 < fit["search_fraction"] <= 1
    sample = report["steps"]["sample"]
    assert sample["written"] == 16 and sample["nfe"] == 2 and sample["dtype"] == "float32"
    assert sample["samples_per_s"] > 0 and sample["model_evals_per_s"] > 0
    tests = report["steps"]["tests"]
    assert "tests/ot/test_search_cuda.py" in tests["files"]
    assert "tests/benchmarks/test_bench_device.py" not in tests["files"]
    assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert set(report["summary"]) >= {"fp32_matmul_gflops", "search", "fit_search_fraction"}


def test_failing_hanging_and_broken_steps_are_recorded_and_the_others_run(tmp_path, monkeypatch):
    def fails(check, run, deadline, result):
        result["measured"] = 1.5
        code = "import sys; print('half done', file=sys.stderr); sys.exit(3)"
        run([sys.executable, "-c", code], deadline, "fails")

    def hangs(check, run, deadline, result):
        run([sys.executable, "-c", "import time; time.sleep(60)"], deadline, "hangs")

    def breaks(check, run, deadline, result):
        raise ZeroDivisionError("inside the step")

    def works(check, run, deadline, result):
        result.update(passed=3, failed=0, errors=0, skipped=1, failures=[])

    steps = {"search": fails, "fit": hangs, "sample": breaks, "tests": works}
    monkeypatch.setattr(device, "STEP_FUNCTIONS", steps)
    monkeypatch.setattr(device, "environment", lambda _: {})
    report = device.run_check(DeviceCheck(device="cpu", timeout_fit=2.0), tmp_path)
    s = report["steps"]
    assert s["search"]["error"] == "fails exited with 3: half done"
    assert s["search"]["measured"] == 1.5 and s["search"]["log_tail"] == ["half done"]
    assert s["fit"]["error"].startswith("hangs timed out after 2 s") and s["fit"]["seconds"] < 20
    assert s["sample"]["error"] == "ZeroDivisionError: inside the step"
    assert "error" not in s["tests"] and report["summary"]["tests"]["passed"] == 3
    on_disk = json.loads((tmp_path / device.REPORT).read_text())
    assert set(on_disk["summary"]["errors"]) == {"search", "fit", "sample"}
    assert "timed out" in format_report(on_disk)


def test_an_impossible_option_is_one_step_error(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "device", "--device", "cpu", "--quick", "--out", str(out), "--steps", "fit"]
    argv += ["--set", "fit_iters=-1"]
    assert cli.main(argv) == 1
    report = json.loads((out / device.REPORT).read_text())
    error = report["steps"]["fit"]["error"]
    assert error.startswith("fit exited with 2:") and "iters" in error
    assert report["steps"]["fit"]["iterations"] == 0 and list(report["steps"]) == ["fit"]


def test_a_spent_budget_skips_the_remaining_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "environment", lambda _: {})
    report = device.run_check(DeviceCheck(device="cpu", budget=1.0), tmp_path, ("fit", "tests"))
    assert all(r["error"].startswith("not run") for r in report["steps"].values())


def test_settings_are_parsed_by_field_type():
    check = with_settings(DeviceCheck(), ["fit_iters=7", "timeout_fit=2.5", "sample_dtype=none"])
    assert check.fit_iters == 7 and check.timeout_fit == 2.5 and check.sample_dtype is None
    assert with_settings(check, ["search-backends=torch"]).search_backends == "torch"
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        with_settings(check, ["no_such_field=1"])
    assert cli.main(["bench", "device", "--steps", "fit,nap"]) == 2


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="tests.a" name="t1"><failure message="assert 1 == 2&#10;more"/>'
        '</testcase><testcase classname="tests.a" name="t2"><error message="boom"/></testcase>'
        '<testcase classname="tests.a" name="t3"/><testcase classname="tests.a" name="t4">'
        '<skipped message="no GPU"/></testcase></testsuite></testsuites>'
    )
    counts = device.junit_counts(xml)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped")} == {
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
    }
    assert counts["failures"] == [
        {"test": "tests.a::t1", "message": "assert 1 == 2"},
        {"test": "tests.a::t2", "message": "boom"},
    ]


def test_goals_and_table_of_a_cuda_report():
    search = {
        "n": 160000,
        "dim": 4096,
        "batch": 65536,
        "matmul_gflops": 50000.0,
        "bf16_matmul_gflops": 700000.0,
        "backends": {
            "triton:bfloat16": {"gflops": 560000.0, "ratio": 11.2, "ratio_bf16": 0.8},
            "faiss": {"gflops": 40000.0, "ratio": 0.8, "ratio_bf16": 0.057},
        },
        "unavailable": {"triton:float16": "search backend 'triton' is not available on cuda"},
    }
    for b in search["backends"].values():
        b.update(disagree=0.0, rescored_rows=1.0, winner_changed=0.001)
    fit = {"iterations": 20, "seconds_per_iter": 2.0, "search_fraction": 0.85}
    fit.update(n=100000, dim=4096, storage_dtype="bfloat16", batch=200000, first_iter_seconds=9)
    steps = {"search": {**search, "seconds": 80.0}, "fit": {**fit, "seconds": 60.0}}
    summary = device.summary(steps)
    goals = device.goals(summary)
    assert goals["fused_vs_bf16_matmul"] == {"value": 0.8, "target": 0.7, "met": True}
    assert goals["fused_vs_faiss_fp32"]["value"] == 14.0 and goals["fused_vs_faiss_fp32"]["met"]
    assert goals["fit_search_share"]["met"] is False
    assert goals["fused_fp32_exact_winners"]["met"] is True
    report = {"device": "cuda", "environment": {"gpu": {"name": "NVIDIA H200"}}}
    report.update(steps=steps, summary=summary, goals=goals)
    table = format_report(report)
    assert "NVIDIA H200" in table and "plain bf16 matmul 700,000 GFLOP/s" in table
    assert "triton:float16     not run" in table and "search 85.0% of it" in table
    assert "goal fit_search_share: 0.85 (target 0.9): NOT met" in table
