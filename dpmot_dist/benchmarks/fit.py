r"""``dpmot bench fit``: the distributed fit's iteration time and what reaches the driver.

For each (R replicas, G shards, B batch) of ``--replicas`` × ``--shards`` × ``--batches``, a
short fit runs through :func:`dpmot_dist.pipelines.fit.run_fit` on synthetic Gaussian targets
(N×D) on local Ray, its R·G shard actors (and reducers) sharing ``--cpus`` CPUs (fractional
CPUs per actor, set here). From the per-iteration records, after ``--warmup`` iterations, it
reports the median iteration time, search time, bytes into the driver and the driver's CPU
seconds. Statistics are computed where the points are (:mod:`dpmot_dist.pipelines.shards`):
the driver receives R Assignments (a few N-vectors each) per iteration, whatever B or the
source, so ``driver_bytes_per_iter`` ≤ 32·N·R + 1 MB must hold, equal across batches.

The cost model predicts one iteration of a target problem (default ImageNet scale:
N = 1.28M, D = 4,096, B = 10 N) on K = R·G GPUs:

.. math::
    t_{iter} \approx \underbrace{\frac{2 B N D}{K\,F}\,(1 + \lambda)}_{\text{search}}
    + \underbrace{\frac{(K/g) \cdot 8N + R \cdot c N}{W}}_{\text{h out, counts in}}
    + \underbrace{\frac{R N}{Q}}_{\text{driver sum}}
    + \underbrace{[G > 1]\,\frac{(B/R)\,G\,s}{W_{node}}}_{\text{top-k to the reducer}},

F one GPU's matmul rate, g GPUs per node (h reaches each node's object store once), λ the
lattice's scoring overhead per projection (0 for independent points; (G_lat/m)(2m + 1)/(2D)
at the kernel's rate), c the bytes of counts per cell a group returns (4 for the int32
counts, 8 with the control variate's snapshot counts), Q the driver's rate of summing
N-vectors (measured here), W the driver's and W_node a node's bandwidth, s the bytes of one
point's top-k. Scaling efficiency from 8 to 64 GPUs: t(8)·8 / (t(64)·64).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dpmot_dist.benchmarks.search import best_times
from dpmot_dist.ot.assign import Assignment, combine
from dpmot_dist.pipelines.fit import FitConfig, run_fit

FORMULA = (
    "t_iter ≈ 2·B·N·D/(K·F)·(1 + λ)  +  ((K/g)·8N + R·c·N)/W  +  R·N/Q  +  [G>1]·(B/R)·G·s/W_node"
    "   (K = R·G GPUs, g per node; F: one GPU's matmul rate; λ: lattice scoring overhead; c: "
    "bytes of counts per cell per group; Q: the driver's N-vector sum rate; W, W_node: "
    "bandwidths)"
)


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """One iteration's time at a target scale, from measured driver costs.

    Attributes:
        n, dim, samples_per_cell: the target problem (B = samples_per_cell · N).
        count_bytes: c, bytes per cell a replica group returns per iteration.
        sum_rate: Q, cells per second the driver adds into its totals.
        net_gbps: W, the driver's network bandwidth; node_gbps: W_node, within a node.
        topk_bytes: s, bytes of one point's top-k (value, index) from one shard.
        lattice_overhead: λ, the lattice's extra search time per projection ÷ the GEMM's.
    """

    n: int = 1_280_000
    dim: int = 4096
    samples_per_cell: float = 10.0
    count_bytes: float = 8.0
    sum_rate: float = 5e8
    net_gbps: float = 100.0
    node_gbps: float = 900.0
    topk_bytes: float = 16.0
    lattice_overhead: float = 0.0
    gpus_per_node: int = 8

    @property
    def batch(self) -> int:
        return math.ceil(self.samples_per_cell * self.n)

    def predict(self, gpus: int, tflops: float, shards: int = 1) -> dict:
        """Seconds of each term for K = ``gpus`` at F = ``tflops``, G = ``shards`` per group."""
        b, k, g = self.batch, gpus, shards
        r = max(1, k // g)
        t_search = 2.0 * b * self.n * self.dim / (k * tflops * 1e12) * (1 + self.lattice_overhead)
        nodes = math.ceil(k / self.gpus_per_node)
        t_transfer = (nodes * 8 * self.n + r * self.count_bytes * self.n) / (
            self.net_gbps * 1e9 / 8
        )
        t_driver = r * self.n / self.sum_rate
        t_group = (b / r) * g * self.topk_bytes / (self.node_gbps * 1e9 / 8) if g > 1 else 0.0
        total = t_search + t_transfer + t_driver + t_group
        return {
            "replicas": r,
            "shards": g,
            "t_search": t_search,
            "t_transfer": t_transfer,
            "t_driver": t_driver,
            "t_group": t_group,
            "t_iter": total,
            "driver_bytes_per_iter": r * self.count_bytes * self.n,
            "search_fraction": t_search / total,
        }


def synthetic_targets(path: Path, n: int, dim: int, seed: int = 0) -> Path:
    """Write N×D standard Gaussian float32 targets to ``path`` (a .npy)."""
    y = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    np.save(path, y)
    return path


def matmul_gflops(n: int, dim: int, batch: int = 4096, repeat: int = 3) -> float:
    """This machine's best fp32 matmul rate (torch or numpy, all threads) on B×D·D×N."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, dim, generator=gen), torch.randn(n, dim, generator=gen)
    xn, yn = x.numpy(), y.numpy()
    flops = 2.0 * batch * n * dim
    fns = {"torch": lambda: x @ y.T, "numpy": lambda: xn @ yn.T}
    t = min(best_times(fns, repeat, lambda: None).values())
    return flops / t / 1e9


