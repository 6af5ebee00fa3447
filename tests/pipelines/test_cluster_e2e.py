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
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dpmot_dist.pipelines.fit import FitConfig, run_fit

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
EXCLUDES = [".venv", ".git", "*.npy", "bench-out", ".pytest_cache", ".ruff_cache"]
FIT_ARGS = ["--workers", "2", "--cpus-per-worker", "0.5", "--iters", "10", "--seed", "3"]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@dataclass
class Head:
    """A running head: its dashboard (job API) URL, the client environment, its group id."""

    dashboard: str
    env: dict[str, str]
    pgid: int
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    """The ``ray`` script of this interpreter's environment (falls back to PATH)."""
    local = Path(sys.executable).parent / "ray"
    found = str(local) if local.exists() else shutil.which("ray")
    if found is None:
        pytest.skip("the ray CLI is not installed")
    return found


def _ray(head: Head, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``ray ARGS --address <dashboard>`` as a client of ``head``."""
    return subprocess.run(
        [_ray_cli(), *args, "--address", head.dashboard],
        env=env or head.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _job_info(head: Head, job_id: str) -> dict:
    """The job's record from the Jobs REST API (the token as a bearer header)."""
    request = urllib.request.Request(
        f"{head.dashboard}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _stop_group(proc: subprocess.Popen, pgid: int, grace: float = 20.0) -> None:
    """SIGTERM the head's process group, SIGKILL it if anything is left after ``grace``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_pids(pgid):
        if proc.poll() is None:
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of the process group ``pgid`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _listening(pids: list[int]) -> set[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state owned by ``pids``."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in owner:  # 0A: TCP_LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints the address as host-order 32-bit words.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(hex_port, 16), owner[cols[9]]))
    return found


def _wait_ready(head: Head, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll the job API until it answers (authenticated) or the head exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{head.log.read_text()[-3000:]}")
        if _ray(head, "job", "list", timeout=30).returncode == 0:
            return
        time.sleep(1.0)
    pytest.fail(f"the head did not answer within {timeout:.0f} s:\n{head.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A Ray head on 127.0.0.1 only, token auth on, in its own process group."""
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,  # highest precedence: ~/.ray/auth_token is never read or written
        # Single-node mode: `--node-ip-address 127.0.0.1` is kept as is (ray start would
        # otherwise replace it by the routable address) so every server binds to loopback.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    # Short, private temp dir: Unix socket paths under it must stay below ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="dpr")
    log = Path(temp_dir) / "head.log"
    dashboard_port = _free_port()
    cmd = [_ray_cli(), "start", "--head", "--block", "--disable-usage-stats"]
    cmd += ["--node-ip-address", "127.0.0.1", "--port", str(_free_port())]
    cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    cmd += ["--ray-client-server-port", str(_free_port())]
    cmd += ["--dashboard-agent-listen-port", str(_free_port())]
    cmd += ["--num-cpus", "2", "--temp-dir", temp_dir]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pgid = proc.pid  # a new session's leader: its pid is the group id
    head = Head(f"http://127.0.0.1:{dashboard_port}", env, pgid, log)
    try:
        _wait_ready(head, proc)
        yield head
    finally:
        _stop_group(proc, pgid)
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
    cmd = [_ray_cli(), "job", "submit", "--address", ray_head.dashboard]
    cmd += ["--submission-id", job_id, "--working-dir", str(REPO)]
    cmd += ["--runtime-env-json", runtime_env, "--", *entry, *FIT_ARGS]
    done = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=180)
    logs = done.stdout[-4000:] + done.stderr[-4000:]
    assert _job_info(ray_head, job_id)["status"] == "SUCCEEDED", logs
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
    assert len(workers["pids"]) == 2 and os.getpid() not in workers["pids"]

    single = FitConfig(
        targets=str(targets), out=str(tmp_path / "single"), workers=0, iters=10, seed=3
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
        refused = _ray(ray_head, "job", "list", env=env)
        assert refused.returncode != 0
        assert "AuthenticationError" in refused.stderr + refused.stdout
    assert _ray(ray_head, "job", "list").returncode == 0


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_head_listens_on_loopback_only(ray_head: Head) -> None:
    """Every TCP server the head started (GCS, raylet, dashboard, agents) binds 127.0.0.1."""
    sockets = _listening(_group_pids(ray_head.pgid))
    ports = {port for _, port, _ in sockets}
    assert int(ray_head.dashboard.rsplit(":", 1)[1]) in ports
    exposed = sorted(s for s in sockets if s[0] not in LOOPBACK)
    assert not exposed, f"listening beyond loopback (address, port, pid): {exposed}"
