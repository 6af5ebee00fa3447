"""Latent and class-conditional diffusion end to end: VAE decoding, labels through the OT map."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testlib import Zero, tiny_vae

from dpmot_dist.io import datasets
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare
from dpmot_dist.pipelines.sample import SampleConfig, run_sample


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png_pixels(data: bytes) -> np.ndarray:
    """(C, H, W) uint8 of PNG bytes."""
    return np.asarray(Image.open(io.BytesIO(data))).transpose(2, 0, 1)


def write_zero_model(path: Path) -> str:
    torch.jit.save(torch.jit.script(Zero()), str(path))
    return f"torchscript:{path}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_vae_round_trip_through_prepare_and_sample(tmp_path, rng):
    """encode in prepare, decode in sample = diffusers' own decode(encode(image))."""
    vae = tiny_vae(scaling_factor=0.7, shift_factor=0.1)
    vae.save_pretrained(tmp_path / "vae")
    pixels = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    prep = PrepareConfig(
        data=str(tmp_path / "images.npy"),
        out=str(tmp_path / "targets"),
        vae=str(tmp_path / "vae"),
        schedule="ve",
        sigma_min=1e-6,
        step=0,
        workers=0,
    )
    run_prepare(prep)
    np.save(tmp_path / "h.npy", np.zeros(4))
    out = tmp_path / "samples"
    cfg = SampleConfig(
        targets=prep.out,
        potential=str(tmp_path / "h.npy"),
        model=write_zero_model(tmp_path / "zero.pt"),
        num=4,
        chunk=3,
        sampler="ddim",
        nfe=1,
        out=str(out),
        backend="torch",
    )
    s = run_sample(cfg)
    m, table = datasets.read_samples(str(out))
    assert m["decoded"] and m["image_shape"] == [3, 16, 16] and m["data_shape"] == [4, 8, 8]
    assert s["decode_seconds"] > 0 and s["samples_per_s_without_decode"] > s["samples_per_s"]
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2) / 127.5 - 1).float()
    with torch.no_grad():
        direct = vae.decode(vae.encode(x).latent_dist.mean).sample.numpy()
    direct8 = np.clip(np.rint((direct + 1) * 127.5), 0, 255)
    for row in table.to_pylist():
        ours = png_pixels(row["png"]).astype(np.float64)
        i = row["ot_index"]
        assert ours.shape == (3, 16, 16)
        assert np.abs(ours - direct8[i]).max() <= 1  # the same decode, up to rounding
        err_ours = np.abs(ours - pixels[i].transpose(2, 0, 1)).mean()
        err_direct = np.abs(direct8[i] - pixels[i].transpose(2, 0, 1)).mean()
        assert err_ours == pytest.approx(err_direct, abs=0.05)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """A random-init FID Inception state dict in a file (the real loader reads it)."""
    from dpmot_dist.evaluation import inception

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(inception.FIDInceptionV3().state_dict(), path)
    return str(path)
