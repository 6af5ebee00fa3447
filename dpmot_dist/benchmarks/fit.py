"""``dpmot bench fit``: the distributed fit's iteration time, split, bytes moved; a cost model.

For each K in ``--workers`` a short fit runs through :func:`dpmot_dist.pipelines.fit.run_fit` on
synthetic Gaussian targets (N×D), with K Ray shard actors sharing ``--cpus`` CPUs (K = 0:
in process). From the per-iteration records, after ``--warmup`` iterations, it reports the
median iteration time, the median search / transfer / reduce times, the bytes moved between
the driver and the actors, and the fraction of the iteration spent searching.

The cost model predicts one iteration of a target problem (default ImageNet scale:
N = 1.28M, D = 4,096, 10 samples per cell, so B = 12.8M) on K GPUs:

.. math::
    t_{iter}(K) \\approx \\underbrace{\\frac{2 B (N/K) D}{R}}_{search}
    + \\underbrace{\\frac{K B s + K N \\cdot 8}{W}}_{transfer}
    + \\underbrace{\\frac{K B}{Q}}_{reduce}

with R one GPU's matmul rate (``--gpu-tflops``), s the bytes each actor returns per sample
and Q the driver's merge rate in (sample, worker) pairs per second (both measured here),
and W the driver's network bandwidth (``--net-gbps``). Transfer and reduce overlap the next
wave's search, so the serial sum is an upper bound and max(search, transfer + reduce) a
lower one.
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
from dpmot_dist.ot.assign import assignment_from_winners
from dpmot_dist.ot.search import merge_topk
from dpmot_dist.ot.sources import Source
from dpmot_dist.pipelines.fit import FitConfig, run_fit

SPLIT = ("t_search", "t_transfer", "t_reduce")
FORMULA = (
    "t_iter(K) ≈ 2·B·(N/K)·D / R  +  (K·B·s + K·N·8) / W  +  K·B / Q   "
    "(B = samples_per_cell·N; R: one GPU's matmul rate; s: bytes per sample per worker; "
    "W: driver network bandwidth; Q: driver merge rate, (sample, worker) pairs/s)"
)


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """One iteration's time at a target scale from measured per-sample costs.

    Attributes:
        n, dim, samples_per_cell: the target problem (B = samples_per_cell · N).
        bytes_per_sample: s, bytes one actor returns to the driver per source sample.
        reduce_rate: Q, (sample, worker) pairs the driver merges per second.
        net_gbps: W, the driver's network bandwidth in Gbit/s.
    """

    n: int = 1_280_000
    dim: int = 4096
    samples_per_cell: float = 10.0
    bytes_per_sample: float = 16.0
    reduce_rate: float = 1e8
    net_gbps: float = 100.0

    @property
    def batch(self) -> int:
        return math.ceil(self.samples_per_cell * self.n)

    def predict(self, workers: int, tflops: float) -> dict:
        """Seconds of search, transfer and reduce for K = ``workers`` at R = ``tflops``."""
        b, k = self.batch, workers
        t_search = 2.0 * b * (self.n / k) * self.dim / (tflops * 1e12)
        moved = k * b * self.bytes_per_sample + k * self.n * 8
        t_transfer = moved / (self.net_gbps * 1e9 / 8)
        t_reduce = k * b / self.reduce_rate
        return {
            "t_search": t_search,
            "t_transfer": t_transfer,
            "t_reduce": t_reduce,
            "bytes_moved": moved,
            "t_iter_serial": t_search + t_transfer + t_reduce,
            "t_iter_overlapped": max(t_search, t_transfer + t_reduce),
            "search_fraction": t_search / (t_search + t_transfer + t_reduce),
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


def noise_seconds(batch: int, dim: int, chunk: int, threads: int) -> float:
    """Seconds one actor spends regenerating the B source points of one iteration."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        for start in range(0, batch, chunk):
            Source().sample(min(chunk, batch - start), dim, 0, 0, start)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def driver_reduce_rate(workers: int = 8, samples: int = 1 << 20, n: int = 1 << 20) -> float:
    """(sample, worker) pairs per second through the driver's reduce (merge, then counts).

    The same calls as :meth:`dpmot_dist.pipelines.shards.ShardPool.assign` on K shards'
    (value, index) answers, at a size where per-call overheads no longer matter.
    """
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, n, workers + 1).astype(np.int64)
    parts = [
        (rng.standard_normal((samples, 1)), rng.integers(a, b, (samples, 1)))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    t0 = time.perf_counter()
    values, indices = merge_topk(parts, 1)
    assignment_from_winners(values[:, 0], indices[:, 0], n, 4096)
    return workers * samples / (time.perf_counter() - t0)


def run_workers(
    targets: Path, workers: int, *, iters: int, warmup: int, cpus: float, args, out: Path
) -> dict:
    """A short fit with K = ``workers`` actors; medians of the per-iteration records."""
    cfg = FitConfig(
        targets=str(targets),
        out=str(out),
        workers=workers,
        cpus_per_worker=max(cpus / max(workers, 1), 0.01),
        iters=iters,
        seed=args.seed,
        chunk=args.chunk,
        samples_per_cell=args.samples_per_cell,
        eval_samples=0,
        log_every=1,
        checkpoint_every=iters + 1,
        overwrite=True,
    )
    result = run_fit(cfg)
    records = result.metrics[warmup:] or result.metrics[-1:]
    med = {key: statistics.median(r.get(key, 0.0) for r in records) for key in (*SPLIT, "t_iter")}
    total = {key: sum(r.get(key, 0.0) for r in records) for key in (*SPLIT, "t_iter")}
    batch = records[-1]["batch"]
    bytes_moved = statistics.median(r.get("bytes_moved", 0) for r in records)
    h_bytes = workers * result.h.size * 8
    return {
        "workers": workers,
        "cpus_per_worker": cfg.cpus_per_worker,
        "batch": batch,
        "iterations": len(records),
        "t_iter": med["t_iter"],
        **{key: med[key] for key in SPLIT},
        "t_other": max(0.0, med["t_iter"] - sum(med[key] for key in SPLIT)),
        "search_fraction": total["t_search"] / total["t_iter"],
        "bytes_moved": bytes_moved,
        "bytes_per_sample_per_worker": (bytes_moved - h_bytes) / (batch * workers)
        if workers
        else 0.0,
        "reduce_rate": workers * batch / med["t_reduce"] if workers and med["t_reduce"] else None,
        "samples_per_s": batch / med["t_iter"],
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


def run(args: argparse.Namespace) -> dict:
    """Measure every K, then fit the cost model's per-sample costs and predict."""
    ks = [int(k) for k in args.workers.split(",")]
    cpus = args.cpus or float(os.cpu_count() or 1)
    report: dict = {"n": args.n, "dim": args.dim, "cpus": cpus, "workers": {}}
    if any(ks):
        start_ray(cpus)
    with tempfile.TemporaryDirectory(prefix="dpmot-bench-fit-") as tmp:
        targets = synthetic_targets(Path(tmp) / "y.npy", args.n, args.dim, args.seed)
        for k in ks:
            report["workers"][str(k)] = run_workers(
                targets,
                k,
                iters=args.iters,
                warmup=args.warmup,
                cpus=cpus,
                args=args,
                out=Path(tmp) / f"fit-{k}",
            )
    report["matmul_gflops"] = matmul_gflops(args.n, args.dim)
    batch = next(iter(report["workers"].values()))["batch"]
    report["noise_s_per_actor"] = noise_seconds(batch, args.dim, args.chunk, 1)
    report["driver_reduce_rate"] = driver_reduce_rate()
    report["cost_model"] = cost_model(report, args)
    return report


def cost_model(report: dict, args: argparse.Namespace) -> dict:
    """The model fed by the remote runs' measured s and Q; predictions at 8 and 64 GPUs."""
    remote = [r for r in report["workers"].values() if r["workers"] > 0]
    s = max((r["bytes_per_sample_per_worker"] for r in remote), default=16.0)
    q = report["driver_reduce_rate"]
    model = CostModel(
        n=args.target_n,
        dim=args.target_dim,
        samples_per_cell=args.target_samples_per_cell,
        bytes_per_sample=s,
        reduce_rate=q,
        net_gbps=args.net_gbps,
    )
    rates_tflops = {"bf16": args.gpu_tflops, "fp32": args.gpu_tflops_fp32}
    out = {
        "formula": FORMULA,
        "inputs": {**asdict(model), "batch": model.batch, "gpu_tflops": rates_tflops},
        "predictions": {
            f"{k}": {name: model.predict(k, r) for name, r in rates_tflops.items()}
            for k in args.gpus
        },
    }
    # The same model at the measured problem, with this machine's matmul rate, vs measured.
    here = CostModel(
        n=args.n,
        dim=args.dim,
        samples_per_cell=args.samples_per_cell,
        bytes_per_sample=s,
        reduce_rate=q,
        net_gbps=args.net_gbps,
    )
    rate_here = report["matmul_gflops"] / 1e3  # all CPUs together, in TFLOP/s
    out["check_here"] = {
        k: {
            "predicted_t_search": here.predict(1, rate_here)["t_search"],
            "measured_t_search": r["t_search"],
            "measured_t_iter": r["t_iter"],
        }
        for k, r in report["workers"].items()
    }
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="1,2", help="comma-separated K (0: in process)")
    parser.add_argument("--n", type=int, default=20000, help="targets N")
    parser.add_argument("--dim", type=int, default=256, help="dimension D")
    parser.add_argument("--iters", type=int, default=10, help="iterations per K")
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out of medians")
    parser.add_argument("--samples-per-cell", type=float, default=10.0, help="B = this × N")
    parser.add_argument("--chunk", type=int, default=4096, help="source samples per search")
    parser.add_argument("--cpus", type=float, default=None, help="CPUs shared by the K actors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-n", type=int, default=1_280_000, help="cost model: N")
    parser.add_argument("--target-dim", type=int, default=4096, help="cost model: D")
    parser.add_argument(
        "--target-samples-per-cell", type=float, default=10.0, help="cost model: B / N"
    )
    parser.add_argument(
        "--gpus", type=lambda s: [int(v) for v in s.split(",")], default=[8, 64], help="K"
    )
    parser.add_argument("--gpu-tflops", type=float, default=790.0, help="one GPU, bf16")
    parser.add_argument("--gpu-tflops-fp32", type=float, default=67.0, help="one GPU, fp32")
    parser.add_argument("--net-gbps", type=float, default=100.0, help="driver bandwidth")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    report = run(args)
    print(
        f"N={args.n} D={args.dim} B={next(iter(report['workers'].values()))['batch']:,} "
        f"on {report['cpus']:g} CPUs; fp32 matmul {report['matmul_gflops']:.1f} GFLOP/s"
    )
    print(
        f"{'K':>3} {'t_iter s':>9} {'search':>8} {'transfer':>9} {'reduce':>8} {'other':>8} "
        f"{'in search':>9} {'MB moved':>9} {'B/sample':>8} {'samples/s':>10}"
    )
    for k, r in report["workers"].items():
        print(
            f"{k:>3} {r['t_iter']:9.3f} {r['t_search']:8.3f} {r['t_transfer']:9.3f} "
            f"{r['t_reduce']:8.3f} {r['t_other']:8.3f} {r['search_fraction']:9.1%} "
            f"{r['bytes_moved'] / 1e6:9.2f} {r['bytes_per_sample_per_worker']:8.1f} "
            f"{r['samples_per_s']:10.3g}"
        )
    cm = report["cost_model"]
    ideal = next(iter(cm["check_here"].values()))["predicted_t_search"]
    print(
        f"search at the matmul rate would take {ideal:.3f} s; regenerating one batch of noise "
        f"takes one thread {report['noise_s_per_actor']:.3f} s; the driver merges "
        f"{report['driver_reduce_rate']:.3g} (sample, worker) pairs/s"
    )
    inputs = cm["inputs"]
    print(f"cost model: {cm['formula']}")
    print(
        f"  N={inputs['n']:,} D={inputs['dim']:,} B={inputs['batch']:,} "
        f"s={inputs['bytes_per_sample']:.1f} B Q={inputs['reduce_rate']:.3g}/s "
        f"W={inputs['net_gbps']:g} Gbit/s"
    )
    for k, by_rate in cm["predictions"].items():
        for name, p in by_rate.items():
            print(
                f"  K={k:>3} {name} ({inputs['gpu_tflops'][name]:g} TFLOP/s): "
                f"search {p['t_search']:.2f} s + transfer {p['t_transfer']:.2f} s + "
                f"reduce {p['t_reduce']:.2f} s = {p['t_iter_serial']:.2f} s "
                f"(overlapped ≥ {p['t_iter_overlapped']:.2f} s; "
                f"{p['search_fraction']:.0%} in search)"
            )
    if args.json:
        print(json.dumps(report))
    return 0