def driver_sum_rate(groups: int = 8, n: int = 1 << 20) -> float:
    """Cells per second the driver adds into its totals (``combine`` of R Assignments with
    counts and snapshot counts, as the pool does)."""
    rng = np.random.default_rng(0)
    parts = [
        Assignment(
            rng.integers(0, 100, n, dtype=np.int32),
            1.0,
            100 * n,
            snap_counts=rng.integers(0, 100, n, dtype=np.int32),
        )
        for _ in range(groups)
    ]
    combine(parts)
    t0 = time.perf_counter()
    combine(parts)
    return groups * n / (time.perf_counter() - t0)


def run_layout(
    targets: Path, replicas: int, shards: int, batch: int, *, args, cpus: float, out: Path
) -> dict:
    """A short fit with R × G actors at batch B; medians of the per-iteration records."""
    actors = replicas * shards + (replicas if shards > 1 else 0)
    cfg = FitConfig(
        targets=str(targets),
        out=str(out),
        replicas=replicas,
        shards=shards,
        cpus_per_worker=max(cpus / actors, 0.01),
        iters=args.iters,
        seed=args.seed,
        chunk=args.chunk,
        lattice=args.lattice,
        samples_per_cell=1e-9,
        min_batch=batch,
        eval_samples=0,
        log_every=1,
        checkpoint_every=args.iters + 1,
        overwrite=True,
        stop="cap",
        patience=10**6,
    )
    result = run_fit(cfg)
    records = result.metrics[args.warmup :] or result.metrics[-1:]
    keys = ("t_iter", "t_search", "t_reduce", "t_transfer", "t_driver_cpu", "bytes_moved")
    med = {key: statistics.median(r.get(key, 0.0) for r in records) for key in keys}
    return {
        "replicas": replicas,
        "shards": shards,
        "batch": int(records[-1]["batch"]),
        "points": int(records[-1]["points"]),
        "iterations": len(records),
        "t_iter": med["t_iter"],
        "search_seconds_per_iter": med["t_search"],
        "driver_bytes_per_iter": med["bytes_moved"],
        "driver_seconds_per_iter": med["t_driver_cpu"],
        "driver_reduce_seconds_per_iter": med["t_reduce"],
        "search_fraction": med["t_search"] / med["t_iter"] if med["t_iter"] else 0.0,
        "bytes_bound": 32 * result.h.size * replicas + (1 << 20),
    }


