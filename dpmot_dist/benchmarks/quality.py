"""``dpmot bench quality``: mode mixture and sample quality of DPM-OT vs DDPM/DDIM/DPM-Solver++.

The paper's claim measured where it can show (DESIGN §4b): problems on which few-step
samplers do mix modes.

(a) ``grid2d``: the 2-D grid of 25 Gaussians (std 0.02, spacing 0.5), exact score.
(b) ``mixture64``: 10 Gaussians at the unit vectors e_1..e_10 of R^64, their common std
    (the *width*) searched down from 0.1 until DDIM at 10 NFE puts > 10% of its samples
    outside every 99.9% ball; exact score.
(c) ``mixture64-learned``: (b) seen through a small MLP ε-predictor trained on (b)'s training
    set for a fixed number of steps, saved with ``torch.jit.script`` and loaded back through
    ``torchscript:FILE``: model error between modes is in play, as in the paper's setting.

Each problem draws a class-balanced training set (equal counts per mode, like CIFAR-10), so
the targets' own mode histogram is exact and DPM-OT's mode-weight error measures the fit.
DPM-OT runs the real pipeline in process: ``run_prepare`` (targets at step M) → ``run_fit``
(timed; its fresh-sample TV reported) → ``run_sample`` with the ``copy`` and ``interp`` maps
and M-step DDIM refinement at 5, 10, 20 NFE. Baselines run ``run_sample --from-noise``:
DDPM 1000 steps, DDIM 10/20/50, DPM-Solver++ 10/20. Columns: mode mixture, mode-weight error
(:func:`dpmot_dist.metrics.mode_metrics`), sliced W2 to fresh draws, memorisation against the
training set (reference: fresh draws), and the sampling wall time (the fit's time is
reported once per problem).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpmot_dist import metrics
from dpmot_dist.fit import FitConfig, run_fit
from dpmot_dist.models import GaussianMixture, GMMDenoiser
from dpmot_dist.prepare import PrepareConfig, run_prepare
from dpmot_dist.sample import SampleConfig, read_samples, run_sample
from dpmot_dist.samplers import SamplerSpec, prior_scale, refine
from dpmot_dist.schedules import Schedule

log = logging.getLogger(__name__)

STEP = 40  # targets at step M of the VP linear schedule (T = 1000): s_M ≈ 0.14
WIDTHS = (0.1, 0.07, 0.05, 0.035, 0.025, 0.018, 0.012, 0.008)
METRICS = ("mode_mixture", "mode_weight_err", "distance", "memorisation")


@dataclass(frozen=True)
class Sizes:
    """How big a run is (``--quick`` shrinks everything)."""

    num: int = 1000  # samples per row
    per_mode_grid: int = 80  # training points per mode, problem (a)
    per_mode_high: int = 100  # training points per mode, problems (b), (c)
    iters_grid: int = 300
    iters_high: int = 200
    eval_samples: int = 1 << 19
    search_samples: int = 1000  # per width tried in (b)'s search
    train_steps: int = 3000  # MLP steps for (c)
    ddim_nfe: tuple[int, ...] = (10, 20, 50)
    solver_nfe: tuple[int, ...] = (10, 20)
    ot_nfe: tuple[int, ...] = (5, 10, 20)


QUICK = Sizes(
    num=200,
    per_mode_grid=16,
    per_mode_high=20,
    iters_grid=30,
    iters_high=30,
    eval_samples=1 << 15,
    search_samples=200,
    train_steps=50,
    ddim_nfe=(10,),
    solver_nfe=(10,),
    ot_nfe=(10,),
)


@dataclass
class Problem:
    name: str
    mixture: GaussianMixture
    model: str = ""  # the model spec; filled in when written
    notes: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Problems


def grid_problem() -> Problem:
    from dpmot_dist.demo import grid_mixture

    return Problem("grid2d", grid_mixture(), notes={"std": 0.02, "spacing": 0.5})


def axis_mixture(std: float, modes: int = 10, dim: int = 64) -> GaussianMixture:
    """``modes`` equal-weight N(e_c, std² I) in R^dim (means the first unit vectors)."""
    means = np.zeros((modes, dim))
    means[np.arange(modes), np.arange(modes)] = 1.0
    return GaussianMixture(means, np.full(modes, std), np.full(modes, 1 / modes))


def ddim10_mixture(mixture: GaussianMixture, n: int, seed: int = 0) -> float:
    """Mode mixture of DDIM at 10 NFE from noise with the exact score (n samples)."""
    schedule = Schedule(kind="vp-linear")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, mixture.dim, generator=gen) * prior_scale(schedule)
    spec = SamplerSpec(name="ddim", nfe=10)
    y, _ = refine(spec, GMMDenoiser(mixture, schedule), x, 999, lambda: None, from_noise=True)
    return metrics.mode_metrics(y.numpy(), mixture)["mode_mixture"]


def search_width(n: int, target: float = 0.10) -> tuple[float, list[dict]]:
    """The widest std of :data:`WIDTHS` at which DDIM-10 mixes more than ``target``."""
    tried = []
    for std in WIDTHS:
        rate = ddim10_mixture(axis_mixture(std), n)
        tried.append({"std": std, "ddim10_mode_mixture": rate})
        log.info("width search: std %.3g → DDIM-10 mode mixture %.1f%%", std, 100 * rate)
        if rate > target:
            return std, tried
    return WIDTHS[-1], tried


def balanced_draws(mixture: GaussianMixture, per_mode: int, seed: int) -> np.ndarray:
    """``per_mode`` draws of every component (shuffled): an exactly balanced training set."""
    gen = torch.Generator().manual_seed(seed)
    c = np.repeat(np.arange(len(mixture.weights)), per_mode)
    z = torch.randn(len(c), mixture.dim, generator=gen, dtype=torch.float64).numpy()
    x = mixture.means[c] + mixture.stds[c, None] * z
    return x[np.random.default_rng(seed).permutation(len(x))].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The learned model of (c)


class EpsMLP(nn.Module):
    """ε̂(x_t, t): an MLP on [x_t, sinusoidal embedding of t / T] (SiLU, residual blocks)."""

    def __init__(self, dim: int, width: int = 256, depth: int = 3, freqs: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), freqs)))
        self.inp = nn.Linear(dim + 2 * freqs, width)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth)]
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        arg = (t.to(x.dtype) / 1000.0)[:, None] * self.freqs[None]
        h = self.inp(torch.cat([x, torch.sin(arg), torch.cos(arg)], dim=1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def train_denoiser(data: np.ndarray, steps: int, seed: int, batch: int = 256) -> EpsMLP:
    """ε-prediction (Ho et al. 2020, L_simple) on ``data`` under the VP linear schedule."""
    torch.manual_seed(seed)
    schedule = Schedule(kind="vp-linear")
    ab = torch.tensor(np.asarray(schedule.alphas_cumprod), dtype=torch.float32)
    x0 = torch.from_numpy(data)
    net = EpsMLP(data.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(x0), (batch,), generator=gen)
        t = torch.randint(len(ab), (batch,), generator=gen)
        eps = torch.randn(batch, x0.shape[1], generator=gen)
        a = ab[t, None]
        loss = (net(a.sqrt() * x0[i] + (1 - a).sqrt() * eps, t) - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    log.info("denoiser trained: %d steps, last loss %.4f", steps, loss.item())
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Running one problem


def sample_rows(
    problem: Problem, work: Path, data: np.ndarray, sizes: Sizes, seed: int, fit_info: dict
) -> list[dict]:
    """Every method's row of the table for ``problem``."""
    gen = torch.Generator().manual_seed(seed + 7)
    fresh = problem.mixture.sample(sizes.num, gen).numpy()
    fresh_mem = problem.mixture.sample(max(sizes.num, 2000), gen).numpy()
    reference = metrics.nearest_distances(fresh_mem, data)
    threshold = float(np.quantile(reference, 0.01))
    targets, fit = str(work / "targets"), str(work / "fit")
    runs = [("DDPM", "ddpm", None, {"from_noise": True})]
    runs += [("DDIM", "ddim", k, {"from_noise": True}) for k in sizes.ddim_nfe]
    runs += [("DPM-Solver++", "dpm-solver++", k, {"from_noise": True}) for k in sizes.solver_nfe]
    for m in ("copy", "interp"):
        runs += [(f"DPM-OT {m}", "ddim", k, {"potential": fit, "map": m}) for k in sizes.ot_nfe]
    rows = []
    for method, sampler, nfe, extra in runs:
        folder = work / f"samples-{method.lower().replace(' ', '-').replace('+', 'p')}-{nfe}"
        t0 = time.perf_counter()
        summary = run_sample(
            SampleConfig(
                model=problem.model,
                num=sizes.num,
                out=str(folder),
                sampler=sampler,
                nfe=nfe,
                targets=targets,
                seed=seed,
                workers=0,
                overwrite=True,
                **extra,
            )
        )
        seconds = time.perf_counter() - t0
        _, table = read_samples(str(folder))
        x = table.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        x = x.reshape(len(table), -1)
        d = metrics.nearest_distances(x, data)
        row = {
            "method": method,
            "nfe": int(summary["nfe"]),
            **metrics.mode_metrics(x, problem.mixture),
            "distance": metrics.sliced_w2(x, fresh, seed=seed),
            "memorisation": float((d < threshold).mean()),
            "seconds": seconds,
        }
        if method.startswith("DPM-OT"):
            row["fit_seconds"] = fit_info["seconds"]
        rows.append(row)
        log.info("%s %s: %s", problem.name, method, row)
    return rows


