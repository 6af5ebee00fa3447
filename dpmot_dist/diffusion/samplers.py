"""Samplers: plain functions over the denoiser contract ``model.eps(x_t, t)``.

Every sampler takes a starting point x at timestep ``t_start`` (the OT map's x_M, or pure
noise at T−1), runs to clean data and returns ``(x_0, nfe)``, the number of model
evaluations each sample used (a class-conditional model comes with its batch's labels bound,
:class:`~dpmot_dist.diffusion.models.ClassConditioned`; with guidance each call is 2
evaluations, which :func:`refine` counts). Random draws come from an explicit ``noise()`` callable
returning N(0, I) shaped like x; :class:`RowNoise` draws each row from the sample's own
generator, so a sample is a pure function of (seed, sample_id) whatever batch it is in.

All reverse steps use the (a_t, s_t) form x_t = a_t x_0 + s_t ε of
:mod:`dpmot_dist.diffusion.schedules`, with clean data at t = −1 (a = 1, s = 0), so that one
implementation covers VP (DDPM) and VE (NCSN) schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dpmot_dist.diffusion.models import Denoiser
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError
from dpmot_dist.ot.sources import Source, stream_seed

Noise = Callable[[], torch.Tensor]
SamplerName = Literal["ddpm", "ddim", "langevin", "dpm-solver++"]
SAMPLERS = ("ddpm", "ddim", "langevin", "dpm-solver++")

# Random streams. Draws are made in blocks of BLOCK consecutive sample ids: block b of stream
# S comes from a CPU generator seeded by stream_seed(seed, S, b), and sample i takes row
# i % BLOCK of block i // BLOCK. A sample's draws are thus a pure function of (seed,
# sample_id), independent of the batch, the chunk, the worker and the device, while the cost
# of seeding is paid once per block.
BLOCK = 1024
STREAM_PRIOR = 0  # x_T: the noise the OT map sends to x_M, or the start of a from-noise run
STREAM_MAP = 1  # the interp map's choice of neighbour and weight
STREAM_SAMPLER = 2  # seeds of the per-sample generators of the sampler's step noise
STREAM_LABEL = 3  # the class of a sample whose label is drawn (from-noise baselines)


def block_rows(sample_ids: np.ndarray, make_block: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Rows ``sample_ids`` of the blocks ``make_block(b)`` (BLOCK rows each): (B, ...)."""
    ids = np.asarray(sample_ids, np.int64)
    blocks = ids // BLOCK
    out = None
    for b in np.unique(blocks):
        sel = np.nonzero(blocks == b)[0]
        block = make_block(int(b))
        if out is None:
            out = block.new_empty((len(ids), *block.shape[1:]))
        out[torch.from_numpy(sel)] = block[torch.from_numpy(ids[sel] % BLOCK)]
    assert out is not None or len(ids) == 0
    return out


def _generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, *keys))


def prior_points(source: Source, seed: int, sample_ids: np.ndarray, dim: int) -> torch.Tensor:
    """x_T (B, D) float32 of the source μ for ``sample_ids`` (stream STREAM_PRIOR)."""
    if len(sample_ids) == 0:
        return torch.empty(0, dim)
    return block_rows(sample_ids, lambda b: source.sample(BLOCK, dim, seed, STREAM_PRIOR, b))


def uniforms(seed: int, stream: int, sample_ids: np.ndarray, m: int) -> np.ndarray:
    """(B, m) U[0, 1) float64 draws per sample of ``stream``."""
    if len(sample_ids) == 0:
        return np.empty((0, m))

    def draw(b: int) -> torch.Tensor:
        gen = _generator(seed, stream, b)
        return torch.rand(BLOCK, m, generator=gen, dtype=torch.float64)

    return block_rows(sample_ids, draw).numpy()


class RowNoise:
    """N(0, I) draws of shape (B, *shape), row i from its own CPU generator.

    Generator i is seeded by sample i's entry of the stream ``stream`` (a 62-bit integer), so
    a sample's whole trajectory depends only on (seed, sample_id) and not on the batch or
    the device.
    """

    def __init__(
        self,
        seed: int,
        sample_ids: Sequence[int] | np.ndarray,
        shape: Sequence[int],
        stream: int = STREAM_SAMPLER,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape, self.device = tuple(shape), torch.device(device)
        ids = np.asarray(sample_ids, np.int64)

        def draw(b: int) -> torch.Tensor:
            return torch.randint(1 << 62, (BLOCK,), generator=_generator(seed, stream, b))

        seeds = block_rows(ids, draw).tolist() if len(ids) else []
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self) -> torch.Tensor:
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.gens])
        return z.to(self.device)


def marginal(schedule: Schedule, t: int) -> tuple[float, float]:
    """(a_t, s_t), with clean data (1, 0) at t = −1."""
    return (1.0, 0.0) if t < 0 else schedule.marginal(t)


