"""The latent space of a latent diffusion model: a diffusers ``AutoencoderKL``.

Latents are x_0 = scaling_factor · (E[q(z | image)] − shift_factor): the posterior *mean*, so
that they are deterministic (``scaling_factor`` and ``shift_factor`` from the VAE's config).
Decoding inverts the scaling, image = D(x_0 / scaling_factor + shift_factor), as diffusers'
latent pipelines do. Any fsspec URI works: a remote folder is copied to a local temporary
folder once per process.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import storage


@dataclass(frozen=True)
class VaeSpec:
    """Where an AutoencoderKL lives and the numbers that fix the latent shape and scale."""

    uri: str
    scaling_factor: float
    shift_factor: float | None
    in_channels: int
    latent_channels: int
    factor: int  # spatial down-sampling of the encoder
    batch_size: int
    out_channels: int | None = None  # channels of a decoded image (default: in_channels)

    @classmethod
    def open(cls, uri: str, batch_size: int) -> VaeSpec:
        uri = uri.rstrip("/")
        if not storage.exists(storage.join(uri, "config.json")) and storage.exists(
            storage.join(uri, "vae", "config.json")
        ):
            uri = storage.join(uri, "vae")
        cfg = storage.read_json(storage.join(uri, "config.json"))
        try:
            return cls(
                uri,
                float(cfg.get("scaling_factor", 0.18215)),
                None if cfg.get("shift_factor") is None else float(cfg["shift_factor"]),
                int(cfg.get("in_channels", 3)),
                int(cfg.get("latent_channels", 4)),
                2 ** (len(cfg["block_out_channels"]) - 1),
                batch_size,
                out_channels=int(cfg.get("out_channels", cfg.get("in_channels", 3))),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DpmotError(f"{uri}/config.json: not an AutoencoderKL config ({e})") from e

    def latent_shape(self, chw: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent (c, h, w) of a (C, H, W) image."""
        c, h, w = chw
        if c != self.in_channels:
            raise DpmotError(
                f"{self.uri}: the VAE takes {self.in_channels} channels, images have {c}"
            )
        if h % self.factor or w % self.factor:
            raise DpmotError(
                f"{self.uri}: image size {h}×{w} is not a multiple of the VAE's "
                f"down-sampling factor {self.factor}; set image_size"
            )
        return self.latent_channels, h // self.factor, w // self.factor

    def image_shape(self, latent: tuple[int, ...]) -> tuple[int, int, int]:
        """Decoded image (C, H, W) of a latent (c, h, w)."""
        if len(latent) != 3 or latent[0] != self.latent_channels:
            raise DpmotError(
                f"{self.uri}: the VAE decodes {self.latent_channels}×h×w latents, the data "
                f"shape is {list(latent)}"
            )
        c = self.out_channels or self.in_channels
        return c, latent[1] * self.factor, latent[2] * self.factor

    def describe(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent": "scaling_factor * (latent_dist.mean - shift_factor)",
        }

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) images in the VAE's range → scaled latent means (N, c, h, w)."""
        vae, device = _load_vae(self.uri)
        shift = self.shift_factor or 0.0
        out = []
        with torch.no_grad():
            for a in range(0, len(x), self.batch_size):
                chunk = torch.from_numpy(x[a : a + self.batch_size]).to(device)
                z = vae.encode(chunk).latent_dist.mean
                out.append(((z - shift) * self.scaling_factor).float().cpu().numpy())
        return np.concatenate(out)

    def load(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Load the decoder on ``device`` in ``dtype`` now (errors before the first batch)."""
        _load_vae(self.uri, str(torch.device(device)), dtype)

    def decode(
        self, x0: torch.Tensor, device: str | torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Latents x_0 (B, c, h, w) → images (B, C, H, W) float32 in the VAE's range ([−1, 1]).

        image = D(x_0 / scaling_factor + shift_factor), ``batch_size`` latents per forward
        pass, on ``device`` in ``dtype``; the images are returned on ``device``.
        """
        vae, device = _load_vae(self.uri, str(torch.device(device)), dtype)
        shift = self.shift_factor or 0.0
        out = []
        with torch.no_grad():
            for a in range(0, len(x0), self.batch_size):
                z = x0[a : a + self.batch_size].to(device, dtype) / self.scaling_factor + shift
                out.append(vae.decode(z).sample.float())
        return torch.cat(out)


@functools.lru_cache(maxsize=4)
def _load_vae(
    uri: str, device: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, str]:
    """The AutoencoderKL at ``uri`` on ``device`` (default: CUDA when there is one) in ``dtype``,
    loaded once per worker process."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise DpmotError(
            f"{uri}: the VAE needs diffusers (pip install dpmot-dist[diffusers])"
        ) from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fs, path = storage.url_to_fs(uri)
    local = path if isinstance(fs, LocalFileSystem) else tempfile.mkdtemp(prefix="dpmot-vae-")
    if local != path:
        atexit.register(shutil.rmtree, local, ignore_errors=True)
        storage.retrying(uri, fs.get, path.rstrip("/") + "/", local, recursive=True)
    try:
        vae = AutoencoderKL.from_pretrained(local, torch_dtype=dtype)
    except (OSError, ValueError, TypeError) as e:
        raise DpmotError(f"{uri}: cannot load AutoencoderKL ({str(e).splitlines()[0]})") from e
    return vae.to(device, dtype).eval(), device
