"""The FID Inception-v3: where its weights are found, and its features under both FID
conventions against independent computations (random weights built here; nothing is
downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dpmot_dist.errors import DpmotError
from dpmot_dist.evaluation import inception

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


def random_fid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in pytorch-fid's state-dict layout (``fid_inception_v3()``'s keys):
    random convolutions and linear layer, and batch norms that are not the identity."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in inception.FIDInceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v
        elif k.endswith(("running_var", "bn.weight")):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("running_mean", "bn.bias")):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:  # conv and fc weights: He-scaled, so activations keep their size through depth
            fan_in = v[0].numel() if v.ndim > 1 else 1
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="module")
def fid_state() -> dict[str, torch.Tensor]:
    return random_fid_state()


@pytest.fixture(scope="module")
def model(fid_state) -> inception.FIDInceptionV3:
    m = inception.FIDInceptionV3()
    inception.load_state(m, fid_state, "<random>")
    return m.eval().requires_grad_(False)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch, fid_state) -> Path:
    """A torch hub cache (``$TORCH_HOME``) holding pytorch-fid's weight file, as pytorch-fid
    leaves it; no ``$DPMOT_INCEPTION_WEIGHTS``."""
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(fid_state, checkpoints / PYTORCH_FID_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    return tmp_path / "torch"


def pixels(n: int, h: int, w: int, c: int = 3, seed: int = 1) -> torch.Tensor:
    """Random 8-bit images (n, c, h, w) with some structure (smooth parts and noise)."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, c, 4, 4, generator=g), size=(h, w), mode="bilinear")
    x = 200 * smooth + 55 * torch.rand(n, c, h, w, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-image ‖a − b‖ / ‖b‖."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


# ---------------------------------------------------------------------------------------------
# Where the weights are found


def test_weights_found_in_torch_hub_cache(torch_home: Path, fid_state) -> None:
    found = inception.weights_path()
    assert found == str(torch_home / "hub" / "checkpoints" / PYTORCH_FID_FILE)
    model = inception.load_inception()
    assert torch.equal(
        model.Mixed_7c.branch_pool.conv.weight, fid_state["Mixed_7c.branch_pool.conv.weight"]
    )


def test_weights_found_under_xdg_cache_home(tmp_path: Path, monkeypatch, fid_state) -> None:
    """Without $TORCH_HOME torch's cache is $XDG_CACHE_HOME/torch (else ~/.cache/torch)."""
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(fid_state, checkpoints / inception.WEIGHT_FILES[1])  # torch-fidelity's name
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert inception.weights_path() == str(checkpoints / inception.WEIGHT_FILES[1])


def test_explicit_weights_come_first(torch_home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "env.pth"))
    assert inception.weights_path() == str(tmp_path / "env.pth")
    assert inception.weights_path(str(tmp_path / "given.pth")) == str(tmp_path / "given.pth")


def test_no_weights_error_names_every_place(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(DpmotError) as e:
        inception.load_inception()
    message = str(e.value)
    assert "\n" not in message and "--inception" in message and inception.WEIGHTS_ENV in message
    for name in inception.WEIGHT_FILES:
        assert os.path.join(str(tmp_path / "empty"), "hub", "checkpoints", name) in message
    assert "nothing is downloaded" in message


# ---------------------------------------------------------------------------------------------
# pytorch-fid's convention


class Conv(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias) → batch norm (ε = 0.001) → ReLU."""

    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's patch: TF's average pool does not count the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class RefA(nn.Module):
    """pytorch-fid's ``FIDInceptionA`` (torchvision's ``InceptionA`` layers)."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = Conv(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = chain(x, self.branch5x5_1, self.branch5x5_2)
        b3 = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        return torch.cat([b1, b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class RefB(nn.Module):
    """torchvision's ``InceptionB`` (Mixed_6a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class RefC(nn.Module):
    """pytorch-fid's ``FIDInceptionC``."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)
        d = chain(
            x,
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        )
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(tf_avg_pool(x))], 1)


