"""``dpmot bench search``: every search backend's rate ÷ the best plain fp32 matmul.

All rates are GFLOP/s of the 2·B·N·D flops of the score matrix, measured in one run on the
same shapes (best of ``--repeat`` after a warm-up). The baseline ``reference`` is the
reference code's search (targets in chunks of 1,000, a running max by ``torch.stack``).
``lattice`` searches B projections' worth of the lattice source (B/m random subspaces of G
points each, :meth:`~dpmot_dist.ot.search.TargetIndex.search_lattice`) and is rated by the same
2·B·N·D: its ratio is projections per second ÷ matmul rows per second.

``--backends`` names the candidates as ``NAME`` or ``NAME:DTYPE`` (the storage dtype the
candidate pass reads; ``--dtypes`` for names given alone). A backend stored in float32 is
reported under its bare name (``torch``), any other as ``NAME:DTYPE`` (``triton:bfloat16``).
On CUDA each backend also gets its rate ÷ the plain bf16 matmul's (``ratio_bf16``). Every
backend reports, on the first ``--stat-rows`` rows, the fraction whose candidates all went
through the exact float64 re-score (``rescored_rows``: the gap test of
:meth:`~dpmot_dist.ot.search.TargetIndex.certified` could not certify the candidate pass's
winner; 1 for a pass that returns no scores) and the fraction whose winner the re-score
changed (``winner_changed``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from dpmot_dist.ot.search import (
    BACKENDS,
    STORAGE_DTYPES,
    TargetIndex,
    default_backend,
    resolve_backend,
)
from dpmot_dist.ot.sources import Source

DTYPE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


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


def parse_backends(
    backends: str | list[str] | None, dtypes: str | list[str] = ("float32",)
) -> list[tuple[str, str]]:
    """(backend, storage dtype) pairs of ``--backends`` × ``--dtypes``, in order, no repeats.

    ``backends``: names or ``NAME:DTYPE`` entries (None: every backend); a bare name takes
    each of ``dtypes``.
    """
    names = BACKENDS if backends is None else _split(backends)
    dtypes = _split(dtypes)
    pairs: list[tuple[str, str]] = []
    for entry in names:
        name, _, dtype = entry.partition(":")
        for d in [dtype] if dtype else dtypes:
            if d not in STORAGE_DTYPES:
                raise ValueError(f"{entry}: storage dtype must be one of {sorted(STORAGE_DTYPES)}")
            if (name, d) not in pairs:
                pairs.append((name, d))
    return pairs


def _split(v: str | list[str] | tuple[str, ...]) -> list[str]:
    return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else list(v)


def label(backend: str, dtype: str) -> str:
    """The report's key of a backend: its name for float32 storage, else ``NAME:DTYPE``."""
    return backend if dtype == "float32" else f"{backend}:{dtype}"


def build_indexes(
    y: torch.Tensor, pairs: list[tuple[str, str]], device: str
) -> tuple[dict[str, TargetIndex], dict[str, str]]:
    """A TargetIndex per (backend, dtype) that can run on ``device``, and why the others
    cannot (``{label: reason}``)."""
    indexes, unavailable = {}, {}
    for name, dtype in pairs:
        key = label(name, dtype)
        if name == "faiss" and dtype != "float32":
            unavailable[key] = "faiss scores in float32 only"
            continue
        try:
            backend = resolve_backend(name, device)
            indexes[key] = TargetIndex(y, backend=backend, storage_dtype=dtype, device=device)
        except (ValueError, RuntimeError, ImportError) as e:
            unavailable[key] = str(e)
    return indexes, unavailable


