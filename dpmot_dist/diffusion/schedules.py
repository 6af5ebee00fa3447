"""Forward-diffusion schedules: VP (DDPM; linear, scaled-linear or cosine β) and VE (NCSN;
geometric σ).

Timesteps follow diffusers: integers t ∈ {0, …, T−1}, the model is called with t, and

- VP: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, ᾱ_t = Π_{s ≤ t} (1 − β_s), computed exactly as
  ``diffusers.DDPMScheduler`` does (β in float32, cumulative product in float32) so that
  targets and the models trained with that scheduler agree (Ho et al. 2020; Nichol &
  Dhariwal 2021 for the cosine schedule; ``scaled_linear``, β_t = (linear in sqrt β)², is
  latent diffusion's, Rombach et al. 2022).
- VE: x_t = x_0 + σ_t ε, σ_t = σ_min (σ_max / σ_min)^{t / (T−1)} (Song & Ermon 2019/2020).

Both are written as x_t = a_t x_0 + s_t ε with (a_t, s_t) from :meth:`Schedule.marginal`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch

ScheduleKind = Literal["vp-linear", "vp-scaled-linear", "vp-cosine", "ve"]
SCHEDULE_KINDS = ("vp-linear", "vp-scaled-linear", "vp-cosine", "ve")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A discrete forward-diffusion schedule of ``num_steps`` timesteps."""

    kind: ScheduleKind = "vp-linear"
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.num_steps < 2:
            raise ValueError("a schedule needs at least 2 steps")

    @property
    def is_vp(self) -> bool:
        return self.kind.startswith("vp")

    @cached_property
    def betas(self) -> torch.Tensor:
        """β_t in float32, as ``DDPMScheduler`` builds them (VP only)."""
        T = self.num_steps
        if self.kind == "vp-linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        if self.kind == "vp-scaled-linear":
            lo, hi = self.beta_start**0.5, self.beta_end**0.5
            return torch.linspace(lo, hi, T, dtype=torch.float32) ** 2
        if self.kind == "vp-cosine":

            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            b = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
            return torch.tensor(b, dtype=torch.float32)
        raise ValueError("a VE schedule has no β")

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t for t = 0..T−1 (VP), as float64 of the float32 values diffusers uses."""
        return torch.cumprod(1.0 - self.betas, dim=0).double().numpy()

    @cached_property
    def sigmas(self) -> np.ndarray:
        """σ_t for t = 0..T−1 (VE), geometric from σ_min to σ_max."""
        t = np.arange(self.num_steps) / (self.num_steps - 1)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def marginal(self, t: int) -> tuple[float, float]:
        """(a_t, s_t) with x_t = a_t x_0 + s_t ε."""
        if not 0 <= t < self.num_steps:
            raise ValueError(f"timestep {t} outside [0, {self.num_steps - 1}]")
        if self.is_vp:
            ab = float(self.alphas_cumprod[t])
            return math.sqrt(ab), math.sqrt(1.0 - ab)
        return 1.0, float(self.sigmas[t])

    def diffuse(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x_0 + s_t ε."""
        a, s = self.marginal(t)
        return a * x0 + s * noise

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        return cls(**d)

    def ddpm_scheduler_kwargs(self) -> dict:
        """Arguments that make a diffusers scheduler use this VP schedule."""
        names = {
            "vp-linear": "linear",
            "vp-scaled-linear": "scaled_linear",
            "vp-cosine": "squaredcos_cap_v2",
        }
        return {
            "num_train_timesteps": self.num_steps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": names[self.kind],
        }
