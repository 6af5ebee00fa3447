"""The fit pipeline: outputs, bad input, resume, K workers == single process, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dpmot_dist.cli import main
from dpmot_dist.pipelines.fit import FitConfig, run_fit

FAST = ["--iters", "12", "--eval-samples", "20000", "--chunk", "2048", "--min-batch", "4096"]


@pytest.fixture
def targets(tmp_path: Path) -> str:
    path = tmp_path / "y.npy"
    np.save(path, np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))
    return str(path)


def fit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpmot_dist.cli", "fit", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fit_writes_contract_outputs(targets, tmp_path):
    out = tmp_path / "fit"
    assert main(["fit", "--targets", targets, "--out", str(out), *FAST, "--log-every", "1"]) == 0
    h = np.load(out / "h.npy")
    assert h.shape == (300,) and abs(h.mean()) < 1e-12
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12
    keys = {"iter", "energy", "grad_l2", "tv", "max_rel_err", "empty_frac", "samples", "seconds"}
    assert keys <= set(json.loads(lines[0]))
    final = json.loads(lines[-1])["evaluation"]  # the last iteration carries the evaluation
    assert {"tv", "max_rel_err", "worst_cell", "worst_cell_mass", "samples"} <= set(final)
    assert 0 <= final["worst_cell"] < 300 and final["samples"] >= 20000
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["kind"] == "potential" and manifest["n"] == 300
    assert manifest["stop_reason"] in ("converged", "iteration cap")
    # the source was calibrated (Gaussian D = 8: Monte Carlo, Sobol and lattice points) and
    # the manifest records what ran
    calibration = manifest["calibration"]
    lattices = {"lattice-64": 64, "lattice-16": 16, "lattice-8": 8}
    assert set(calibration["candidates"]) == {"monte-carlo", "sobol", *lattices}
    chosen = calibration["chosen"]
    costs = {name: c["cost"] for name, c in calibration["candidates"].items()}
    assert costs[chosen] == min(costs.values())
    assert manifest["lattice"] == lattices.get(chosen, 0)
    assert manifest["qmc"] is (chosen == "sobol")
    assert (out / "_SUCCESS").exists()
    off = tmp_path / "off"
    assert main(["fit", "--targets", targets, "--out", str(off), *FAST, "--calibrate", "off"]) == 0
    manifest = json.loads((off / "_manifest.json").read_text())
    assert manifest["qmc"] is False and manifest["lattice"] == 64  # Gaussian D = 8: lattice
    assert manifest["calibration"] == {}


def test_source_defaults_depend_on_source_and_dimension_and_flags_override(targets, tmp_path):
    from dpmot_dist.pipelines.fit import fit_source

    cfg = FitConfig(targets=targets, out=str(tmp_path / "x"))
    uniform = cfg.model_copy(update={"source": "uniform"})
    # uniform source: Sobol up to D = 16, never lattice points
    assert fit_source(uniform, 16).qmc and not fit_source(uniform, 17).qmc
    assert fit_source(uniform, 64).lattice == 0
    # Gaussian source: lattice points from D = 3 (rank 3), Sobol below
    assert fit_source(cfg, 2).qmc and fit_source(cfg, 2).lattice == 0
    assert all(fit_source(cfg, d).lattice == 64 and not fit_source(cfg, d).qmc for d in (3, 8, 64))
    assert fit_source(cfg.model_copy(update={"qmc": True}), 64).lattice == 0
    assert fit_source(cfg.model_copy(update={"qmc": True}), 4096).qmc
    assert not fit_source(cfg.model_copy(update={"qmc": False}), 2).qmc
    plain = fit_source(cfg.model_copy(update={"lattice": 0}), 64)
    assert plain.lattice == 0 and not plain.qmc
    assert fit_source(cfg.model_copy(update={"lattice": 0}), 8).qmc  # D ≤ 16: Sobol then
    out = tmp_path / "fit"
    args = ["fit", "--targets", targets, "--out", str(out), *FAST, "--lattice", "0", "--no-qmc"]
    assert main(args) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["qmc"] is False and manifest["lattice"] == 0


def test_lattice_options_reach_the_fit(targets, tmp_path):
    out = tmp_path / "fit"
    args = ["fit", "--targets", targets, "--out", str(out), *FAST, "--lattice", "16"]
    assert main([*args, "--lattice-rank", "2"]) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["lattice"] == 16 and manifest["lattice_rank"] == 2 and not manifest["qmc"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["batch"] == 4096 and metrics[0]["points"] == 2048 * 16


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--source", "uniform", "--lattice", "8"], "lattice points need the Gaussian source"),
        (["--qmc", "--lattice", "8"], "lattice points need the Gaussian source"),
    ],
)
def test_bad_source_options_one_line_error_and_nothing_written(targets, tmp_path, extra, message):
    out = tmp_path / "fit"
    r = fit_cli("--targets", targets, "--out", str(out), *FAST, *extra)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr and targets in r.stderr
    assert not out.exists()


def test_existing_output_needs_overwrite(targets, tmp_path):
    out = str(tmp_path / "fit")
    fast = [*FAST, "--lattice", "0"]
    assert main(["fit", "--targets", targets, "--out", out, *fast]) == 0
    assert main(["fit", "--targets", targets, "--out", out, *fast]) == 2
    assert main(["fit", "--targets", targets, "--out", out, *fast, "--overwrite"]) == 0


def test_interrupted_then_resumed_equals_uninterrupted(targets, tmp_path):
    common = [
        "--targets",
        targets,
        "--eval-samples",
        "0",
        "--chunk",
        "2048",
        "--patience",
        "3",
        "--checkpoint-every",
        "5",
        "--calibrate",  # the calibration is a timed choice: both runs draw the same source
        "off",
    ]
    assert main(["fit", *common, "--out", str(tmp_path / "a"), "--iters", "20"]) == 0
    assert main(["fit", *common, "--out", str(tmp_path / "b"), "--iters", "10"]) == 0
    os.remove(tmp_path / "b" / "_SUCCESS")  # as if the run had stopped after iteration 10
    assert main(["fit", *common, "--out", str(tmp_path / "b"), "--iters", "20", "--resume"]) == 0
    assert np.array_equal(np.load(tmp_path / "a" / "h.npy"), np.load(tmp_path / "b" / "h.npy"))
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [1, 10, 20]


def bad(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return str(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: bad(p, "nan.npy", np.array([[0.0, np.nan], [1.0, 2.0]], np.float32)), "NaN"),
        (lambda p: bad(p, "inf.npy", np.array([[0.0, np.inf], [1.0, 2.0]], np.float32)), "Inf"),
        (lambda p: bad(p, "flat.npy", np.zeros(5, np.float32)), "N×D"),
        (lambda p: bad(p, "empty.npy", np.zeros((0, 3), np.float32)), "empty"),
        (lambda p: str(p / "missing.npy"), "no such file"),
    ],
)
def test_bad_targets_one_line_error(tmp_path, make, message):
    uri = make(tmp_path)
    r = fit_cli("--targets", uri, "--out", str(tmp_path / "o"), "--iters", "2")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr and Path(uri).name in r.stderr


@pytest.mark.parametrize(
    ("weights", "message"),
    [(np.ones(7), "length"), (-np.ones(300), "negative"), (np.zeros(300), "zero")],
)
def test_bad_weights_one_line_error(targets, tmp_path, weights, message):
    w = bad(tmp_path, "w.npy", weights)
    r = fit_cli("--targets", targets, "--weights", w, "--out", str(tmp_path / "o"), "--iters", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr and "w.npy" in r.stderr


def fit_cfg(targets, out, **kw) -> FitConfig:
    base = {
        "targets": targets,
        "out": str(out),
        "iters": 10,
        "eval_samples": 0,
        "chunk": 2048,
        "cpus_per_worker": 0.5,
        "patience": 3,
        "lattice": 0,  # mechanics tests: independent points (the lattice has its own case)
    }
    return FitConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "workers, options",
    [((0, 1, 2, 3), {}), ((0, 2), {"lattice": 16})],
    ids=["sobol", "lattice"],
)
def test_workers_give_the_same_h_as_single_process(ray_local, targets, tmp_path, workers, options):
    hs = []
    for k in workers:
        run_fit(fit_cfg(targets, tmp_path / f"k{k}", workers=k, **options))
        hs.append(np.load(tmp_path / f"k{k}" / "h.npy"))
    for h in hs[1:]:
        assert np.array_equal(h, hs[0])


def test_killed_shard_actor_is_restarted_and_h_unchanged(ray_local, targets, tmp_path):
    # long enough (≥ 3 s of Ray round trips) that the kill lands mid-run
    cfg = {"workers": 2, "iters": 100, "min_batch": 4096}
    run_fit(fit_cfg(targets, tmp_path / "ref", **cfg))
    out = tmp_path / "killed"
    killed = []

    def kill_one_actor():
        workers = out / "_workers.json"
        while not workers.exists():
            time.sleep(0.05)
        time.sleep(0.5)
        pid = json.loads(workers.read_text())["pids"][1]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    run_fit(fit_cfg(targets, out, **cfg))
    killer.join()
    assert killed
    assert np.array_equal(np.load(out / "h.npy"), np.load(tmp_path / "ref" / "h.npy"))


def test_killed_driver_resumes_from_checkpoint(targets, tmp_path):
    args = [
        "--targets",
        targets,
        "--eval-samples",
        "0",
        "--chunk",
        "2048",
        "--patience",
        "3",
        "--checkpoint-every",
        "5",
        "--workers",
        "1",
        "--cpus-per-worker",
        "0.5",
        "--lattice",
        "0",
    ]
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dpmot_dist.cli",
            "fit",
            *args,
            "--out",
            str(out),
            "--iters",
            "40",
            "--min-batch",
            "20000",
        ],
        start_new_session=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = out / "_checkpoints" / "latest.npz"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    assert ckpt.exists() and not (out / "_SUCCESS").exists()
    resumed = fit_cli(*args, "--out", str(out), "--iters", "40", "--resume", "--min-batch", "20000")
    assert resumed.returncode == 0, resumed.stderr
    ref2 = fit_cli(*args, "--out", str(tmp_path / "ref2"), "--iters", "40", "--min-batch", "20000")
    assert ref2.returncode == 0
    assert np.array_equal(np.load(out / "h.npy"), np.load(tmp_path / "ref2" / "h.npy"))