def _timesteps(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def spaced_timesteps(t_start: int, k: int) -> list[int]:
    """k decreasing timesteps from t_start: round(linspace(0, t_start, k + 1))[1:] reversed.

    The last model evaluation is at t_start / k, as with diffusers' ``linspace`` spacing; with
    k > t_start every step t_start, …, 0 is used.
    """
    if k < 1:
        raise DpmotError(f"nfe must be at least 1, got {k}")
    if k > t_start:
        return list(range(t_start, -1, -1))
    return [int(t) for t in np.linspace(0, t_start, k + 1).round()[1:][::-1]]


def ddpm(model: Denoiser, x: torch.Tensor, t_start: int, noise: Noise) -> tuple[torch.Tensor, int]:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) from step t_start to clean data.

    Each step draws x_{t−1} ~ q(x_{t−1} | x_t, x̂_0) with x̂_0 = (x_t − s_t ε̂)/a_t: for the
    one-step transition x_t = α x_{t−1} + β η (α = a_t/a_{t−1}, β² = s_t² − α² s_{t−1}²) the
    posterior has mean (a_{t−1} β² x̂_0 + α s_{t−1}² x_t)/s_t² and variance β² s_{t−1}²/s_t²
    (for VE this is the ancestral SMLD sampler of Song et al. 2021). NFE = t_start + 1.
    """
    for t in range(t_start, -1, -1):
        (a, s), (a_prev, s_prev) = marginal(model.schedule, t), marginal(model.schedule, t - 1)
        alpha = a / a_prev
        beta2 = s * s - alpha * alpha * s_prev * s_prev
        x0 = (x - s * model.eps(x, _timesteps(x, t))) / a
        mean = (a_prev * beta2 * x0 + alpha * s_prev * s_prev * x) / (s * s)
        x = mean + math.sqrt(beta2) * s_prev / s * noise() if t > 0 else mean
    return x, t_start + 1


def ddim(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[int],
    noise: Noise | None = None,
    eta: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) along decreasing ``timesteps``, then to t = −1.

    x_{t'} = a_{t'} x̂_0 + sqrt(s_{t'}² − σ²) ε̂ + σ z with σ = η σ_DDPM(t → t'); η = 0 is
    deterministic, η = 1 over every step is :func:`ddpm`. NFE = len(timesteps).
    """
    if eta > 0 and noise is None:
        raise ValueError("ddim with eta > 0 needs a noise source")
    steps = [*timesteps, -1]
    for t, t_next in zip(steps[:-1], steps[1:], strict=True):
        (a, s), (a1, s1) = marginal(model.schedule, t), marginal(model.schedule, t_next)
        eps = model.eps(x, _timesteps(x, t))
        x0 = (x - s * eps) / a
        beta2 = s * s - (a / a1) ** 2 * s1 * s1
        sigma = eta * math.sqrt(max(beta2, 0.0)) * s1 / s
        x = a1 * x0 + math.sqrt(max(s1 * s1 - sigma * sigma, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise()
    return x, len(steps) - 1


def annealed_langevin(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[int],
    noise: Noise,
    *,
    steps_per_level: int = 1,
    step_lr: float = 0.5,
    denoise: bool = True,
) -> tuple[torch.Tensor, int]:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the levels s_t of
    ``timesteps``: x ← x + (α_t/2) ∇log p_t(x) + sqrt(α_t) z with α_t = step_lr · s_t².

    (NCSN writes α_i = ε σ_i²/σ_L²: ``step_lr`` = ε/σ_L², free of the schedule's σ_min.)
    With ``denoise`` a last Tweedie step x̂_0 = (x − s ε̂)/a at the final level removes the
    remaining noise (Jolicoeur-Martineau et al. 2021). Designed for VE models (NCSN);
    NFE = len(timesteps) · steps_per_level (+1).
    """
    for t in timesteps:
        s = marginal(model.schedule, t)[1]
        alpha = step_lr * s * s
        for _ in range(steps_per_level):
            score = -model.eps(x, _timesteps(x, t)) / s
            x = x + 0.5 * alpha * score + math.sqrt(alpha) * noise()
    nfe = len(timesteps) * steps_per_level
    if denoise:
        t = timesteps[-1]
        a, s = marginal(model.schedule, t)
        x = (x - s * model.eps(x, _timesteps(x, t))) / a
        nfe += 1
    return x, nfe


# ---------------------------------------------------------------------------------------------
# diffusers schedulers (the baselines)


def diffusers_scheduler(
    name: str, schedule: Schedule, nfe: int, timesteps: Sequence[int] | None = None
):
    """A fresh diffusers DDIMScheduler or DPMSolverMultistepScheduler (DPM-Solver++, 2nd
    order) with the β of ``schedule``, set to ``nfe`` steps (or the given ``timesteps``).

    DDIM uses ``trailing`` spacing (the first step at T−1, Lin et al. 2024) and no clipping;
    both predict ε.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if not schedule.is_vp:
        raise DpmotError(f"sampler {name!r} needs a VP schedule; use ddpm, ddim or langevin")
    common = {**schedule.ddpm_scheduler_kwargs(), "prediction_type": "epsilon"}
    if name == "ddim":
        sch = DDIMScheduler(**common, clip_sample=False, timestep_spacing="trailing")
        if timesteps is not None:
            raise ValueError("custom timesteps go through samplers.ddim")
        sch.set_timesteps(nfe)
    elif name == "dpm-solver++":
        sch = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
        if timesteps is None:
            sch.set_timesteps(nfe)
        else:
            sch.set_timesteps(timesteps=list(timesteps))
    else:
        raise ValueError(f"no diffusers scheduler for sampler {name!r}")
    return sch


def scheduler_sample(
    scheduler, model: Denoiser, x: torch.Tensor, noise: Noise | None = None, eta: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Run a diffusers scheduler's reverse loop over the ε contract: (x_0, nfe).

    For DDIM with η > 0 the step's variance noise comes from ``noise``.
    """
    for t in scheduler.timesteps:
        eps = model.eps(x, _timesteps(x, int(t)))
        kwargs = {}
        if eta > 0:
            kwargs = {"eta": eta, "variance_noise": noise()}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x, len(scheduler.timesteps)


# ---------------------------------------------------------------------------------------------
# One entry point for the pipelines


@dataclass(frozen=True, kw_only=True)
class SamplerSpec:
    """Which sampler and its settings.

    Attributes:
        name: ddpm, ddim, langevin or dpm-solver++.
        nfe: model evaluations per sample (ddpm: ignored, every step is used; None: every
            step for ddim / langevin).
        eta: DDIM stochasticity η.
        langevin_steps: Langevin steps per noise level; langevin_lr: α_t / s_t² (see
            :func:`annealed_langevin`).
    """

    name: SamplerName = "ddpm"
    nfe: int | None = None
    eta: float = 0.0
    langevin_steps: int = 1
    langevin_lr: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise DpmotError(f"sampler must be one of {SAMPLERS}, got {self.name!r}")
        if self.nfe is not None and self.nfe < 1:
            raise DpmotError(f"nfe must be at least 1, got {self.nfe}")


def refine(
    spec: SamplerSpec,
    model: Denoiser,
    x: torch.Tensor,
    t_start: int,
    noise: Noise,
    *,
    from_noise: bool = False,
) -> tuple[torch.Tensor, int]:
    """Run ``spec`` from x at step t_start to clean data: (x_0, nfe).

    ``from_noise`` (x pure noise at T−1): ddim and dpm-solver++ go through the diffusers
    schedulers (the baselines, VP only; VE ddim uses :func:`ddim`). Otherwise ddim and
    langevin use :func:`spaced_timesteps` (t_start, nfe) and dpm-solver++ the same timesteps
    in diffusers' solver. nfe counts model evaluations per sample: the sampler's model calls
    × ``model.evaluations`` (2 under classifier-free guidance).
    """
    x, calls = _refine(spec, model, x, t_start, noise, from_noise)
    return x, calls * getattr(model, "evaluations", 1)


def _refine(
    spec: SamplerSpec, model: Denoiser, x: torch.Tensor, t_start: int, noise: Noise, from_noise
) -> tuple[torch.Tensor, int]:
    """:func:`refine`, counting model calls."""
    sch = model.schedule
    k = spec.nfe if spec.nfe is not None else t_start + 1
    if spec.name == "ddpm":
        return ddpm(model, x, t_start, noise)
    if spec.name == "langevin":
        n = spec.langevin_steps
        levels = spaced_timesteps(t_start, max(1, (k - 1) // n))
        return annealed_langevin(
            model, x, levels, noise, steps_per_level=n, step_lr=spec.langevin_lr
        )
    if spec.name == "ddim" and not (from_noise and sch.is_vp):
        return ddim(model, x, spaced_timesteps(t_start, k), noise, spec.eta)
    if from_noise:
        if spec.nfe is None:
            raise DpmotError(f"--from-noise with sampler {spec.name} needs --nfe")
        scheduler = diffusers_scheduler(spec.name, sch, spec.nfe)
    else:
        scheduler = diffusers_scheduler(spec.name, sch, k, spaced_timesteps(t_start, k))
    return scheduler_sample(scheduler, model, x, noise, spec.eta if spec.name == "ddim" else 0.0)


def prior_scale(schedule: Schedule) -> float:
    """Standard deviation of the prior at T−1 that from-noise sampling starts from (s_{T−1})."""
    return marginal(schedule, schedule.num_steps - 1)[1]
