"""Helpers shared by test modules: tiny real models built in the test (nothing downloaded).

``tests/`` is on ``sys.path`` (pytest's default import mode inserts the folder of the root
``conftest.py``), so test modules anywhere below import this as ``testlib``.
"""

from __future__ import annotations

import pytest
import torch


def tiny_unet():
    """A random 3×8×8 diffusers ``UNet2DModel`` (seed 0)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def tiny_vae(scaling_factor: float = 0.5, shift_factor: float | None = None):
    """A random diffusers ``AutoencoderKL`` (seed 0): 3×H×W images ↔ 4×(H/2)×(W/2) latents."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


class Zero(torch.nn.Module):
    """A TorchScript-able ε-model that predicts no noise: refinement returns x_t / a_t."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class Halve(torch.nn.Module):
    """A tiny TorchScript-able "network": f(x, t) = x / 2 + t / 1000."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1)