class RefD(nn.Module):
    """torchvision's ``InceptionD`` (Mixed_7a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = chain(x, self.branch3x3_1, self.branch3x3_2)
        b7 = chain(
            x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4
        )
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class RefE(nn.Module):
    """pytorch-fid's ``FIDInceptionE_1`` (TF average pool) and ``FIDInceptionE_2`` (max pool)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.max_pool:
            pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pool = tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class PytorchFidReference(nn.Module):
    """pytorch-fid 0.3.0's ``InceptionV3([3])`` re-written from its source, torchvision-free:
    ``fid_inception_v3()``'s layers (so its state dict loads as is) run as its four blocks,
    after its input step: bilinear resize of p / 255 to 299 × 299, then 2x − 1."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = Conv(80, 192, kernel_size=3)
        self.Mixed_5b = RefA(192, 32)
        self.Mixed_5c = RefA(256, 64)
        self.Mixed_5d = RefA(288, 64)
        self.Mixed_6a = RefB(288)
        self.Mixed_6b = RefC(768, 128)
        self.Mixed_6c = RefC(768, 160)
        self.Mixed_6d = RefC(768, 160)
        self.Mixed_6e = RefC(768, 192)
        self.Mixed_7a = RefD(768)
        self.Mixed_7b = RefE(1280, max_pool=False)
        self.Mixed_7c = RefE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        x = p.float() / 255  # torchvision's ToTensor, as pytorch-fid's data set applies it
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        pool = nn.MaxPool2d(kernel_size=3, stride=2)
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, pool)
        x = chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, pool)
        x = chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b)
        x = chain(x, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)
        x = chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, nn.AdaptiveAvgPool2d((1, 1)))
        return x.flatten(1)


def test_pool3_features_equal_pytorch_fid_reimplementation(model, fid_state) -> None:
    ref = PytorchFidReference()
    ref.load_state_dict(fid_state)  # strict: the same state-dict layout
    ref = ref.eval().requires_grad_(False)
    p = pixels(3, 40, 48)
    with torch.no_grad():
        expected = ref(p).double()
        grey_expected = ref(p[:, :1].expand(-1, 3, -1, -1)).double()
    ours = inception.inception_features(model, p)
    assert ours.shape == (3, 2048) and expected.abs().max() > 0
    assert relative_error(ours, expected) < 1e-5
    # a one-channel image is the RGB image with three equal channels (convert("RGB"))
    assert relative_error(inception.inception_features(model, p[:, :1]), grey_expected) < 1e-5


def _pytorch_fid():
    """pytorch-fid's module, or None where it (or torchvision, which it imports) cannot load."""
    try:
        from pytorch_fid import inception as pytorch_fid_inception
    except (ImportError, RuntimeError):  # torchvision built for another torch raises RuntimeError
        return None
    return pytorch_fid_inception


@pytest.mark.skipif(_pytorch_fid() is None, reason="pytorch-fid (with torchvision) not installed")
def test_pool3_features_equal_pytorch_fid(torch_home: Path, model) -> None:
    """pytorch-fid itself, loading the random weights from the torch hub cache it uses."""
    theirs = _pytorch_fid().InceptionV3([3]).eval()
    p = pixels(3, 40, 48)
    with torch.no_grad():
        expected = theirs(p.float() / 255)[0].flatten(1).double()
    assert relative_error(inception.inception_features(model, p), expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# clean-fid's convention


def clean_fid_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's ``make_resizer("PIL", False, "bicubic", (299, 299))`` on an (H, W, 3)
    uint8 image: each channel as a float32 ("F") PIL image, bicubic, clipped to [0, 255]."""
    channels = []
    for c in range(3):
        img = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
        img = img.resize((299, 299), resample=Image.BICUBIC)
        channels.append(np.asarray(img).clip(0, 255).reshape(299, 299, 1))
    return np.concatenate(channels, axis=2).astype(np.float32)


def test_clean_fid_convention_matches_independent_computation(model) -> None:
    p = pixels(2, 37, 52, seed=3)
    resized = np.stack([clean_fid_resize(img) for img in p.permute(0, 2, 3, 1).numpy()])
    x = (torch.from_numpy(resized).permute(0, 3, 1, 2) - 128) / 128  # clean-fid's InceptionV3W
    with torch.no_grad():
        expected = model(x).double()
    ours = inception.inception_features(model, p, convention="clean-fid")
    assert relative_error(ours, expected) < 1e-5
    # the two conventions see different inputs: their features differ
    assert relative_error(inception.inception_features(model, p), expected) > 1e-3


def test_network_input_ranges() -> None:
    """Black and white map to −1 and 1 under pytorch-fid, −1 and 127/128 under clean-fid."""
    p = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(8).reshape(1, 1, 4, 4)
    torch_in = inception.network_input(p, "pytorch-fid")
    clean_in = inception.network_input(p, "clean-fid")
    assert torch_in.shape == clean_in.shape == (1, 3, 299, 299)
    # resizing by interpolation may land a float32 rounding step off the end points
    assert torch_in.min().item() == pytest.approx(-1, abs=1e-6)
    assert torch_in.max().item() == pytest.approx(1, abs=1e-6)
    assert clean_in.min().item() == pytest.approx(-1, abs=1e-6)
    assert clean_in.max().item() == pytest.approx(127 / 128, abs=1e-6)
    with pytest.raises(DpmotError, match="8-bit images"):
        inception.network_input(p.float())