def run_problem(problem: Problem, work: Path, per_mode: int, iters: int, sizes: Sizes, seed: int):
    """Data → targets → fit → every row; returns the problem's JSON entry."""
    work.mkdir(parents=True, exist_ok=True)
    data = balanced_draws(problem.mixture, per_mode, seed)
    np.save(work / "data.npy", data)
    if not problem.model:
        problem.mixture.save(str(work / "gmm.npz"))
        problem.model = f"gmm:{work / 'gmm.npz'}"
    fit_info = prepare_and_fit(work, iters, sizes, seed)
    rows = sample_rows(problem, work, data, sizes, seed, fit_info)
    return {
        "name": problem.name,
        "model": problem.model,
        "dim": problem.mixture.dim,
        "modes": len(problem.mixture.weights),
        "train_points": len(data),
        "step": STEP,
        "fit": fit_info,
        **problem.notes,
        "rows": rows,
    }


def prepare_and_fit(work: Path, iters: int, sizes: Sizes, seed: int) -> dict:
    """Targets at step M and the fitted h, in process; the fit's time and fresh-sample TV."""
    t0 = time.perf_counter()
    run_prepare(
        PrepareConfig(
            data=str(work / "data.npy"),
            out=str(work / "targets"),
            schedule="vp-linear",
            step=STEP,
            seed=seed,
            workers=0,
            overwrite=True,
        )
    )
    t1 = time.perf_counter()
    result = run_fit(
        FitConfig(
            targets=str(work / "targets"),
            out=str(work / "fit"),
            iters=iters,
            workers=0,
            seed=seed,
            overwrite=True,
            eval_samples=sizes.eval_samples,
        )
    )
    ev = result.evaluation if result is not None else {}
    return {
        "seconds": time.perf_counter() - t1,
        "prepare_seconds": t1 - t0,
        "iterations": result.iterations if result is not None else None,
        "fresh_sample_tv": ev.get("tv"),
        "tv_noise_floor": ev.get("tv_noise_floor"),
    }


