"""``dpmot bench search``: every search backend's rate ÷ the best plain fp32 matmul.

All rates are GFLOP/s of the 2·B·N·D flops of the score matrix, measured in one run on the
same shapes (best of ``--repeat`` after a warm-up). The baseline ``reference`` is the
reference code's search (targets in chunks of 1,000, a running max by ``torch.stack``).
``lattice`` searches B projections' worth of the lattice source (B/m random subspaces of G
points each, :meth:`~dpmot_dist.ot.search.TargetIndex.search_lattice`) and is rated by the same
2·B·N·D: its ratio is projections per second ÷ matmul rows per second.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from dpmot_dist.ot.search import BACKENDS, TargetIndex, default_backend, resolve_backend
from dpmot_dist.ot.sources import Source


def best_times(
    fns: dict[str, Callable[[], object]], repeat: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Best wall time of each function over ``repeat`` interleaved rounds, after a warm-up.

    Rounds alternate between the functions, so that a slow spell of a shared machine hits
    every candidate alike and the ratios stay meaningful.
    """
    for fn in fns.values():
        fn()
    sync()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def reference_search(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, chunk: int = 1000):
    """The reference code's search: per chunk of 1,000 targets a max, then a stacked max."""
    best_v = best_i = None
    for start in range(0, y.shape[0], chunk):
        v, i = (x @ y[start : start + chunk].T + h[start : start + chunk]).max(1)
        i = i + start
        if best_v is None:
            best_v, best_i = v, i
            continue
        vs, is_ = torch.stack([best_v, v]), torch.stack([best_i, i])
        best_v, which = vs.max(0)
        best_i = is_.gather(0, which[None])[0]
    return best_v, best_i


def run(
    n: int, dim: int, batch: int, device: str, repeat: int, seed: int = 0, lattice: int = 64
) -> dict:
    """Measure matmul, every available backend and the reference search; return the report."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen).to(device)
    y = torch.randn(n, dim, generator=gen).to(device)
    h = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    flops = 2.0 * batch * n * dim
    rate = lambda t: flops / t / 1e9  # noqa: E731
    fns: dict[str, Callable[[], object]] = {"matmul:torch": lambda: x @ y.T}
    if device == "cpu":
        xn, yn = x.numpy(), y.numpy()
        fns["matmul:numpy"] = lambda: xn @ yn.T
    if device == "cuda":
        xb, yb = x.bfloat16(), y.bfloat16()
        fns["matmul:bf16"] = lambda: xb @ yb.T
    indexes = {}
    for name in BACKENDS:
        try:
            indexes[name] = TargetIndex(y, backend=resolve_backend(name, device), device=device)
        except ValueError:
            continue
        fns[name] = lambda index=indexes[name]: index.search(x, h, 1)
    if lattice:
        lat = Source(lattice=lattice).draw(batch, dim, seed, 0, device=device)
        index = next(iter(indexes.values()))
        fns["lattice"] = lambda: index.search_lattice(lat, h, 1)
    h32 = h.float()
    fns["reference"] = lambda: reference_search(x, y, h32)
    gflops = {name: rate(t) for name, t in best_times(fns, repeat, sync).items()}
    matmul = {
        k.split(":")[1]: v for k, v in gflops.items() if k in ("matmul:torch", "matmul:numpy")
    }
    report: dict = {
        "n": n,
        "dim": dim,
        "batch": batch,
        "device": device,
        "matmul_gflops": max(matmul.values()),
        "matmul": matmul,
        "default": default_backend(device),
        "backends": {},
    }
    if device == "cuda":
        report["bf16_matmul_gflops"] = gflops["matmul:bf16"]
    truth = reference_search(x[:512].double(), y.double(), h)[1].cpu()
    for name, index in indexes.items():
        winners = index.search(x[:512], h, 1)[1][:, 0].cpu()
        report["backends"][name] = {
            "gflops": gflops[name],
            "ratio": gflops[name] / report["matmul_gflops"],
            "disagree": float((winners != truth).float().mean()),
        }
    report["backends"]["reference"] = {
        "gflops": gflops["reference"],
        "ratio": gflops["reference"] / report["matmul_gflops"],
    }
    if lattice:
        report["lattice"] = {
            "points": lattice,
            "rank": lat.q.shape[1],
            "points_per_projection": len(lat) / lat.projections,
            "gflops": gflops["lattice"],
            "ratio": gflops["lattice"] / report["matmul_gflops"],
        }
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=20000, help="targets N")
    parser.add_argument("--dim", type=int, default=1024, help="dimension D")
    parser.add_argument("--batch", type=int, default=4096, help="queries B")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument(
        "--lattice", type=int, default=64, help="lattice points per subspace (0: skip)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    report = run(args.n, args.dim, args.batch, args.device, args.repeat, lattice=args.lattice)
    print(
        f"N={args.n} D={args.dim} B={args.batch} on {args.device}: plain fp32 matmul "
        f"{report['matmul_gflops']:.1f} GFLOP/s {report['matmul']}"
    )
    for name, r in report["backends"].items():
        mark = " (default)" if name == report["default"] else ""
        print(f"  {name:10s} {r['gflops']:8.1f} GFLOP/s  ratio {r['ratio']:.3f}{mark}")
    if "lattice" in report:
        r = report["lattice"]
        print(
            f"  lattice    {r['gflops']:8.1f} GFLOP/s  ratio {r['ratio']:.3f} (per projection; "
            f"{r['points_per_projection']:.1f} points each)"
        )
    if args.json:
        print(json.dumps(report))
    return 0
