"""Tests for dpmot_dist.diffusion.schedules against diffusers' DDPMScheduler and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpmot_dist.diffusion.schedules import Schedule

VP_CASES = [
    dict(kind="vp-linear"),
    dict(kind="vp-cosine"),
    dict(kind="vp-linear", num_steps=500, beta_start=1e-3, beta_end=0.03),
    dict(kind="vp-cosine", num_steps=250),
    dict(kind="vp-scaled-linear", beta_start=0.00085, beta_end=0.012),
]


@pytest.mark.parametrize("kw", VP_CASES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_alphas_cumprod_match_diffusers(kw: dict) -> None:
    diffusers = pytest.importorskip("diffusers")
    s = Schedule(**kw)
    ref = diffusers.DDPMScheduler(**s.ddpm_scheduler_kwargs())
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(s.betas.numpy(), ref.betas.numpy(), atol=1e-7)
    for t in (0, s.num_steps // 3, s.num_steps - 1):
        a, sd = s.marginal(t)
        ab = float(ref.alphas_cumprod[t])
        assert abs(a - math.sqrt(ab)) < 1e-6 and abs(sd - math.sqrt(1 - ab)) < 1e-6


def test_cosine_schedule_follows_nichol_dhariwal() -> None:
    """ᾱ_t ≈ f(t+1)/f(0), f(u) = cos²((u/T + 0.008)/1.008 · π/2), while β stays below 0.999."""
    s = Schedule(kind="vp-cosine")
    T = s.num_steps
    f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert abs(s.alphas_cumprod[t] - f(t + 1) / f(0)) < 1e-5


def test_linear_schedule_closed_form() -> None:
    s = Schedule(kind="vp-linear", num_steps=100, beta_start=1e-3, beta_end=0.05)
    betas = np.linspace(1e-3, 0.05, 100)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)


def test_ve_sigmas_are_geometric() -> None:
    s = Schedule(kind="ve", num_steps=232, sigma_min=0.01, sigma_max=50.0)
    assert s.sigmas[0] == pytest.approx(0.01) and s.sigmas[-1] == pytest.approx(50.0)
    ratios = s.sigmas[1:] / s.sigmas[:-1]
    np.testing.assert_allclose(ratios, (50.0 / 0.01) ** (1 / 231), rtol=1e-12)
    assert s.marginal(100) == (1.0, pytest.approx(s.sigmas[100]))
    with pytest.raises(ValueError, match="no β"):
        _ = s.betas


def test_diffuse_is_the_marginal() -> None:
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    for kind in ("vp-linear", "vp-cosine", "ve"):
        s = Schedule(kind=kind)
        a, sd = s.marginal(321)
        torch.testing.assert_close(s.diffuse(x0, 321, eps), a * x0 + sd * eps)


def test_round_trip_and_validation() -> None:
    s = Schedule(kind="vp-cosine", num_steps=400)
    assert Schedule.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="outside"):
        s.marginal(400)
    with pytest.raises(ValueError, match="outside"):
        s.marginal(-1)
    with pytest.raises(ValueError, match="schedule must be"):
        Schedule(kind="vp-sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        Schedule(num_steps=1)