def run_benchmark(out: Path, sizes: Sizes, problems: list[str], seed: int = 0) -> dict:
    """The selected problems, in order; the whole report (also written as JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"problems": []}
    high = None
    for name in problems:
        t0 = time.perf_counter()
        if name == "grid2d":
            entry = run_problem(
                grid_problem(), out / name, sizes.per_mode_grid, sizes.iters_grid, sizes, seed
            )
        else:
            if high is None:
                std, tried = search_width(sizes.search_samples)
                high = {"std": std, "width_search": tried, "radius": 1.0}
            problem = Problem(name, axis_mixture(high["std"]), notes=dict(high))
            if name == "mixture64-learned":
                problem.model, problem.notes["train"] = learned_model(
                    problem.mixture, out / name, sizes, seed
                )
            entry = run_problem(
                problem, out / name, sizes.per_mode_high, sizes.iters_high, sizes, seed
            )
        entry["seconds"] = time.perf_counter() - t0
        report["problems"].append(entry)
        (out / "quality.json").write_text(json.dumps(report, indent=2))
        plot_problem(entry, out / f"quality_{name}.png")
    (out / "quality.md").write_text(format_report(report) + "\n")
    return report


def learned_model(mixture: GaussianMixture, work: Path, sizes: Sizes, seed: int):
    """Train the MLP on the problem's training set, script and save it: (spec, info)."""
    work.mkdir(parents=True, exist_ok=True)
    data = balanced_draws(mixture, sizes.per_mode_high, seed)  # the same set run_problem uses
    t0 = time.perf_counter()
    net = train_denoiser(data, sizes.train_steps, seed)
    seconds = time.perf_counter() - t0
    path = work / "denoiser.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return f"torchscript:{path}", {"steps": sizes.train_steps, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Output