def rescore_fractions(index: TargetIndex, x: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    """Of the rows of x: the fraction whose c = 1 + margin candidates were all re-scored
    exactly (the candidate pass's score gap s̃₁ − s̃₂ within twice its error bound, as
    ``TargetIndex.certified`` tests it; every row when the pass returns no scores), and the
    fraction whose exact winner is not the candidate pass's first candidate.

    x: (B, D) float32 and h: (N,) float64, both on the index's device.
    """
    c = min(index.n, 1 + index.margin)
    scores, cand = index.candidates(x, h, c)
    winner = index.search(x, h, 1)[1][:, 0].to(index.device)
    changed = cand[:, 0].to(index.device).long() + index.offset != winner
    rescored = ~index.certified(x, h, scores, cand.shape, 1)
    return {
        "rescored_rows": float(rescored.double().mean()),
        "winner_changed": float(changed.double().mean()),
    }


def run(
    n: int,
    dim: int,
    batch: int,
    device: str,
    repeat: int,
    seed: int = 0,
    lattice: int = 64,
    *,
    backends: str | list[str] | None = None,
    dtypes: str | list[str] = ("float32",),
    lattice_backend: str | None = None,
    stat_rows: int = 4096,
) -> dict:
    """Measure matmul, every available backend and the reference search; return the report.

    ``lattice_backend`` (``NAME[:DTYPE]``, default: the device's default backend in float32)
    is the index that searches the lattice source; it joins the measured backends.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, device=device)
    y = torch.randn(n, dim, generator=gen, device=device)
    h = torch.randn(n, generator=gen, dtype=torch.float64, device=device)
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
    pairs = parse_backends(backends, dtypes)
    lattice_key = None
    if lattice:
        name, _, dtype = (lattice_backend or default_backend(device)).partition(":")
        pairs += [p for p in parse_backends([name], [dtype or "float32"]) if p not in pairs]
        lattice_key = label(name, dtype or "float32")
    indexes, unavailable = build_indexes(y, pairs, device)
    for name, index in indexes.items():
        fns[name] = lambda index=index: index.search(x, h, 1)
    if lattice_key in indexes:
        lat = Source(lattice=lattice).draw(batch, dim, seed, 0, device=device)
        fns["lattice"] = lambda index=indexes[lattice_key]: index.search_lattice(lat, h, 1)
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
        "unavailable": unavailable,
    }
    if device == "cuda":
        report["bf16_matmul_gflops"] = gflops["matmul:bf16"]
        report["gpu"] = torch.cuda.get_device_name()
    truth = reference_search(x[:512].double(), y.double(), h)[1].cpu()
    for name, index in indexes.items():
        winners = index.search(x[:512], h, 1)[1][:, 0].cpu()
        report["backends"][name] = {
            "backend": index.backend,
            "storage_dtype": DTYPE_NAMES[index.dtype],
            "gflops": gflops[name],
            "ratio": gflops[name] / report["matmul_gflops"],
            "disagree": float((winners != truth).float().mean()),
            **rescore_fractions(index, x[:stat_rows], h),
        }
    report["backends"]["reference"] = {
        "gflops": gflops["reference"],
        "ratio": gflops["reference"] / report["matmul_gflops"],
    }
    if "bf16_matmul_gflops" in report:
        for r in report["backends"].values():
            r["ratio_bf16"] = r["gflops"] / report["bf16_matmul_gflops"]
    if "lattice" in fns:
        report["lattice"] = {
            "backend": lattice_key,
            "points": lattice,
            "rank": lat.q.shape[1],
            "points_per_projection": len(lat) / lat.projections,
            "gflops": gflops["lattice"],
            "ratio": gflops["lattice"] / report["matmul_gflops"],
        }
        if "bf16_matmul_gflops" in report:
            report["lattice"]["ratio_bf16"] = gflops["lattice"] / report["bf16_matmul_gflops"]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=20000, help="targets N")
    parser.add_argument("--dim", type=int, default=1024, help="dimension D")
    parser.add_argument("--batch", type=int, default=4096, help="queries B")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated NAME or NAME:DTYPE (NAME of {', '.join(BACKENDS)}; default: all)",
    )
    parser.add_argument(
        "--dtypes",
        default="float32",
        help="storage dtypes of the backends named without one (comma-separated)",
    )
    parser.add_argument(
        "--lattice", type=int, default=64, help="lattice points per subspace (0: skip)"
    )
    parser.add_argument(
        "--lattice-backend",
        default=None,
        help="NAME[:DTYPE] of the index searching the lattice (default: the device's default)",
    )
    parser.add_argument(
        "--stat-rows", type=int, default=4096, help="rows of the re-score fractions"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    report = run(
        args.n,
        args.dim,
        args.batch,
        args.device,
        args.repeat,
        lattice=args.lattice,
        backends=args.backends,
        dtypes=args.dtypes,
        lattice_backend=args.lattice_backend,
        stat_rows=args.stat_rows,
    )
    bf16 = report.get("bf16_matmul_gflops")
    print(
        f"N={args.n} D={args.dim} B={args.batch} on {args.device}: plain fp32 matmul "
        f"{report['matmul_gflops']:.1f} GFLOP/s {report['matmul']}"
        + (f", plain bf16 matmul {bf16:.1f} GFLOP/s" if bf16 else "")
    )
    for name, r in report["backends"].items():
        mark = " (default)" if name == report["default"] else ""
        extra = f"  ÷bf16 {r['ratio_bf16']:.3f}" if bf16 else ""
        if "rescored_rows" in r:
            extra += (
                f"  re-scored {r['rescored_rows']:.3f}  changed {r['winner_changed']:.4f}"
                f"  disagree {r['disagree']:.4f}"
            )
        print(f"  {name:16s} {r['gflops']:10.1f} GFLOP/s  ratio {r['ratio']:.3f}{extra}{mark}")
    for name, why in report["unavailable"].items():
        print(f"  {name:16s} not run: {why}")
    if "lattice" in report:
        r = report["lattice"]
        print(
            f"  lattice          {r['gflops']:10.1f} GFLOP/s  ratio {r['ratio']:.3f} (per "
            f"projection; {r['points_per_projection']:.1f} points each; {r['backend']})"
        )
    if args.json:
        print(json.dumps(report))
    return 0
