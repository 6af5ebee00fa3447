"""dpmot_dist.io.images: value ranges (scale), colour modes from headers, layouts."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import images


def encoded(a: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Value ranges


@pytest.mark.parametrize(
    ("lo", "hi", "scale", "stored"),
    [
        (0.0, 1.0, "minus1_1", (0.0, 1.0)),  # [0, 1] floats → 2x − 1
        (0.0, 254.0, "minus1_1_from_255", (0.0, 255.0)),  # [0, 255] floats → x / 127.5 − 1
        (-1.0, 0.9, "none", None),  # already in [−1, 1]: as today
        (-3.0, 3.0, "none", None),  # no image range: as stored, with a warning
    ],
)
def test_auto_reads_float_images_by_their_range(lo, hi, scale, stored, rng, caplog) -> None:
    head = rng.uniform(lo, hi, (16, 3, 4, 4)).astype(np.float32)
    head.flat[:2] = lo, hi
    with caplog.at_level(logging.INFO, logger="dpmot_dist.io.images"):
        assert images.resolve_scale("auto", head.dtype, head, "x.npy") == (scale, stored)
    (record,) = caplog.records  # logged once, naming the data set and the range found
    assert record.getMessage().startswith(f"x.npy: float images with values in [{lo:.4g}, ")
    assert (record.levelno == logging.WARNING) == (lo == -3.0)


def test_auto_without_a_head_never_rescales() -> None:
    """uint8 → [−1, 1]; floats that are not images (latents) are kept as stored."""
    assert images.resolve_scale("auto", np.dtype(np.uint8)) == ("minus1_1", None)
    assert images.resolve_scale("auto", np.dtype(np.float32)) == ("none", None)
    assert images.resolve_scale("none", np.dtype(np.float32)) == ("none", None)
    assert images.resolve_scale("minus1_1", np.dtype(np.float64)) == ("minus1_1", (0.0, 1.0))
    assert images.resolve_scale("minus1_1", np.dtype(np.uint8)) == ("minus1_1", None)


def test_scalings_map_their_range_to_minus1_1() -> None:
    x = np.array([0.0, 0.5, 1.0], np.float32)
    np.testing.assert_allclose(images.scale_pixels(x, "minus1_1"), [-1, 0, 1])
    np.testing.assert_allclose(images.scale_pixels(x * 255, "minus1_1_from_255"), [-1, 0, 1])
    np.testing.assert_allclose(images.scale_pixels(x, "none"), x)
    u8 = np.array([0, 51, 255], np.uint8)
    np.testing.assert_allclose(images.scale_pixels(u8, "minus1_1"), [-1, 51 / 127.5 - 1, 1])
    as_255 = images.scale_pixels(u8.astype(np.float32), "minus1_1_from_255")
    np.testing.assert_array_equal(as_255, images.scale_pixels(u8, "minus1_1"))
    assert images.to_uint8(images.scale_pixels(u8, "minus1_1"), "minus1_1").tolist() == [0, 51, 255]


def test_a_block_outside_the_range_read_is_refused() -> None:
    block = np.array([[0.0, 17.0, 254.5]], np.float32)
    with pytest.raises(DpmotError) as e:
        images.check_range(block, (0.0, 1.0), "minus1_1", "x.npy (rows 1024..2047)")
    message = str(e.value)
    assert message.startswith("x.npy (rows 1024..2047): float values in [0, 254.5]")
    assert "--scale minus1_1 reads [0, 1]" in message
    assert "--scale minus1_1_from_255 reads [0, 255]" in message and "\n" not in message
    images.check_range(block / 255, (0.0, 1.0), "minus1_1", "x.npy")  # in range: passes
    images.check_range(np.float32([[1.0 + 1e-6]]), (0.0, 1.0), "unit", "x.npy")  # rounding


# ---------------------------------------------------------------------------------------------
# Colour modes and layouts


def test_peek_mode_reads_headers_only(rng) -> None:
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        assert images.peek_mode(encoded(rgb, fmt)[:1000]) == "RGB"  # no pixel data needed
        assert images.peek_mode(encoded(rgb[:, :, 0], fmt)[:1000]) == "L"
    assert images.peek_mode(encoded(rgb, "PNG", optimize=True)[:20]) is None  # cut in the header
    assert images.peek_mode(b"not an image") is None
    assert images.peek_mode(encoded(np.stack([rgb[:, :, 0]] * 2, 2), "PNG")) == "L"  # LA


def test_decode_converts_each_file_to_the_mode_asked(rng) -> None:
    grey = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    as_rgb = images.decode_image(encoded(grey), "g.png", "RGB")
    assert as_rgb.shape == (5, 6, 3) and (as_rgb == grey[:, :, None]).all()
    np.testing.assert_array_equal(images.decode_image(encoded(rgb), "c.png", "RGB"), rgb)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(images.decode_image(encoded(rgb), "c.png", "L")[:, :, 0], luma)


def test_latent_and_image_rows() -> None:
    assert images.resolve_layout("latent", (4, 8, 8)) == "latent"
    assert images.is_image_rows("nchw", (3, 8, 8)) and images.is_image_rows("nhwc", (8, 8, 1))
    assert images.is_image_rows("nchw", (8, 8))  # (H, W): one channel
    assert not images.is_image_rows("nchw", (4, 8, 8))  # four channels: latents
    assert not images.is_image_rows("latent", (3, 8, 8))
    assert not images.is_image_rows("flat", (12,))