def format_report(report: dict) -> str:
    """One markdown table per problem."""
    parts = []
    for p in report["problems"]:
        fit = p["fit"]
        head = f"### {p['name']} (D={p['dim']}, {p['modes']} modes, {p['model'].split(':')[0]})"
        info = (
            f"training points {p['train_points']}, targets at step {p['step']}; fit "
            f"{fit['seconds']:.1f} s, {fit['iterations']} iterations, fresh-sample TV "
            f"{_num(fit['fresh_sample_tv'])} (noise floor {_num(fit['tv_noise_floor'])})"
        )
        if "radius" in p:
            info += f"; width (std) {p['std']:g} at radius 1"
        if "train" in p:
            info += f"; MLP {p['train']['steps']} steps in {p['train']['seconds']:.0f} s"
        lines = [
            head,
            "",
            info,
            "",
            "| method | NFE | mode mixture | mode-weight err | sliced W2 | memorisation | s |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['nfe']} | {r['mode_mixture']:.1%} | "
            f"{r['mode_weight_err']:.3f} | {r['distance']:.4f} | {r['memorisation']:.1%} | "
            f"{r['seconds']:.1f} |"
            for r in p["rows"]
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def plot_problem(entry: dict, png: Path) -> None:
    """Each metric against NFE, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.5))
    methods = list(dict.fromkeys(r["method"] for r in entry["rows"]))
    for ax, key in zip(axes, METRICS, strict=True):
        for m in methods:
            rows = [r for r in entry["rows"] if r["method"] == m]
            nfe, val = [r["nfe"] for r in rows], [r[key] for r in rows]
            ax.plot(nfe, val, marker="o", label=m)
        ax.set(xscale="log", xlabel="NFE", title=key.replace("_", " "))
    axes[0].legend(fontsize=7)
    fig.suptitle(entry["name"])
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def json_line(report: dict) -> str:
    """The ``--json`` last line: problems → rows with the table's columns."""
    keys = ("method", "nfe", *METRICS, "seconds")
    return json.dumps(
        {
            "problems": [
                {"name": p["name"], "rows": [{k: r[k] for k in keys} for r in p["rows"]]}
                for p in report["problems"]
            ]
        }
    )


PROBLEMS = ("grid2d", "mixture64", "mixture64-learned")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", help="output folder (default: ./dpmot-bench-quality-<time>)")
    parser.add_argument(
        "--problems", default=",".join(PROBLEMS), help=f"comma-separated subset of {PROBLEMS}"
    )
    parser.add_argument("--num", type=int, help="samples per row")
    parser.add_argument("--seed", type=int, default=0)


def cli_main(args: argparse.Namespace) -> int:
    from dpmot_dist.errors import DpmotError

    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    unknown = sorted(set(problems) - set(PROBLEMS))
    if unknown or not problems:
        raise DpmotError(f"--problems: unknown {unknown or 'none given'}; choose from {PROBLEMS}")
    sizes = QUICK if args.quick else Sizes()
    if args.num:
        sizes = Sizes(**{**sizes.__dict__, "num": args.num})
    out = Path(args.out or f"dpmot-bench-quality-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    report = run_benchmark(out, sizes, problems, args.seed)
    print(format_report(report))
    print(f"\ntables, plots and JSON in {out}")
    if args.json:
        print(json_line(report))
    return 0
