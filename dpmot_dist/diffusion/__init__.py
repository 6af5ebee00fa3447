"""Diffusion models and their samplers, behind one small contract.

A denoiser is anything with ``eps(x_t, t)`` (:class:`~dpmot_dist.diffusion.models.Denoiser`):
the exact score of a Gaussian mixture, a diffusers model or pipeline folder, a TorchScript
module. :mod:`~dpmot_dist.diffusion.schedules` holds the VP/VE forward processes,
:mod:`~dpmot_dist.diffusion.samplers` the reverse samplers (DDPM, DDIM, annealed Langevin,
diffusers' DPM-Solver++) as functions over that contract, and
:mod:`~dpmot_dist.diffusion.vae` the latent space of latent diffusion models.
"""

from dpmot_dist.diffusion.models import Denoiser, GaussianMixture, GMMDenoiser, load_model
from dpmot_dist.diffusion.samplers import SamplerSpec, refine
from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.diffusion.vae import VaeSpec

__all__ = [
    "Denoiser",
    "GMMDenoiser",
    "GaussianMixture",
    "SamplerSpec",
    "Schedule",
    "VaeSpec",
    "load_model",
    "refine",
]
