"""The real cluster path: ``ray start --head`` on 127.0.0.1 with token auth, ``ray job submit``.

The head is a separate process group started here (``start_new_session=True``) and stopped
by signalling that group only: never ``ray stop``, which ends every Ray process on the
machine (other sessions' clusters included).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from raycluster import (
    Head,
    group_pids,
    head_env,
    job_info,
    listening,
    ray_cli,
    ray_client,
    start_head,
    stop_group,
)

from dpmot_dist.pipelines.fit import FitConfig, run_fit

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
EXCLUDES = [".venv", ".git", "*.npy", "bench-out", ".pytest_cache", ".ruff_cache"]
FIT_ARGS = ["--workers", "2", "--cpus-per-worker", "0.5", "--iters", "10", "--seed", "3"]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A Ray head on 127.0.0.1 only, token auth on, in its own process group."""
    head, proc, temp_dir, _ = start_head(head_env())
    try:
        yield head
    finally:
        stop_group(proc, head.pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_fit_job_matches_single_process(ray_head: Head, tmp_path: Path, rng) -> None:
    """`ray job submit --working-dir <repo> -- jobs/fit.py` == an in-process fit (workers 0)."""
    n, dim = 300, 8
    targets = tmp_path / "y.npy"
    np.save(targets, rng.standard_normal((n, dim)).astype(np.float32))
    out = tmp_path / "out"
    job_id = f"dpmot-e2e-{uuid.uuid4().hex[:8]}"
    runtime_env = json.dumps({"excludes": EXCLUDES})
    entry = [sys.executable, "jobs/fit.py", "--targets", str(targets), "--out", str(out)]
    cmd = [ray_cli(), "job", "submit", "--address", ray_head.dashboard]
    cmd += ["--submission-id", job_id, "--working-dir", str(REPO)]
    cmd += ["--runtime-env-json", runtime_env, "--", *entry, *FIT_ARGS]
    done = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=180)
    logs = done.stdout[-4000:] + done.stderr[-4000:]
    assert job_info(ray_head, job_id)["status"] == "SUCCEEDED", logs
    assert done.returncode == 0, logs

    assert (out / "_SUCCESS").exists()
    h = np.load(out / "h.npy")
    assert h.shape == (n,) and np.isfinite(h).all()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 10]
    for key in ("energy", "grad_l2", "tv", "t_search", "t_transfer", "t_reduce", "bytes_moved"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert all(r["bytes_moved"] > 0 for r in records)
    workers = json.loads((out / "_workers.json").read_text())
    # --workers 2: one group of 2 shards and its reducer
    assert (workers["replicas"], workers["shards"], len(workers["pids"])) == (1, 2, 3)
    assert os.getpid() not in workers["pids"]

    # the calibration times its candidates, so it may pick differently run to run: the
    # single-process fit runs the source the job recorded
    manifest = json.loads((out / "_manifest.json").read_text())
    source = {k: manifest[k] for k in ("qmc", "lattice", "lattice_rank")}
    single = FitConfig(
        targets=str(targets),
        out=str(tmp_path / "single"),
        workers=0,
        iters=10,
        seed=3,
        calibrate="off",
        **source,
    )
    run_fit(single)
    np.testing.assert_array_equal(h, np.load(tmp_path / "single" / "h.npy"))


def test_token_is_required(ray_head: Head, tmp_path: Path) -> None:
    """Without the token, or with a wrong one, the job API refuses the client."""
    home = tmp_path / "home"  # no ~/.ray/auth_token to fall back on
    home.mkdir()
    bare = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH_")}
    for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}):
        env = {**bare, "HOME": str(home), **extra}
        refused = ray_client(ray_head, "job", "list", env=env)
        assert refused.returncode != 0
        assert "AuthenticationError" in refused.stderr + refused.stdout
    assert ray_client(ray_head, "job", "list").returncode == 0


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_head_listens_on_loopback_only(ray_head: Head) -> None:
    """Every TCP server the head started (GCS, raylet, dashboard, agents) binds 127.0.0.1."""
    sockets = listening(group_pids(ray_head.pgid))
    ports = {port for _, port, _ in sockets}
    assert int(ray_head.dashboard.rsplit(":", 1)[1]) in ports
    exposed = sorted(s for s in sockets if s[0] not in LOOPBACK)
    assert not exposed, f"listening beyond loopback (address, port, pid): {exposed}"
