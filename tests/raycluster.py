"""A real Ray cluster on this machine for tests: heads and worker nodes started with ``ray start``.

Every node is its own process group (``start_new_session=True``), stopped by signalling that
group only: never ``ray stop``, which ends every Ray process on the machine (other sessions'
clusters included). Everything listens on 127.0.0.1, with token authentication on.
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
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Head:
    """A running head: its dashboard (job API) URL, the client environment, its group id."""

    dashboard: str
    env: dict[str, str]
    pgid: int
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    """The ``ray`` script of this interpreter's environment (falls back to PATH)."""
    local = Path(sys.executable).parent / "ray"
    found = str(local) if local.exists() else shutil.which("ray")
    if found is None:
        pytest.skip("the ray CLI is not installed")
    return found


def ray_client(head: Head, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``ray ARGS --address <dashboard>`` as a client of ``head``."""
    return subprocess.run(
        [ray_cli(), *args, "--address", head.dashboard],
        env=env or head.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_info(head: Head, job_id: str) -> dict:
    """The job's record from the Jobs REST API (the token as a bearer header)."""
    request = urllib.request.Request(
        f"{head.dashboard}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def stop_group(proc: subprocess.Popen, pgid: int, grace: float = 20.0) -> None:
    """SIGTERM the head's process group, SIGKILL it if anything is left after ``grace``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_pids(pgid):
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


def group_pids(pgid: int) -> list[int]:
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


def listening(pids: list[int]) -> set[tuple[str, int, int]]:
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


def wait_ready(head: Head, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll the job API until it answers (authenticated) or the head exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{head.log.read_text()[-3000:]}")
        if ray_client(head, "job", "list", timeout=30).returncode == 0:
            return
        time.sleep(1.0)
    pytest.fail(f"the head did not answer within {timeout:.0f} s:\n{head.log.read_text()[-3000:]}")


def head_env() -> dict[str, str]:
    """A client environment for a private cluster: a fresh token, no inherited address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),  # highest precedence: ~/.ray/auth_token unused
        # Single-node mode: `--node-ip-address 127.0.0.1` is kept as is (ray start would
        # otherwise replace it by the routable address) so every server binds to loopback.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def start_head(
    env: dict[str, str], num_cpus: int = 2, extra: list[str] | None = None, ip: str = "127.0.0.1"
):
    """``ray start --head`` on ``ip`` (its own process group and short temp dir).

    Returns (Head, the ray start process, its temp dir, its GCS address).
    """
    temp_dir = tempfile.mkdtemp(prefix="dpr")  # Unix socket paths must stay below ~107 bytes
    log = Path(temp_dir) / "head.log"
    dashboard_port, gcs_port = free_port(), free_port()
    cmd = [ray_cli(), "start", "--head", "--block", "--disable-usage-stats"]
    cmd += ["--node-ip-address", ip, "--port", str(gcs_port)]
    cmd += ["--dashboard-host", ip, "--dashboard-port", str(dashboard_port)]
    cmd += ["--ray-client-server-port", str(free_port())]
    cmd += ["--dashboard-agent-listen-port", str(free_port())]
    cmd += ["--num-cpus", str(num_cpus), "--temp-dir", temp_dir, *(extra or [])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(f"http://{ip}:{dashboard_port}", env, proc.pid, log)
    try:
        wait_ready(head, proc)
    except BaseException:
        stop_group(proc, proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return head, proc, temp_dir, f"{ip}:{gcs_port}"


def start_worker_node(
    env: dict[str, str], gcs: str, num_cpus: int, resources: dict[str, float], ip: str
) -> tuple[subprocess.Popen, str]:
    """``ray start --address`` a worker node on ``ip`` with its own temp dir and custom
    ``resources``, in its own process group; returns (the process, its temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix="dpw")
    cmd = [ray_cli(), "start", "--address", gcs, "--block", "--disable-usage-stats"]
    cmd += ["--node-ip-address", ip, "--num-cpus", str(num_cpus)]
    cmd += ["--resources", json.dumps(resources), "--temp-dir", temp_dir]
    cmd += ["--dashboard-agent-listen-port", str(free_port())]
    with open(Path(temp_dir) / "node.log", "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, temp_dir


def cluster_nodes(head: Head) -> list[dict]:
    """The cluster's nodes (``ray list nodes``): node_id, state, resources_total."""
    done = ray_client(head, "list", "nodes", "--format", "json", "--detail")
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    try:
        return json.loads(done.stdout)
    except ValueError:  # "No resource in the cluster" while the nodes register
        return []


def loopback_up() -> None:
    """Bring up ``lo`` in this process's (new, empty) network namespace: SIOCGIFFLAGS, then
    SIOCSIFFLAGS with IFF_UP, as ``ip link set lo up`` does."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))


def can_unshare_network() -> bool:
    """Whether this process may run a child in a new network namespace (``unshare -n``)."""
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30)
    return done.returncode == 0
