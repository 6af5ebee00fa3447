"""``dpmot demo``: prepare → fit → sample → eval on the embedded default, on local Ray and CPU.

The embedded default is the classic hard case for few-step samplers (DESIGN §4b): a 2-D grid
of 25 tight Gaussians (std 0.02, spacing 0.5) whose exact score is known, so every error in
the table is the sampler's own. DPM-OT maps noise to forward-diffused data at step M through
the fitted SDOT map and refines with 10 DDIM steps; the baselines run DDIM and DPM-Solver++
from pure noise with the same exact model and the same number of model evaluations.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import chi2

from dpmot_dist.diffusion.models import GaussianMixture
from dpmot_dist.evaluation.metrics import mahalanobis2, mode_metrics
from dpmot_dist.io.datasets import read_samples
from dpmot_dist.pipelines.fit import FitConfig, run_fit
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare
from dpmot_dist.pipelines.sample import SampleConfig, run_sample
from dpmot_dist.runtime import ensure_ray

log = logging.getLogger(__name__)

STEP = 40  # targets at timestep M (VP linear, T = 1000): noise std s_M ≈ 0.14 < spacing / 3

# How the grid's potential is fitted (``dpmot bench quality`` reuses these for its 2-D grid):
# tight clusters make the score gap under-estimate the needed step (lr_scale), 10 source
# samples per cell per iteration (with fewer, 300 iterations leave the fresh-sample TV ≈ 0.3
# instead of ≈ 0.05), and in D = 2 large search calls amortise their fixed cost (chunk);
# 2^20 fresh samples for the final TV. No snapshot control variate: at 10 samples per cell
# the cells move more than its refresh threshold between most batches, so it would re-take a
# snapshot nearly every other iteration and only add the cost of its top-k (measured on 2
# cores: fit 294 s with it; 205 s without it, on the default Sobol points, fresh-sample TV
# 0.023 against 0.036).
GRID_FIT = {
    "iters": 300,
    "lr_scale": 0.3,
    "samples_per_cell": 10.0,
    "control_variate": "none",
    "chunk": 32768,
    "eval_samples": 1 << 20,
}


def grid_mixture(side: int = 5, spacing: float = 0.5, std: float = 0.02) -> GaussianMixture:
    """side² equal-weight isotropic Gaussians on a square grid centred at 0."""
    axis = (np.arange(side) - (side - 1) / 2) * spacing
    means = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    return GaussianMixture(
        means=means, stds=np.full(len(means), std), weights=np.full(len(means), 1 / len(means))
    )


def sample_points(folder: str) -> np.ndarray:
    """The ``x`` rows of a finished samples data set, (num, D), in sample_id order."""
    _, table = read_samples(folder)
    return np.stack(table.column("x").to_numpy(zero_copy_only=False))


def run_demo(
    out: Path,
    workers: int = 2,
    n_data: int = 2500,
    num: int = 2000,
    iters: int = GRID_FIT["iters"],
    nfe: int = 10,
    seed: int = 0,
) -> list[dict]:
    """The whole pipeline; returns the comparison rows (also written to ``report.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    mixture = grid_mixture()
    gen = torch.Generator().manual_seed(seed)
    np.save(out / "data.npy", mixture.sample(n_data, gen).numpy().astype(np.float32))
    mixture.save(str(out / "gmm.npz"))
    ensure_ray()
    t0 = time.perf_counter()
    run_prepare(
        PrepareConfig(
            data=str(out / "data.npy"),
            out=str(out / "targets"),
            schedule="vp-linear",
            step=STEP,
            seed=seed,
            workers=workers,
            overwrite=True,
        )
    )
    t_prepare = time.perf_counter() - t0
    fit = run_fit(
        FitConfig(
            targets=str(out / "targets"),
            out=str(out / "fit"),
            workers=workers,
            cpus_per_worker=0.5,
            seed=seed,
            overwrite=True,
            **{**GRID_FIT, "iters": iters},
        )
    )
    t_fit = time.perf_counter() - t0 - t_prepare
    model = f"gmm:{out / 'gmm.npz'}"
    noise = {"from_noise": True, "targets": str(out / "targets")}
    runs = [  # (method, sampler, NFE, options); DDIM at 50 NFE is the accuracy yardstick
        (
            "DPM-OT copy",
            "ddim",
            nfe,
            {"targets": str(out / "targets"), "potential": str(out / "fit"), "map": "copy"},
        ),
        ("DDIM", "ddim", nfe, noise),
        ("DPM-Solver++", "dpm-solver++", nfe, noise),
        ("DDIM", "ddim", 50, noise),
    ]
    rows, points = [], {}
    for method, sampler, k, extra in runs:
        name = method.lower().replace(" ", "-").replace("+", "p")
        folder = out / f"samples-{name}-{k}"
        t1 = time.perf_counter()
        run_sample(
            SampleConfig(
                model=model,
                num=num,
                out=str(folder),
                sampler=sampler,
                nfe=k,
                seed=seed,
                workers=0,
                overwrite=True,
                **extra,
            )
        )
        x = points[f"{method} {k} NFE"] = sample_points(str(folder))
        rows.append(
            {
                "method": method,
                "nfe": k,
                **mode_metrics(x, mixture),
                "seconds": time.perf_counter() - t1,
                "samples": str(folder),
            }
        )
    report = {
        "rows": rows,
        "fit": {
            "seconds": t_fit,
            "iterations": fit.iterations,
            "fresh_sample_tv": fit.evaluation.get("tv"),
        },
        "prepare_seconds": t_prepare,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_fit(out / "fit", out / "fit_curve.png")
    plot_samples(
        points,
        mixture,
        out / "samples.png",
    )
    return rows


def plot_fit(fit_dir: Path, png: Path) -> None:
    """Energy and TV (training batch) against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = [json.loads(line) for line in (fit_dir / "metrics.jsonl").read_text().splitlines()]
    it = [r["iter"] for r in m]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(it, [r["energy"] for r in m])
    a.set(xlabel="iteration", ylabel="energy", title="SDOT energy")
    b.semilogy(it, [r["tv"] for r in m])
    b.set(xlabel="iteration", ylabel="TV (batch)", title="cell-mass TV")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_samples(samples: dict[str, np.ndarray], mixture: GaussianMixture, png: Path) -> None:
    """Samples of each method coloured by nearest mode; mixed samples in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(3.6 * len(samples), 3.8))
    for ax, (name, x) in zip(np.atleast_1d(axes), samples.items(), strict=True):
        d2 = mahalanobis2(x, mixture.means, mixture.stds)
        mixed = ~(d2 <= chi2.ppf(0.999, 2)).any(1)
        ax.scatter(*x[~mixed].T, s=2, c=d2.argmin(1)[~mixed], cmap="tab20")
        ax.scatter(*x[mixed].T, s=2, c="black")
        ax.set(title=f"{name}: {mixed.mean():.1%} mixed", xlim=(-1.4, 1.4), ylim=(-1.4, 1.4))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    """A markdown table of the comparison rows."""
    lines = [
        "| method | NFE | mode mixture | mode-weight error | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['nfe']} | {r['mode_mixture']:.1%} | "
        f"{r['mode_weight_err']:.3f} | {r['seconds']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output folder (default: a new ./dpmot-demo-<time>)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    parser.add_argument("--iters", type=int, default=GRID_FIT["iters"], help="fit iterations")
    parser.add_argument("--num", type=int, default=2000, help="samples per method")
    parser.add_argument("--seed", type=int, default=0)


def cli_main(args: argparse.Namespace) -> int:
    out = Path(args.out or f"dpmot-demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    t0 = time.perf_counter()
    rows = run_demo(out, workers=args.workers, num=args.num, iters=args.iters, seed=args.seed)
    print(
        f"\nDPM-OT demo: 2-D grid of 25 Gaussians (std 0.02, spacing 0.5), exact score, "
        f"{args.num} samples per method\n"
    )
    print(format_table(rows))
    print(f"\nfinished in {time.perf_counter() - t0:.0f} s; everything is in {out}:")
    for name in ("targets", "fit", "fit_curve.png", "samples.png", "report.json"):
        print(f"  {out / name}")
    return 0
