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


def tiny_class_unet(num_class_embeds: int, channels: int = 3, size: int = 8):
    """A random class-conditional diffusers ``UNet2DModel`` (seed 0): class embeddings of
    ``num_class_embeds`` rows, called with ``class_labels=``."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
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


def tiny_dit(num_classes: int, channels: int = 4, size: int = 8):
    """A random diffusers ``DiTTransformer2DModel`` (seed 0) that learns Σ (2·C out channels),
    with DiT's label embedding: ``num_classes`` classes and the null class."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=channels,
        out_channels=2 * channels,
        num_layers=1,
        sample_size=size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=4,
    ).eval()


def save_ddpm_pipeline(folder, unet, vae=None, **scheduler) -> str:
    """``DDPMPipeline(unet, DDPMScheduler(**scheduler)).save_pretrained(folder)``: ``unet/`` +
    ``scheduler/``; with a ``vae``, a latent pipeline's ``unet/`` + ``vae/`` + ``scheduler/``."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(**scheduler)
    if vae is None:
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=sch)
    else:

        class LatentPipeline(diffusers.DiffusionPipeline):
            def __init__(self, unet, vae, scheduler) -> None:
                super().__init__()
                self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

        pipe = LatentPipeline(unet=unet, vae=vae, scheduler=sch)
    pipe.save_pretrained(str(folder))
    return str(folder)


def save_dit_pipeline(folder, transformer, vae, **scheduler) -> str:
    """``DiTPipeline(...).save_pretrained(folder)``: transformer/ + vae/ + scheduler/."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(**scheduler)
    diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=sch).save_pretrained(
        str(folder)
    )
    return str(folder)


class Zero(torch.nn.Module):
    """A TorchScript-able ε-model that predicts no noise: refinement returns x_t / a_t."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class Halve(torch.nn.Module):
    """A tiny TorchScript-able "network": f(x, t) = x / 2 + t / 1000."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1)


class Recorder(torch.nn.Module):
    """A TorchScript-able class-conditional ε-model, f(x, t, y) = x / 2 + y / 10, that keeps
    every label batch it was called with in ``seen``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = torch.jit.Attribute([], list[torch.Tensor])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(y.clone())
        shape = [-1] + [1] * (x.dim() - 1)
        return 0.5 * x + (y.to(x.dtype) / 10.0).reshape(shape)
