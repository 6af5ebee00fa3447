"""prepare on images: float value ranges (scale), latents never rescaled, colour modes (mode)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_prepare import config, error_of, expected_targets

from dpmot_dist import cli
from dpmot_dist.io import datasets, images, storage
from dpmot_dist.pipelines.prepare import run_prepare


@pytest.mark.parametrize(
    ("top", "scale"), [(1.0, "minus1_1"), (255.0, "minus1_1_from_255"), (None, "none")]
)
def test_float_images_are_read_by_their_range(tmp_path: Path, rng, top, scale) -> None:
    """[0, 1] and [0, 255] floats reach the targets in [−1, 1]; [−1, 1] floats as stored."""
    x01 = rng.uniform(0, 1, (9, 6, 6, 3))  # NHWC
    stored = (x01 * top if top else 2 * x01 - 1).astype(np.float32)
    np.save(tmp_path / "x.npy", stored)
    cfg = config(tmp_path / "x.npy", tmp_path / "out", rows_per_part=4)
    m = run_prepare(cfg)
    assert m["scale"] == scale and m["data_shape"] == [3, 6, 6]
    x0 = (2 * x01 - 1).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(
        datasets.load_targets(tmp_path / "out"), expected_targets(x0, cfg), atol=1e-5
    )


def test_a_later_block_outside_the_range_is_refused(tmp_path: Path, rng) -> None:
    """The first 1,024 rows (what ``auto`` looks at) are [0, 1]; later ones are [0, 255]:
    refused in one line, nothing committed."""
    x = rng.uniform(0, 1, (1100, 3, 2, 2)).astype(np.float32)
    x[1050:] *= 255
    np.save(tmp_path / "x.npy", x)
    cfg = config(tmp_path / "x.npy", tmp_path / "out", rows_per_part=512)
    message = error_of(run_prepare, cfg)
    assert message.startswith(f"{tmp_path / 'x.npy'} (rows 1024..1099): float values in [")
    assert "--scale minus1_1 reads [0, 1]" in message and "--scale minus1_1_from_255" in message
    assert not storage.is_success(tmp_path / "out")


def test_latents_are_never_rescaled(tmp_path: Path, rng) -> None:
    z = rng.uniform(0, 1, (5, 3, 4, 4)).astype(np.float32)  # would read as [0, 1] images
    np.save(tmp_path / "z.npy", z)
    cfg = config(tmp_path / "z.npy", tmp_path / "out", layout="latent")
    m = run_prepare(cfg)
    assert m["layout"] == "latent" and m["scale"] == "none" and m["data_shape"] == [3, 4, 4]
    np.testing.assert_allclose(
        datasets.load_targets(tmp_path / "out"), expected_targets(z, cfg), atol=1e-6
    )
    bad = config(tmp_path / "z.npy", tmp_path / "b", layout="latent", scale="minus1_1")
    assert "never rescaled" in error_of(run_prepare, bad)


def test_mode_option_of_prepare(tmp_path: Path, rng) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    grey = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    (folder / "0.png").write_bytes(images.encode_png(grey))
    (folder / "1.png").write_bytes(images.encode_png(rng.integers(0, 256, (4, 4, 3), np.uint8)))
    for mode, channels in (("auto", 3), ("L", 1)):
        out = tmp_path / mode
        args = ["prepare", "--data", str(folder), "--out", str(out), "--step", "10"]
        assert cli.main([*args, "--workers", "0", "--mode", mode]) == 0
        m = datasets.read_targets_manifest(out)
        assert m["data_shape"] == [channels, 4, 4] and m["source"]["mode"] in ("RGB", "L")
