"""Seeded source measures μ: counter-based noise streams that any worker can regenerate.

A batch is a pure function of (seed, *keys): the solver asks for
``source.sample(n, dim, seed, iteration, batch)`` and every shard actor, on any device,
gets the same points without the driver ever shipping them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

SourceKind = Literal["gaussian", "uniform"]
_SOBOL_MAX_DIM = 21201
_U_EPS = 1e-7
# Randomised QMC integrates a cell's indicator with variance O(n^(-1-1/D)) against Monte
# Carlo's O(1/n) (Owen 1997; the indicator of a set with a smooth boundary). Measured with the
# default solver, TV after 3M samples, Sobol vs Monte Carlo: 2-D square (exact TV) 0.0018 vs
# 0.0062; clustered N=1,000 Gaussian-source targets, D = 8: 0.0148 vs 0.0181, D = 16: 0.0122
# vs 0.0129, D = 32: 0.0109 vs 0.0109. By default the source is Sobol up to this dimension and
# Monte Carlo above it (torch draws Sobol points on the CPU only, ~3.5× the cost of randn).
QMC_MAX_DIM = 16


def default_qmc(dim: int) -> bool:
    """Whether the source draws scrambled Sobol points by default in dimension ``dim``."""
    return dim <= QMC_MAX_DIM


def stream_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by (seed, *keys) (NumPy ``SeedSequence`` hashing)."""
    state = np.random.SeedSequence([seed, *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass(frozen=True, kw_only=True)
class Source:
    """The source measure μ of the OT problem.

    Attributes:
        kind: ``gaussian`` — N(0, I_D), the diffusion prior; ``uniform`` — [−½, ½]^D.
        qmc: draw randomised quasi-Monte Carlo points (scrambled Sobol, a fresh scramble
            per stream; mapped through the inverse normal CDF for ``gaussian``).
    """

    kind: SourceKind = "gaussian"
    qmc: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "uniform"):
            raise ValueError(f"source must be 'gaussian' or 'uniform', got {self.kind!r}")

    @property
    def std(self) -> float:
        """Standard deviation of one coordinate."""
        return 1.0 if self.kind == "gaussian" else 1.0 / math.sqrt(12.0)

    def sample(
        self,
        n: int,
        dim: int,
        seed: int,
        *keys: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """(n, dim) float32 points of the stream (seed, *keys) on ``device``."""
        s = stream_seed(seed, *keys)
        if self.qmc:
            return self._sobol(n, dim, s).to(device)
        gen = torch.Generator(device=device).manual_seed(s)
        if self.kind == "gaussian":
            return torch.randn(n, dim, generator=gen, device=device)
        return torch.rand(n, dim, generator=gen, device=device).sub_(0.5)

    def _sobol(self, n: int, dim: int, s: int) -> torch.Tensor:
        if dim > _SOBOL_MAX_DIM:
            raise ValueError(f"Sobol points support at most {_SOBOL_MAX_DIM} dimensions")
        u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=s).draw(n)
        if self.kind == "uniform":
            return u.sub_(0.5)
        return torch.special.ndtri(u.clamp_(_U_EPS, 1 - _U_EPS))
