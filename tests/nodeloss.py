"""Run inside a new network namespace (``unshare -n``): a two-node Ray cluster on loopback
addresses, a fit spread over both nodes, and the loss of the second node mid-fit.

Ray supports several nodes on one machine only in its cluster mode, whose servers listen on
every interface; in a private network namespace "every interface" is that namespace's
loopback, which nothing outside it can reach. The head listens on 127.0.0.2 and the second
node on 127.0.0.3. Usage (``tests/pipelines/test_cluster_nodes.py`` runs it)::

    unshare -n python tests/nodeloss.py REPORT.json -- dpmot fit arguments...

The report says which actors lived on the second node and how the fit exited.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from raycluster import (
    cluster_nodes,
    head_env,
    loopback_up,
    start_head,
    start_worker_node,
    stop_group,
)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _node2(head) -> str | None:
    for node in cluster_nodes(head):
        if node.get("state") == "ALIVE" and "dpmot_node2" in node.get("resources_total", {}):
            return node["node_id"]
    return None


def _workers(out: Path) -> dict | None:
    path = out / "_workers.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(report: Path, fit_args: list[str]) -> int:
    loopback_up()
    env = head_env()
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",  # several nodes: Ray's cluster mode
        RAY_health_check_period_ms="500",  # notice a lost node within seconds
        RAY_health_check_failure_threshold="3",
    )
    out = Path(fit_args[fit_args.index("--out") + 1])
    head, head_proc, head_tmp, gcs = start_head(env, num_cpus=2, ip="127.0.0.2")
    node_proc, node_tmp = start_worker_node(env, gcs, 2, {"dpmot_node2": 1}, ip="127.0.0.3")
    result: dict = {}
    try:
        node2 = _wait(lambda: _node2(head), 90, "the second node")
        cmd = [sys.executable, "-m", "dpmot_dist.cli", "fit", *fit_args]
        with open(report.with_suffix(".log"), "wb") as log:
            fit = subprocess.Popen(
                cmd, env={**env, "RAY_ADDRESS": gcs}, stdout=log, stderr=subprocess.STDOUT
            )
            layout = _wait(lambda: _workers(out), 180, "the fit's actors")
            result["on_node2"] = [
                pid
                for pid, node in zip(layout["pids"], layout["nodes"], strict=True)
                if node == node2
            ]
            time.sleep(2.0)  # a few iterations in
            result["iterations_before_kill"] = _checkpointed(out)
            os.killpg(node_proc.pid, signal.SIGKILL)  # the whole node: raylet and its workers
            node_proc.wait(timeout=30)
            result["fit_returncode"] = fit.wait(timeout=300)
        result["node2_alive_after"] = [p for p in result["on_node2"] if Path(f"/proc/{p}").exists()]
    finally:
        stop_group(node_proc, node_proc.pid)
        stop_group(head_proc, head.pgid)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(node_tmp, ignore_errors=True)
        report.write_text(json.dumps(result))
    return 0


def _checkpointed(out: Path) -> bool:
    return (out / "_checkpoints" / "latest.npz").exists()


if __name__ == "__main__":
    sep = sys.argv.index("--")
    sys.exit(main(Path(sys.argv[1]), sys.argv[sep + 1 :]))
