"""Samplers over the exact mixture: any error measured here is the sampler's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmot_dist.diffusion.models import GaussianMixture, GMMDenoiser
from dpmot_dist.diffusion.samplers import (
    BLOCK,
    STREAM_PRIOR,
    RowNoise,
    SamplerSpec,
    annealed_langevin,
    ddim,
    ddpm,
    diffusers_scheduler,
    prior_points,
    prior_scale,
    refine,
    scheduler_sample,
    spaced_timesteps,
    uniforms,
)
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError
from dpmot_dist.ot.sources import Source

pytest.importorskip("diffusers")

SCHEDULES = {"vp": Schedule(), "ve": Schedule(kind="ve")}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixture() -> GaussianMixture:
    """Three well separated components in R^3 with unequal weights and spreads."""
    means = np.zeros((3, 3))
    means[0, 0], means[1, 0], means[2, 1] = 2.0, -2.0, 2.0
    return GaussianMixture(means, np.array([0.2, 0.3, 0.25]), np.array([0.5, 0.3, 0.2]))


def gaussian_noise(shape, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=g, dtype=torch.float64)


def check_mixture(
    mix: GaussianMixture, x: torch.Tensor, sigmas: float = 4.0, spread: bool = True
) -> None:
    """Component weights, means (and spreads) of x agree with mix within sampling error."""
    n = len(x)
    labels = mix.classify(x).numpy()
    freq = np.bincount(labels, minlength=len(mix.weights)) / n
    se = np.sqrt(mix.weights * (1 - mix.weights) / n)
    assert np.all(np.abs(freq - mix.weights) < sigmas * se), (freq, mix.weights)
    for c, (m, sd) in enumerate(zip(mix.means, mix.stds, strict=True)):
        xc = x[labels == c].numpy()
        err = np.linalg.norm(xc.mean(0) - m)
        assert err < sigmas * sd * np.sqrt(mix.dim / len(xc)), (c, err)
        if spread:
            assert abs(xc.std(0, ddof=1).mean() / sd - 1) < 0.2, (c, xc.std(0).mean(), sd)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_ddpm_1000_steps_reproduces_the_mixture(kind):
    sch, mix, n = SCHEDULES[kind], mixture(), 600
    model = GMMDenoiser(mix, sch)
    noise = gaussian_noise((n, 3))
    x_T = noise() * prior_scale(sch)
    x, nfe = ddpm(model, x_T, sch.num_steps - 1, noise)
    assert nfe == 1000
    check_mixture(mix, x)


def test_ddim_eta_one_over_every_step_is_ddpm():
    sch, mix = Schedule(), mixture()
    model = GMMDenoiser(mix, sch)
    x_M = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, nfe_a = ddpm(model, x_M, 60, gaussian_noise((50, 3)))
    b, nfe_b = ddim(model, x_M, range(60, -1, -1), gaussian_noise((50, 3)), eta=1.0)
    assert nfe_a == nfe_b == 61
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_matches_diffusers_ddim_scheduler(eta):
    sch, mix, n = Schedule(), mixture(), 64
    model = GMMDenoiser(mix, sch)
    x_T = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    scheduler = diffusers_scheduler("ddim", sch, 10)
    ref, nfe_ref = scheduler_sample(scheduler, model, x_T, gaussian_noise((n, 3)), eta)
    steps = [int(t) for t in scheduler.timesteps]
    assert steps[0] == 999 and len(steps) == 10
    ours, nfe = ddim(model, x_T.double(), steps, gaussian_noise((n, 3)), eta)
    assert nfe == nfe_ref == 10
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++"])
def test_baselines_from_noise_run_through_diffusers(name):
    sch, mix, n = Schedule(), mixture(), 600
    model = GMMDenoiser(mix, sch)
    noise = gaussian_noise((n, 3))
    spec = SamplerSpec(name=name, nfe=25)
    x, nfe = refine(spec, model, noise() * prior_scale(sch), 999, noise, from_noise=True)
    assert nfe == 25
    # Few deterministic steps shrink the modes' spread, not their weights or centres.
    check_mixture(mix, x.double(), sigmas=5.0, spread=False)


def test_from_step_m_samplers_report_nfe():
    sch, mix, n = Schedule(), mixture(), 200
    model = GMMDenoiser(mix, sch)
    x0 = mix.sample(n, torch.Generator().manual_seed(0)).double()
    x_M = sch.diffuse(x0, 100, torch.randn(n, 3, dtype=torch.float64))
    for spec, expected in [
        (SamplerSpec(name="ddpm"), 101),
        (SamplerSpec(name="ddim", nfe=10), 10),
        (SamplerSpec(name="ddim"), 101),
        (SamplerSpec(name="dpm-solver++", nfe=8), 8),
        (SamplerSpec(name="langevin", nfe=11), 11),
    ]:
        x, nfe = refine(spec, model, x_M.clone(), 100, gaussian_noise((n, 3)))
        assert nfe == expected, spec
        assert torch.isfinite(x).all()
        # From step 100 (little noise) every sampler stays in the sample's own mode.
        same = (mix.classify(x) == mix.classify(x0)).double().mean()
        assert same > 0.95, (spec, same)


def test_annealed_langevin_ve_reproduces_weights():
    sch, mix, n = SCHEDULES["ve"], mixture(), 1000
    model = GMMDenoiser(mix, sch)
    noise = gaussian_noise((n, 3))
    levels = spaced_timesteps(999, 200)
    x, nfe = annealed_langevin(model, noise() * prior_scale(sch), levels, noise, steps_per_level=2)
    assert nfe == 401
    freq = np.bincount(mix.classify(x).numpy(), minlength=3) / n
    np.testing.assert_allclose(freq, mix.weights, atol=0.06)


def test_diffusers_samplers_need_vp():
    with pytest.raises(DpmotError, match="needs a VP schedule"):
        diffusers_scheduler("dpm-solver++", SCHEDULES["ve"], 10)


def test_spaced_timesteps():
    assert spaced_timesteps(100, 10) == [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]
    assert spaced_timesteps(3, 10) == [3, 2, 1, 0]
    assert spaced_timesteps(9, 4) == [9, 7, 4, 2]
    with pytest.raises(DpmotError):
        spaced_timesteps(10, 0)


def test_draws_are_per_sample():
    """A sample's draws do not depend on which other samples share its batch."""
    ids = np.array([3, BLOCK - 1, BLOCK, 5 * BLOCK + 7])
    some = ids[[1, 3]]
    a, b = RowNoise(7, ids, (2, 3)), RowNoise(7, some, (2, 3))
    first, second = a(), a()
    torch.testing.assert_close(b(), first[[1, 3]])
    torch.testing.assert_close(b(), second[[1, 3]])
    assert not torch.equal(first, second)
    src = Source()
    torch.testing.assert_close(prior_points(src, 7, some, 5), prior_points(src, 7, ids, 5)[[1, 3]])
    np.testing.assert_array_equal(uniforms(7, 1, some, 2), uniforms(7, 1, ids, 2)[[1, 3]])
    assert not torch.equal(prior_points(src, 8, ids, 5), prior_points(src, 7, ids, 5))
    # Stream STREAM_PRIOR of block 0 is Source.sample's block.
    block = src.sample(BLOCK, 5, 7, STREAM_PRIOR, 0)
    torch.testing.assert_close(prior_points(src, 7, np.array([3]), 5), block[[3]])
