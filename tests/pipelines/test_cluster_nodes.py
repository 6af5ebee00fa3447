"""A two-node Ray cluster on this machine: losing a node mid-fit leaves the potential unchanged.

``tests/nodeloss.py`` runs in a new network namespace (``unshare -n``, so that Ray's cluster
mode listens on that namespace's loopback only): a head on 127.0.0.2, a second node on
127.0.0.3 (``ray start --address``, its own temp dir and a custom resource ``dpmot_node2``),
and a ``dpmot fit`` of 2 replicas × 2 shards spread over both nodes. Once actors live on the
second node its whole process group is killed; Ray restarts the lost actors on the head,
their calls are retried, and since every call is a pure function of its arguments the fit
ends with the h of an undisturbed single-process run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from raycluster import can_unshare_network

from dpmot_dist.pipelines.fit import FitConfig, run_fit

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(480)]

TESTS = Path(__file__).resolve().parents[1]
FIT = {"iters": 40, "seed": 2, "lattice": 0, "eval_samples": 0, "min_batch": 8192}
LAYOUT = ["--replicas", "2", "--shards", "2", "--placement", "spread", "--cpus-per-worker", "0.4"]


def _flags(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in ("--" + k.replace("_", "-"), str(v))]


def test_fit_survives_losing_a_node(tmp_path: Path, rng) -> None:
    if not can_unshare_network():
        pytest.skip("no new network namespace here (unshare -n needs root or user namespaces)")
    targets = tmp_path / "y.npy"
    np.save(targets, rng.standard_normal((1500, 12)).astype(np.float32))
    ref = tmp_path / "ref"
    run_fit(FitConfig(targets=str(targets), out=str(ref), **FIT))
    out, report = tmp_path / "fit", tmp_path / "nodeloss.json"
    fit_args = ["--targets", str(targets), "--out", str(out), *_flags(FIT), *LAYOUT]
    cmd = ["unshare", "-n", sys.executable, str(TESTS / "nodeloss.py"), str(report), "--"]
    done = subprocess.run([*cmd, *fit_args], capture_output=True, text=True, timeout=460)
    log = report.with_suffix(".log")
    detail = done.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    assert done.returncode == 0, detail
    result = json.loads(report.read_text())
    assert result["on_node2"], "SPREAD put no actor on the second node"
    assert result["node2_alive_after"] == []  # the node and its actors were gone
    assert result["fit_returncode"] == 0, detail
    assert (out / "_SUCCESS").exists()
    np.testing.assert_array_equal(np.load(out / "h.npy"), np.load(ref / "h.npy"))