def start_ray(cpus: float) -> None:
    """Join RAY_ADDRESS, else start a private local cluster of ``cpus`` CPUs.

    ``address="local"``: with None, ``ray.init`` would join the cluster this machine started
    last (``/tmp/ray/ray_current_cluster``), whoever's it is.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            address="local", num_cpus=math.ceil(cpus), include_dashboard=False, log_to_driver=False
        )


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",")]


def run(args: argparse.Namespace) -> dict:
    """Measure every (R, G, B), then feed the cost model and predict."""
    cpus = args.cpus or float(os.cpu_count() or 1)
    report: dict = {"n": args.n, "dim": args.dim, "cpus": cpus, "lattice": args.lattice}
    start_ray(cpus)
    runs = []
    with tempfile.TemporaryDirectory(prefix="dpmot-bench-fit-") as tmp:
        targets = synthetic_targets(Path(tmp) / "y.npy", args.n, args.dim, args.seed)
        for r in _ints(args.replicas):
            for g in _ints(args.shards):
                for b in _ints(args.batches):
                    out = Path(tmp) / f"fit-{r}-{g}-{b}"
                    runs.append(run_layout(targets, r, g, b, args=args, cpus=cpus, out=out))
    report["runs"] = runs
    report["checks"] = checks(runs)
    report["matmul_gflops"] = matmul_gflops(args.n, args.dim)
    report["driver_sum_rate"] = driver_sum_rate()
    report["cost_model"] = cost_model(report, args)
    return report


def checks(runs: list[dict]) -> dict:
    """Driver bytes within 32·N·R + 1 MB, and within 10% across batches of one layout."""
    within = all(r["driver_bytes_per_iter"] <= r["bytes_bound"] for r in runs)
    spread = {}
    for r in runs:
        spread.setdefault((r["replicas"], r["shards"]), []).append(r["driver_bytes_per_iter"])
    flat = all(max(v) <= 1.1 * min(v) for v in spread.values())
    return {"driver_bytes_within_bound": within, "driver_bytes_flat_in_batch": flat}


def cost_model(report: dict, args: argparse.Namespace) -> dict:
    """Predictions at 8, 64 and 256 GPUs (G = 1), lattice on and off, from measured inputs."""
    lattice_overhead = (64 / 3) * 7 / (2 * args.target_dim) / args.lattice_kernel_efficiency
    out = {"formula": FORMULA, "predictions": {}, "scaling_efficiency_8_to_64": {}}
    for name, overhead in (("independent", 0.0), ("lattice", lattice_overhead)):
        model = CostModel(
            n=args.target_n,
            dim=args.target_dim,
            samples_per_cell=args.target_samples_per_cell,
            sum_rate=report["driver_sum_rate"],
            net_gbps=args.net_gbps,
            lattice_overhead=overhead,
        )
        preds = {str(k): model.predict(k, args.gpu_tflops) for k in args.gpus}
        out["predictions"][name] = preds
        out["inputs_" + name] = {**asdict(model), "batch": model.batch, "tflops": args.gpu_tflops}
        if "8" in preds and "64" in preds:
            t8, t64 = preds["8"]["t_iter"], preds["64"]["t_iter"]
            out["scaling_efficiency_8_to_64"][name] = t8 * 8 / (t64 * 64)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", default="1,2", help="comma-separated R")
    parser.add_argument("--shards", default="1,2", help="comma-separated G")
    parser.add_argument("--batches", default="16384,65536", help="comma-separated B")
    parser.add_argument("--n", type=int, default=20000, help="targets N")
    parser.add_argument("--dim", type=int, default=64, help="dimension D")
    parser.add_argument("--iters", type=int, default=6, help="iterations per run")
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out of medians")
    parser.add_argument("--lattice", type=int, default=64, help="lattice points (0: plain)")
    parser.add_argument("--chunk", type=int, default=4096, help="source samples per search")
    parser.add_argument("--cpus", type=float, default=None, help="CPUs shared by the actors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-n", type=int, default=1_280_000, help="cost model: N")
    parser.add_argument("--target-dim", type=int, default=4096, help="cost model: D")
    parser.add_argument(
        "--target-samples-per-cell", type=float, default=10.0, help="cost model: B / N"
    )
    parser.add_argument(
        "--gpus", type=lambda s: [int(v) for v in s.split(",")], default=[8, 64, 256]
    )
    parser.add_argument("--gpu-tflops", type=float, default=790.0, help="one GPU, bf16")
    parser.add_argument(
        "--lattice-kernel-efficiency",
        type=float,
        default=0.1,
        help="the fused lattice kernel's rate ÷ the GEMM's, per flop (memory-bound scoring)",
    )
    parser.add_argument("--net-gbps", type=float, default=100.0, help="driver bandwidth")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    report = run(args)
    print(
        f"N={args.n} D={args.dim} lattice={args.lattice} on {report['cpus']:g} CPUs; fp32 "
        f"matmul {report['matmul_gflops']:.1f} GFLOP/s; the driver sums "
        f"{report['driver_sum_rate']:.3g} cells/s"
    )
    print(
        f"{'R':>2} {'G':>2} {'batch':>8} {'t_iter s':>9} {'search s':>9} {'driver s':>9} "
        f"{'driver MB':>10} {'bound MB':>9}"
    )
    for r in report["runs"]:
        print(
            f"{r['replicas']:>2} {r['shards']:>2} {r['batch']:>8,d} {r['t_iter']:9.3f} "
            f"{r['search_seconds_per_iter']:9.3f} {r['driver_seconds_per_iter']:9.3f} "
            f"{r['driver_bytes_per_iter'] / 1e6:10.3f} {r['bytes_bound'] / 1e6:9.3f}"
        )
    print(f"checks: {report['checks']}")
    cm = report["cost_model"]
    print(f"cost model: {cm['formula']}")
    for name, preds in cm["predictions"].items():
        for k, p in preds.items():
            print(
                f"  {name:11s} K={k:>3}: search {p['t_search']:.2f} s + transfer "
                f"{p['t_transfer']:.3f} s + driver {p['t_driver']:.3f} s = {p['t_iter']:.2f} s "
                f"({p['search_fraction']:.0%} in search, {p['driver_bytes_per_iter'] / 1e6:.0f} MB "
                "into the driver)"
            )
    print(f"  scaling efficiency 8 → 64 GPUs: {cm['scaling_efficiency_8_to_64']}")
    if args.json:
        print(json.dumps(report))
    return 0
