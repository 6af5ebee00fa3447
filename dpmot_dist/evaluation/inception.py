"""The FID Inception-v3: TensorFlow's 2015-12-05 pool3 graph, as ported by pytorch-fid.

Plain torch (no torchvision). The layer names match pytorch-fid's ``FIDInceptionA/C/E``
network and torch-fidelity's ``FeatureExtractorInceptionV3``, so either project's weight file
(``pt_inception-2015-12-05-6726825d.pth`` / ``weights-inception-2015-12-05-6726825d.pth``,
the same tensors) loads into :class:`FIDInceptionV3` with ``torch.load(weights_only=True)``.
Nothing is ever downloaded: :func:`weights_path` takes the caller's file, else
``$DPMOT_INCEPTION_WEIGHTS``, else one of those files in torch hub's cache, where pytorch-fid
and torch-fidelity leave them (``torch.hub.get_dir()/checkpoints``: ``$TORCH_HOME/hub``,
default ``$XDG_CACHE_HOME/torch/hub`` or ``~/.cache/torch/hub``).

The network sees 8-bit images (B, C, H, W), C ∈ {1, 3} (grey is repeated to RGB, as
``convert("RGB")`` does), prepared by one of two FID conventions; the features are the 2048
channels of the final average pool:

- ``pytorch-fid`` (the default): p / 255 resized to 299×299 by PyTorch's bilinear
  interpolation (``align_corners=False``), then 2x − 1.
- ``clean-fid`` (clean-fid's default ``mode="clean"``): each channel of the 8-bit image resized
  to 299×299 by PIL's bicubic filter as a 32-bit float image, clipped to [0, 255] and not
  re-quantised, then (x − 128) / 128.

torch-fidelity differs from pytorch-fid in both steps: it resizes with a TF1-compatible
bilinear kernel and normalises with (p − 128) / 128. FIDs from the three differ (by tens of
percent on small images), so a FID is only comparable with one of the same convention.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import storage

log = logging.getLogger(__name__)

WEIGHTS_ENV = "DPMOT_INCEPTION_WEIGHTS"
# pytorch-fid's and torch-fidelity's names for the same weights, as they cache them.
WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
FEATURES = 2048
SIZE = 299
FidConvention = Literal["pytorch-fid", "clean-fid"]
# Keys a weight file may carry that this network does not use.
_IGNORED = ("AuxLogits.", "num_batches_tracked")


class BasicConv2d(nn.Module):
    """conv (no bias) → batch norm (ε = 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TF's 3×3 'SAME' average pool: padding is not counted (pytorch-fid's fix)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (``max_pool=False``: average pool) and Mixed_7c (``max_pool=True``), as in
    the TF graph that pytorch-fid ports (its FIDInceptionE_1 / FIDInceptionE_2)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Network inputs (B, 3, 299, 299) (:func:`network_input`) → pool3 features (B, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the 1008 logits; kept so the weight files load as is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b):
            x = block(x)
        for block in (self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b):
            x = block(x)
        x = self.Mixed_7c(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def hub_weights() -> list[str]:
    """Where pytorch-fid and torch-fidelity cache the weights: ``WEIGHT_FILES`` in
    ``torch.hub.get_dir()/checkpoints`` (honours ``$TORCH_HOME`` and ``$XDG_CACHE_HOME``)."""
    return [os.path.join(torch.hub.get_dir(), "checkpoints", name) for name in WEIGHT_FILES]


def weights_path(path: str | None = None) -> str:
    """The weight file: ``path``, else ``$DPMOT_INCEPTION_WEIGHTS``, else the first of
    :func:`hub_weights` that exists; an error naming every place looked at when none."""
    path = path or os.environ.get(WEIGHTS_ENV)
    if path:
        return os.fspath(path)
    cached = hub_weights()
    found = next((f for f in cached if os.path.isfile(f)), None)
    if found is None:
        raise DpmotError(
            "FID needs the Inception weights and found none (looked at --inception: not given; "
            f"${WEIGHTS_ENV}: not set; torch hub's cache: {', '.join(cached)}): pass "
            f"--inception FILE or set {WEIGHTS_ENV} to pytorch-fid's {WEIGHT_FILES[0]} or "
            f"torch-fidelity's {WEIGHT_FILES[1]}; nothing is downloaded"
        )
    log.info("Inception weights from torch hub's cache: %s", found)
    return found


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """The state dict in a weight file (any fsspec URI), read with ``weights_only=True``."""
    data = storage.read_bytes(uri)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DpmotError(f"{uri}: not a torch state dict ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DpmotError(f"{uri}: expected a state dict of tensors")
    return state


def load_state(model: FIDInceptionV3, state: dict[str, torch.Tensor], uri: str) -> None:
    """Copy ``state`` into ``model``; a one-line error naming ``uri`` on any mismatch."""
    own = model.state_dict()
    wanted = {k for k in own if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not any(s in k for s in _IGNORED)}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing or unexpected:
        what = f"missing {len(missing)} keys (e.g. {missing[0]!r})" if missing else ""
        if unexpected:
            what += ("; " if what else "") + f"unexpected key {unexpected[0]!r}"
        raise DpmotError(f"{uri}: not the FID Inception-v3 weights: {what}")
    for k in sorted(wanted):
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise DpmotError(
                f"{uri}: not the FID Inception-v3 weights: {k} has shape "
                f"{tuple(state[k].shape)}, expected {tuple(own[k].shape)}"
            )
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)


def load_inception(
    path: str | None = None,
    device: torch.device | str = "cpu",
    state: dict[str, torch.Tensor] | None = None,
) -> FIDInceptionV3:
    """The FID network with the weights of ``path`` (else :func:`weights_path`'s file), or of
    an already read ``state``; in eval mode on ``device``."""
    uri = weights_path(path) if state is None else (path or "<state dict>")
    model = FIDInceptionV3()
    load_state(model, read_state_dict(uri) if state is None else state, uri)
    return model.to(device).eval().requires_grad_(False)


def to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit images (B, C, H, W), C ∈ {1, 3} → (B, 3, H, W) (grey repeated, as convert("RGB"))."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise DpmotError(
            f"FID needs 8-bit images (B, 1 or 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}"
        )
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def pytorch_fid_input(pixels: torch.Tensor) -> torch.Tensor:
    """pytorch-fid: x = bilinear_299(p / 255) (``align_corners=False``), then 2x − 1."""
    x = F.interpolate(pixels.float() / 255, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def clean_fid_input(pixels: torch.Tensor) -> torch.Tensor:
    """clean-fid: x = clip(PIL_bicubic_299(p), 0, 255) per channel in float32 (no
    re-quantisation), then (x − 128) / 128."""
    p = pixels.cpu().numpy()
    x = np.empty((*p.shape[:2], SIZE, SIZE), np.float32)
    for i, c in np.ndindex(*p.shape[:2]):
        channel = Image.fromarray(p[i, c].astype(np.float32))  # mode "F"
        x[i, c] = np.asarray(channel.resize((SIZE, SIZE), resample=Image.Resampling.BICUBIC))
    x = torch.from_numpy(x.clip(0, 255)).to(pixels.device)
    return (x - 128) / 128


_INPUTS = {"pytorch-fid": pytorch_fid_input, "clean-fid": clean_fid_input}


def network_input(pixels: torch.Tensor, convention: FidConvention = "pytorch-fid") -> torch.Tensor:
    """8-bit images (B, C, H, W), C ∈ {1, 3} → network input (B, 3, 299, 299) float32 as
    the FID ``convention`` prepares them (see the module docstring)."""
    return _INPUTS[convention](to_rgb(pixels))


@torch.no_grad()
def inception_features(
    model: FIDInceptionV3,
    pixels: torch.Tensor,
    batch: int = 100,
    convention: FidConvention = "pytorch-fid",
) -> torch.Tensor:
    """Pool3 features (B, 2048) float64 of 8-bit images (B, C, H, W) under ``convention``."""
    device = next(model.parameters()).device
    out = [
        model(network_input(pixels[a : a + batch].to(device), convention)).double().cpu()
        for a in range(0, len(pixels), batch)
    ]
    return torch.cat(out) if out else torch.empty(0, FEATURES, dtype=torch.float64)
