"""``dpmot bench quality``: mode mixture and sample quality of DPM-OT vs DDPM/DDIM/DPM-Solver++.

The paper's claim measured where it can show (DESIGN §4b): problems on which few-step
samplers do mix modes.

(a) ``grid2d``: the 2-D grid of 25 Gaussians (std 0.02, spacing 0.5), exact score; its
    potential is fitted with ``dpmot demo``'s settings (:data:`dpmot_dist.demo.GRID_FIT`).
(b) ``mixture64``: 10 Gaussians at the unit vectors e_1..e_10 of R^64, their common std
    (the *width*) searched down from 0.1 until DDIM at 10 NFE puts > 10% of its samples
    outside every 99.9% ball; exact score.
(c) ``mixture64-learned``: (b) seen through a small MLP denoiser (:class:`EpsMLP`) trained on
    (b)'s training set for a fixed number of steps, saved with ``torch.jit.script`` and loaded
    back through ``torchscript:FILE``: model error between modes is in play, as in the
    paper's setting. (b) and (c) share the training set, hence the targets and the fitted
    potential (the fit never sees the model): (c) reuses (b)'s fit when both run.

Each problem draws a class-balanced training set (equal counts per mode, like CIFAR-10), so
the data's own mode histogram is exact. DPM-OT's mode-weight error then comes from the fit's
per-mode mass error, from targets whose step-M noise carries them into a neighbouring mode
during refinement (on the grid at M = 40 this alone is ≈ 0.02 with 80 points per mode), and
from the multinomial noise of the samples. DPM-OT runs the real pipeline in process:
``run_prepare`` (targets at step M) → ``run_fit`` (timed; its fresh-sample TV reported) →
``run_sample`` with the ``copy`` and ``interp`` maps and M-step DDIM refinement at 5, 10, 20
NFE. Baselines run ``run_sample --from-noise``: DDPM 1000 steps, DDIM 10/20/50, DPM-Solver++
10/20. Columns: mode mixture, mode-weight error
(:func:`dpmot_dist.evaluation.metrics.mode_metrics`),
sliced W2 to fresh draws, memorisation against the training set (reference: fresh draws), and
the sampling wall time (the fit's time is reported once per problem). The run uses
``--threads`` (default 1) torch and faiss threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpmot_dist.demo import GRID_FIT, grid_mixture
from dpmot_dist.diffusion.models import GaussianMixture, GMMDenoiser
from dpmot_dist.diffusion.samplers import SamplerSpec, diffusers_scheduler, prior_scale, refine
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.evaluation import metrics
from dpmot_dist.io import datasets
from dpmot_dist.io.datasets import read_samples
from dpmot_dist.pipelines.fit import FitConfig, run_fit
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare
from dpmot_dist.pipelines.sample import SampleConfig, run_sample

log = logging.getLogger(__name__)

STEP = 40  # targets at step M of the VP linear schedule (T = 1000): s_M ≈ 0.14
WIDTHS = (0.1, 0.07, 0.05, 0.035, 0.025, 0.018, 0.012, 0.008)
METRICS = ("mode_mixture", "mode_weight_err", "distance", "memorisation")


@dataclass(frozen=True)
class Sizes:
    """How big a run is (``--quick`` shrinks everything)."""

    num: int = 1000  # samples per row, problems (b), (c)
    num_grid: int = 4000  # samples per row, problem (a): cheap in 2-D, and its mode-weight
    # errors are ~0.02 apart, below the ±0.06 multinomial noise of 1000 draws over 25 modes
    per_mode_grid: int = 80  # training points per mode, problem (a)
    per_mode_high: int = 100  # training points per mode, problems (b), (c)
    iters_grid: int = GRID_FIT["iters"]  # (a) is fitted as ``dpmot demo`` fits it
    eval_grid: int = GRID_FIT["eval_samples"]
    iters_high: int = 200
    eval_samples: int = 1 << 19  # (b), (c)
    search_samples: int = 1000  # per width tried in (b)'s search
    mode_tv_samples: int = 1 << 18  # fresh draws for the fit's per-mode mass error
    train_steps: int = 3000  # MLP steps for (c)
    ddim_nfe: tuple[int, ...] = (10, 20, 50)
    solver_nfe: tuple[int, ...] = (10, 20)
    ot_nfe: tuple[int, ...] = (5, 10, 20)


QUICK = Sizes(
    num=200,
    num_grid=200,
    per_mode_grid=16,
    per_mode_high=20,
    iters_grid=30,
    eval_grid=1 << 15,
    iters_high=30,
    eval_samples=1 << 15,
    search_samples=200,
    mode_tv_samples=1 << 13,
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
    """ε̂(x_t, t) of an MLP x̂_0 network with the preconditioning of Karras et al. (2022).

    With σ = s_t/a_t and x̃ = x_t/a_t = x_0 + σ ε, the network F (SiLU residual blocks on
    [c_in x̃, sinusoidal embedding of log σ]) gives x̂_0 = c_skip x̃ + c_out F, and the module
    returns ε̂ = (x̃ − x̂_0)/σ, so that the ``torchscript:`` ε contract holds and a sampler's
    x̂_0 is the network's own. F's regression target has unit variance at every noise level,
    which lets a small MLP trained for a few thousand steps denoise a tight mixture at all.
    """

    def __init__(
        self,
        dim: int,
        alphas_cumprod: np.ndarray,
        sigma_data: float,
        width: int = 256,
        depth: int = 3,
        freqs: int = 16,
    ) -> None:
        super().__init__()
        ab = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)
        self.register_buffer("a", ab.sqrt().float())
        self.register_buffer("sigma", ((1 - ab) / ab).sqrt().float())
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), freqs)))
        self.sigma_data = float(sigma_data)
        self.inp = nn.Linear(dim + 2 * freqs, width)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth)]
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def precondition(
        self, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ, c_in, c_skip, c_out), each (B, 1), at integer timesteps t."""
        sigma = self.sigma[t][:, None]
        sd2 = self.sigma_data * self.sigma_data
        norm = torch.rsqrt(sigma * sigma + sd2)
        return sigma, norm, sd2 * norm * norm, sigma * self.sigma_data * norm

    def net(self, x_tilde: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """F(c_in x̃, log σ)."""
        sigma, c_in, _, _ = self.precondition(t)
        arg = torch.log(sigma) * self.freqs[None]
        h = self.inp(torch.cat([c_in * x_tilde, torch.sin(arg), torch.cos(arg)], dim=1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma, _, c_skip, c_out = self.precondition(t)
        x_tilde = x / self.a[t][:, None]
        x0 = c_skip * x_tilde + c_out * self.net(x_tilde, t)
        return (x_tilde - x0) / sigma


def train_denoiser(data: np.ndarray, steps: int, seed: int, batch: int = 256) -> EpsMLP:
    """Fit :class:`EpsMLP` to ``data`` under the VP linear schedule (Adam, cosine decay).

    Each step draws a batch of data points, noise levels log σ ~ N(−1.2, 1.2²) (Karras et al.
    2022) rounded to the nearest schedule step, and regresses F on its unit-variance target
    (x_0 − c_skip x̃)/c_out: the x̂_0 loss weighted by 1/c_out².
    """
    torch.manual_seed(seed)
    schedule = Schedule(kind="vp-linear")
    x0 = torch.from_numpy(np.asarray(data, np.float32))
    sigma_data = float(x0.var(0).mean().sqrt())
    net = EpsMLP(x0.shape[1], schedule.alphas_cumprod, sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(steps):
        i = torch.randint(len(x0), (batch,), generator=gen)
        log_sigma = -1.2 + 1.2 * torch.randn(batch, generator=gen)
        t = torch.searchsorted(net.sigma, log_sigma.exp()).clamp(0, len(net.sigma) - 1)
        _, _, c_skip, c_out = net.precondition(t)
        x_tilde = x0[i] + net.sigma[t][:, None] * torch.randn(batch, x0.shape[1], generator=gen)
        loss = (net.net(x_tilde, t) - (x0[i] - c_skip * x_tilde) / c_out).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    log.info("denoiser trained: %d steps, last loss %.4f", steps, loss.item())
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Running one problem


def sample_rows(
    problem: Problem,
    work: Path,
    fit_work: Path,
    data: np.ndarray,
    num: int,
    seed: int,
    fit_info: dict,
    sizes: Sizes,
) -> list[dict]:
    """Every method's row of the table for ``problem``, written under ``work``.

    The targets and fitted potential are those in ``fit_work``.
    """
    gen = torch.Generator().manual_seed(seed + 7)
    fresh = problem.mixture.sample(num, gen).numpy()
    fresh_mem = problem.mixture.sample(max(num, 2000), gen).numpy()
    reference = metrics.nearest_distances(fresh_mem, data)
    threshold = float(np.quantile(reference, 0.01))
    targets, fit = str(fit_work / "targets"), str(fit_work / "fit")
    runs = [("DDPM", "ddpm", None, {"from_noise": True})]
    runs += [("DDIM", "ddim", k, {"from_noise": True}) for k in sizes.ddim_nfe]
    runs += [("DPM-Solver++", "dpm-solver++", k, {"from_noise": True}) for k in sizes.solver_nfe]
    for m in ("copy", "interp"):
        runs += [(f"DPM-OT {m}", "ddim", k, {"potential": fit, "map": m}) for k in sizes.ot_nfe]
    diffusers_scheduler("ddim", Schedule(kind="vp-linear"), 10)  # imports diffusers untimed
    rows = []
    for method, sampler, nfe, extra in runs:
        name = method.lower().replace(" ", "-").replace("+", "p")
        folder = work / f"samples-{name}-{nfe}"
        t0 = time.perf_counter()
        summary = run_sample(
            SampleConfig(
                model=problem.model,
                num=num,
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


def run_problem(
    problem: Problem,
    work: Path,
    sizes: Sizes,
    seed: int,
    *,
    per_mode: int,
    num: int,
    fit_options: dict,
    shared: tuple[Path, dict] | None = None,
) -> dict:
    """Data → targets → fit → every row; returns the problem's JSON entry.

    ``shared`` (folder, fit info) of a problem run on the same training set: its targets and
    fitted potential are used as they are (the fit depends on the data only, not the model).
    """
    work.mkdir(parents=True, exist_ok=True)
    data = balanced_draws(problem.mixture, per_mode, seed)
    np.save(work / "data.npy", data)
    if not problem.model:
        problem.mixture.save(str(work / "gmm.npz"))
        problem.model = f"gmm:{work / 'gmm.npz'}"
    if shared is not None and np.array_equal(np.load(shared[0] / "data.npy"), data):
        fit_work, fit_info = shared[0], {**shared[1], "shared_with": shared[0].name}
    else:
        fit_work, fit_info = work, prepare_and_fit(work, seed, fit_options)
        fit_info["mode_tv"] = fit_mode_tv(fit_work, problem.mixture, data, sizes.mode_tv_samples)
    rows = sample_rows(problem, work, fit_work, data, num, seed, fit_info, sizes)
    return {
        "name": problem.name,
        "model": problem.model,
        "dim": problem.mixture.dim,
        "modes": len(problem.mixture.weights),
        "train_points": len(data),
        "num": num,
        "step": STEP,
        "fit": fit_info,
        **problem.notes,
        "rows": rows,
    }


def fit_mode_tv(fit_work: Path, mixture: GaussianMixture, data: np.ndarray, samples: int) -> float:
    """TV between the mixture weights and the fitted cell masses summed per mode.

    Cell masses are counted over ``samples`` fresh N(0, I) draws (the fit's source); target
    i belongs to the mode of data point i (prepare keeps the row order). This is the part of
    DPM-OT's mode-weight error that the fit is responsible for.
    """
    from dpmot_dist.ot.search import TargetIndex

    y = datasets.load_targets(str(fit_work / "targets"))
    h = torch.from_numpy(np.load(fit_work / "fit" / "h.npy").astype(np.float64))
    index = TargetIndex(y)
    gen = torch.Generator().manual_seed(12345)
    counts = np.zeros(len(y))
    for start in range(0, samples, 1 << 15):
        x = torch.randn(min(1 << 15, samples - start), y.shape[1], generator=gen)
        _, i = index.search(x, h, 1)
        counts += np.bincount(np.asarray(i)[:, 0], minlength=len(y))
    mode = metrics.mahalanobis2(data, mixture.means, mixture.stds).argmin(1)
    mass = np.bincount(mode, weights=counts / max(counts.sum(), 1), minlength=len(mixture.weights))
    return 0.5 * float(np.abs(mass - mixture.weights).sum())


def prepare_and_fit(work: Path, seed: int, fit_options: dict) -> dict:
    """Targets at step M and the fitted h, in process; the fit's time and fresh-sample TV.

    ``fit_options``: :class:`~dpmot_dist.pipelines.fit.FitConfig` fields (iters, eval_samples, ...).
    """
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
            workers=0,
            seed=seed,
            overwrite=True,
            **fit_options,
        )
    )
    ev = result.evaluation if result is not None else {}
    return {
        "seconds": time.perf_counter() - t1,
        "prepare_seconds": t1 - t0,
        "iterations": result.iterations if result is not None else None,
        "fresh_sample_tv": ev.get("tv"),
        "tv_noise_floor": ev.get("tv_noise_floor"),
        "options": dict(fit_options),
    }


def run_benchmark(out: Path, sizes: Sizes, problems: list[str], seed: int = 0) -> dict:
    """The selected problems, in order; the whole report (also written as JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"problems": []}
    high, shared = None, None
    for name in problems:
        t0 = time.perf_counter()
        if name == "grid2d":
            grid_fit = {**GRID_FIT, "iters": sizes.iters_grid, "eval_samples": sizes.eval_grid}
            entry = run_problem(
                grid_problem(),
                out / name,
                sizes,
                seed,
                per_mode=sizes.per_mode_grid,
                num=sizes.num_grid,
                fit_options=grid_fit,
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
                problem,
                out / name,
                sizes,
                seed,
                per_mode=sizes.per_mode_high,
                num=sizes.num,
                fit_options={"iters": sizes.iters_high, "eval_samples": sizes.eval_samples},
                shared=shared,
            )
            if shared is None:  # (b) and (c) share the training set, hence targets and fit
                shared = (out / name, entry["fit"])
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
    with warnings.catch_warnings():  # torch ≥ 2.9 deprecates TorchScript; it is the contract
        warnings.simplefilter("ignore", DeprecationWarning)
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
        shared = f" (shared with {fit['shared_with']})" if "shared_with" in fit else ""
        info = (
            f"{p['num']} samples per row; training points {p['train_points']} (balanced), "
            f"targets at step {p['step']}; fit{shared} {fit['seconds']:.1f} s, "
            f"{fit['iterations']} iterations, fresh-sample TV {_num(fit['fresh_sample_tv'])} "
            f"(noise floor {_num(fit['tv_noise_floor'])}), per-mode mass TV "
            f"{_num(fit.get('mode_tv'))}"
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
    parser.add_argument("--num", type=int, help="samples per row (every problem)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and faiss threads for the run (default 1: robust on a shared machine, "
        "where spinning OpenMP threads can slow small kernels many-fold; 0: library default)",
    )


@contextmanager
def thread_count(n: int) -> Iterator[None]:
    """torch's and faiss's (OpenMP) intra-op threads set to ``n`` for the block (0: as is)."""
    if n <= 0:
        yield
        return
    try:
        import faiss
    except ImportError:
        faiss = None
    before = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        if faiss:
            faiss.omp_set_num_threads(before[1])


def cli_main(args: argparse.Namespace) -> int:
    from dpmot_dist.errors import DpmotError

    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    unknown = sorted(set(problems) - set(PROBLEMS))
    if unknown or not problems:
        raise DpmotError(f"--problems: unknown {unknown or 'none given'}; choose from {PROBLEMS}")
    sizes = QUICK if args.quick else Sizes()
    if args.num:
        sizes = replace(sizes, num=args.num, num_grid=args.num)
    out = Path(args.out or f"dpmot-bench-quality-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    t0 = time.perf_counter()
    with thread_count(args.threads):
        report = run_benchmark(out, sizes, problems, args.seed)
    report["seconds"] = time.perf_counter() - t0
    report["threads"] = args.threads
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nfinished in {report['seconds']:.0f} s; tables, plots and JSON in {out}")
    if args.json:
        print(json_line(report))
    return 0
