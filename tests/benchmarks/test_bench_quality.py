"""``dpmot bench quality --quick`` on one problem: the JSON line, the table and the plot."""

from __future__ import annotations

import json

import numpy as np

from dpmot_dist.benchmarks import quality
from dpmot_dist.cli import main

KEYS = {"method", "nfe", "mode_mixture", "mode_weight_err", "distance", "memorisation", "seconds"}


def test_quick_grid_json_shape(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "quality", "--quick", "--json", "--problems", "grid2d", "--num", "100"]
    assert main([*argv, "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    [problem] = report["problems"]
    assert problem["name"] == "grid2d"
    methods = [(r["method"], r["nfe"]) for r in problem["rows"]]
    assert methods == [
        ("DDPM", 1000),
        ("DDIM", 10),
        ("DPM-Solver++", 10),
        ("DPM-OT copy", 10),
        ("DPM-OT interp", 10),
    ]
    for r in problem["rows"]:
        assert set(r) == KEYS
        assert 0 <= r["mode_mixture"] <= 1 and 0 <= r["memorisation"] <= 1
        assert np.isfinite(r["distance"]) and r["seconds"] > 0
    assert (out / "quality.md").read_text().count("| DDIM | 10 |") == 1
    assert (out / "quality_grid2d.png").stat().st_size > 0


def test_balanced_draws_have_exact_mode_counts():
    mix = quality.axis_mixture(0.01, modes=10, dim=64)
    x = quality.balanced_draws(mix, 7, seed=0)
    nearest = ((x[:, None] - mix.means[None]) ** 2).sum(-1).argmin(1)
    assert np.bincount(nearest, minlength=10).tolist() == [7] * 10


def test_scripted_denoiser_runs_through_the_torchscript_contract(tmp_path):
    import torch

    from dpmot_dist.diffusion.models import load_model
    from dpmot_dist.diffusion.schedules import Schedule

    mix = quality.axis_mixture(0.05, modes=3, dim=8)
    net = quality.train_denoiser(quality.balanced_draws(mix, 4, 0), steps=2, seed=0)
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    model = load_model(f"torchscript:{path}", Schedule(kind="vp-linear"))
    eps = model.eps(torch.zeros(5, 8), torch.full((5,), 10))
    assert eps.shape == (5, 8) and torch.isfinite(eps).all()


def test_thread_count_sets_and_restores_threads():
    import torch

    before = torch.get_num_threads()
    with quality.thread_count(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with quality.thread_count(0):  # 0 leaves the library default
        assert torch.get_num_threads() == before


def test_grid_fit_uses_the_demo_settings():
    from dpmot_dist.demo import GRID_FIT

    sizes = quality.Sizes()
    assert (sizes.iters_grid, sizes.eval_grid) == (GRID_FIT["iters"], GRID_FIT["eval_samples"])
    assert GRID_FIT["lr_scale"] >= 0.3 and GRID_FIT["chunk"] >= 32768
    assert GRID_FIT["samples_per_cell"] >= 10
