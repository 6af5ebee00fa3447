"""``dpmot bench prepare``: the driver's peak memory while preparing a large synthetic data set.

Writes ``--rows × --dim`` standard-normal float32 points to a temporary ``.npy`` (streamed in
chunks, never whole in memory), runs ``prepare`` on ``--workers`` Ray tasks, and reports
the driver's peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, whole process lifetime; and
the peak of psutil's RSS sampled during ``prepare``) beside the data size. The driver only
reads the ``.npy`` header and collects part entries, so its peak should be a small constant
(the Python, torch and Ray client footprint), far below the data size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare

_CHUNK_BYTES = 32 << 20


def write_synthetic_npy(path: str, rows: int, dim: int, seed: int = 0) -> int:
    """Stream an (rows, dim) float32 N(0, 1) array to ``path`` in chunks; return its bytes."""
    header = {"descr": np.dtype(np.float32).str, "fortran_order": False, "shape": (rows, dim)}
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK_BYTES // (4 * dim))
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for a in range(0, rows, step):
            f.write(rng.standard_normal((min(step, rows - a), dim), dtype=np.float32).tobytes())
    return os.path.getsize(path)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler:
    """Peak of psutil's current RSS, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        try:
            import psutil
        except ImportError:  # psutil is optional: report ru_maxrss only
            self.process = None
        else:
            self.process = psutil.Process()
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        if self.process is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            self._stop.set()
            self._thread.join()


def _start_ray(workers: int) -> None:
    """Join RAY_ADDRESS, or start a fresh local cluster with ``workers`` CPUs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)


def run(rows: int, dim: int, workers: int, copies: int = 1, base: str | None = None) -> dict:
    """Generate, prepare, measure; the temporary folder is always removed."""
    tmp = tempfile.mkdtemp(prefix="dpmot-bench-prepare-", dir=base)
    try:
        data, out = os.path.join(tmp, "x.npy"), os.path.join(tmp, "targets")
        t0 = time.perf_counter()
        data_bytes = write_synthetic_npy(data, rows, dim)
        t_write = time.perf_counter() - t0
        _start_ray(workers)
        rss_before = peak_rss_bytes()
        cfg = PrepareConfig(data=data, out=out, step=100, copies=copies, workers=workers)
        t0 = time.perf_counter()
        with RssSampler() as sampler:
            manifest = run_prepare(cfg)
        t_prepare = time.perf_counter() - t0
        out_bytes = sum(e.stat().st_size for e in os.scandir(out) if e.is_file())
        peak = peak_rss_bytes()
        return {
            "rows": rows,
            "dim": dim,
            "copies": copies,
            "workers": workers,
            "data_bytes": data_bytes,
            "output_bytes": out_bytes,
            "parts": len(manifest["parts"]),
            "driver_peak_rss_bytes": peak,
            "driver_peak_rss_before_prepare_bytes": rss_before,
            "driver_sampled_peak_rss_during_prepare_bytes": sampler.peak or None,
            "peak_rss_over_data": peak / data_bytes,
            "seconds_write_input": t_write,
            "seconds_prepare": t_prepare,
            "input_mb_per_s": data_bytes / t_prepare / 1e6,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic points N")
    parser.add_argument("--dim", type=int, default=3072, help="dimension D")
    parser.add_argument("--workers", type=int, default=2, help="Ray tasks in flight")
    parser.add_argument("--copies", type=int, default=1, help="noise copies per point")
    parser.add_argument(
        "--tmp", default=None, help="folder for the temporary data (default: TMPDIR)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    r = run(args.rows, args.dim, args.workers, args.copies, args.tmp)
    gib = 1 << 30
    sampled = r["driver_sampled_peak_rss_during_prepare_bytes"]
    print(
        f"prepared {r['rows']:,} × {r['dim']:,} float32 ({r['data_bytes'] / gib:.2f} GiB in, "
        f"{r['output_bytes'] / gib:.2f} GiB out, {r['parts']} parts) on {r['workers']} workers "
        f"in {r['seconds_prepare']:.1f} s ({r['input_mb_per_s']:.0f} MB/s)"
    )
    print(
        f"driver peak RSS {r['driver_peak_rss_bytes'] / gib:.3f} GiB = "
        f"{100 * r['peak_rss_over_data']:.1f}% of the data"
        + (f" (sampled during prepare: {sampled / gib:.3f} GiB)" if sampled else "")
    )
    if args.json:
        print(json.dumps(r))
    return 0
