"""Image helpers: decode/encode PNG and JPEG, array layouts, pixel scaling and resizing.

Conventions used across the package:

- Images inside dpmot-dist are NCHW float32 (what diffusers models take); decoded files and
  NHWC arrays are transposed once, at the edge.
- Pixel scaling (``scale``) maps stored values to the model's data range:
  ``minus1_1``: x / m · 2 − 1 for unsigned integers (m = the type's maximum, 255 for uint8)
  and 2x − 1 for floats in [0, 1]; ``minus1_1_from_255``: x / 127.5 − 1 for floats in
  [0, 255]; ``unit``: x / m for unsigned integers, floats in [0, 1] unchanged; ``none``:
  values as stored. ``auto`` (DDPM-style models work in [−1, 1]): ``minus1_1`` for unsigned
  integers; for float *images* the range of the first rows decides (logged once) — [0, 1] →
  ``minus1_1``, [0, 255] → ``minus1_1_from_255``, [−1, 1] or any other range → as stored
  (the latter with a warning); floats that are not images (latents: flat rows,
  ``layout: latent``, channels other than 1 or 3) are never rescaled. Every block is checked
  against the float range its scaling reads (:func:`check_range`: [0, 1] for ``minus1_1``
  and ``unit``, [0, 255] for ``minus1_1_from_255``; stored values as they are are not
  checked): a block outside it is refused, naming the file, the range found and the
  ``--scale`` that reads it.
- Colour modes: a data set of encoded images is decoded as RGB unless every file is
  greyscale (then L, one channel), as pytorch-fid, torch-fidelity and clean-fid convert each
  file to RGB on its own; :func:`peek_mode` reads a file's mode from its header only.
- Resizing (``size``) follows ADM's ``center_crop_arr``: scale the shorter side to ``size``,
  then crop the centre ``size × size`` square.
"""

from __future__ import annotations

import io
import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from dpmot_dist.errors import DpmotError

logger = logging.getLogger(__name__)

Scale = Literal["auto", "none", "minus1_1", "unit", "minus1_1_from_255"]
Scaling = Literal["none", "minus1_1", "unit", "minus1_1_from_255"]
Layout = Literal["auto", "nchw", "nhwc", "flat", "latent"]
ColourMode = Literal["auto", "L", "RGB"]
ValueRange = tuple[float, float]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
# The stored float range each scaling reads ("none": any values).
_FLOAT_RANGES: dict[str, ValueRange] = {
    "minus1_1": (0.0, 1.0),
    "unit": (0.0, 1.0),
    "minus1_1_from_255": (0.0, 255.0),
}
# What ``auto`` reads float images as: the first range that holds their values (as stored:
# [−1, 1], or any other range, with a warning).
_AUTO_RANGES: tuple[tuple[ValueRange, Scaling], ...] = (
    ((0.0, 1.0), "minus1_1"),
    ((-1.0, 1.0), "none"),
    ((0.0, 255.0), "minus1_1_from_255"),
)
_RANGE_TOL = 1e-3  # relative to the range's width: rounding of values computed in float


def resolve_scale(
    scale: Scale, dtype: np.dtype, head: np.ndarray | None = None, name: str = ""
) -> tuple[Scaling, ValueRange | None]:
    """The scaling that ``scale`` means for data stored as ``dtype``, and the stored range it
    reads (checked on every block by :func:`check_range`; None: not checked).

    ``head`` (the first rows of float *images*; None for latents) decides ``auto`` for floats
    (see the module docstring); ``name`` is the data set named in the log and in errors.
    """
    is_float = np.dtype(dtype).kind == "f"
    if scale != "auto":
        return scale, _FLOAT_RANGES.get(scale) if is_float else None
    if not is_float:
        return "minus1_1", None
    if head is None:
        return "none", None
    lo, hi = value_range(head)
    found = _auto_scale(lo, hi)
    where = f"{name}: float images with values in [{lo:.4g}, {hi:.4g}] (first {len(head)} rows)"
    if found is None:
        logger.warning(
            "%s fit none of [0, 1], [-1, 1], [0, 255]: read as stored (--scale none; "
            "--layout latent for latents)",
            where,
        )
        return "none", None
    (a, b), scaling = found
    how = "as stored" if scaling == "none" else "→ [-1, 1]"
    logger.info("%s: read as [%g, %g] %s (--scale %s chooses)", where, a, b, how, scaling)
    return scaling, _FLOAT_RANGES.get(scaling)


def value_range(x: np.ndarray) -> ValueRange:
    """(min, max) of an array's values."""
    return float(np.min(x)), float(np.max(x))


def _within(lo: float, hi: float, r: ValueRange) -> bool:
    tol = _RANGE_TOL * (r[1] - r[0])
    return lo >= r[0] - tol and hi <= r[1] + tol


def _auto_scale(lo: float, hi: float) -> tuple[ValueRange, Scaling] | None:
    return next(((r, s) for r, s in _AUTO_RANGES if _within(lo, hi, r)), None)


def check_range(x: np.ndarray, stored: ValueRange, scaling: Scaling, name: str) -> None:
    """Refuse floats outside the range ``stored`` that ``scaling`` reads (one line naming
    ``name``, the range found and the ``--scale`` that would read it)."""
    lo, hi = value_range(x)
    if _within(lo, hi, stored):
        return
    found = _auto_scale(lo, hi)
    if found is None:
        hint = "--scale none reads them as stored"
    else:
        (a, b), fit = found
        hint = f"--scale {fit} reads [{a:g}, {b:g}]"
    raise DpmotError(
        f"{name}: float values in [{lo:.4g}, {hi:.4g}], but --scale {scaling} reads "
        f"[{stored[0]:g}, {stored[1]:g}]; pass the --scale that fits ({hint})"
    )


def scale_pixels(x: np.ndarray, scale: Scaling) -> np.ndarray:
    """Stored values → float32 in the model's range (see the module docstring)."""
    m = float(np.iinfo(x.dtype).max) if x.dtype.kind == "u" else 1.0
    if scale == "minus1_1_from_255":
        m = 255.0
    y = x.astype(np.float32)
    if scale == "unit" and m != 1.0:
        y /= m
    elif scale in ("minus1_1", "minus1_1_from_255"):
        y *= 2.0 / m
        y -= 1.0
    return y


def resolve_layout(
    layout: Layout, shape: tuple[int, ...]
) -> Literal["nchw", "nhwc", "flat", "latent"]:
    """How to read an (N, *shape) array: ``nchw``/``nhwc`` images, ``flat`` vectors or
    ``latent`` arrays (rows of any shape, kept as stored and never rescaled).

    ``auto``: 1-D rows are flat; 2-D rows (H, W) are one-channel images; 3-D rows are NHWC
    when the last axis has 1, 3 or 4 entries and the first does not, NCHW otherwise.
    """
    if layout in ("flat", "latent"):
        return layout
    rank = len(shape)
    if layout in ("nchw", "nhwc"):
        if rank not in (2, 3):
            raise DpmotError(f"layout {layout} needs rows of shape (C, H, W), got {shape}")
        return layout
    if rank == 1:
        return "flat"
    if rank == 2:
        return "nchw"
    if rank == 3:
        return "nhwc" if shape[2] in (1, 3, 4) and shape[0] not in (1, 3, 4) else "nchw"
    raise DpmotError(f"rows of shape {shape} are neither vectors nor images; set layout=flat")


def is_image_rows(layout: str, shape: tuple[int, ...]) -> bool:
    """True when rows stored with ``shape`` in ``layout`` are images (1 or 3 channels), not
    latents or vectors: the rows whose float values ``auto`` reads by their range."""
    return layout in ("nchw", "nhwc") and chw_shape(shape, layout)[0] in (1, 3)


def chw_shape(shape: tuple[int, ...], layout: Literal["nchw", "nhwc"]) -> tuple[int, int, int]:
    """Per-row (C, H, W) of rows stored with ``shape`` in ``layout``."""
    if len(shape) == 2:
        return (1, *shape)
    return (shape[2], shape[0], shape[1]) if layout == "nhwc" else tuple(shape)


def to_nchw(x: np.ndarray, layout: Literal["nchw", "nhwc"]) -> np.ndarray:
    """An (N, H, W), (N, C, H, W) or (N, H, W, C) array as (N, C, H, W)."""
    if x.ndim == 3:
        return x[:, None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nhwc" else x


def resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) after scaling the shorter side of an H × W image to ``size``."""
    r = size / min(h, w)
    return max(size, round(h * r)), max(size, round(w * r))


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float → (N, C, size, size): shorter side to ``size``, centre crop."""
    h, w = resized_hw(x.shape[2], x.shape[3], size)
    if (h, w) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, :, top : top + size, left : left + size]


def image_mode(img: Image.Image) -> Literal["L", "RGB"]:
    """The mode an image is decoded to: ``L`` for grey-scale files, ``RGB`` otherwise."""
    return "L" if img.mode in _GRAY_MODES else "RGB"


def peek_mode(data: bytes) -> Literal["L", "RGB"] | None:
    """:func:`image_mode` of encoded bytes from the header alone (PIL decodes no pixels to
    open a file); None when the bytes end before the header does, or are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return image_mode(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return None


def decode_image(
    data: bytes, name: str, mode: Literal["L", "RGB"] | None = None, size: int | None = None
) -> np.ndarray:
    """Decode PNG/JPEG bytes to an (H, W, C) uint8 array.

    ``mode`` forces ``L`` (C = 1) or ``RGB`` (C = 3; alpha dropped); None picks it from the
    file (:func:`image_mode`). ``size`` resizes as :func:`resize_center_crop` does (PIL bicubic
    on the shorter side, then the centre crop). ``name`` is the object named in errors.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert(mode or image_mode(img))
            if size is not None:
                img = _pil_resize_center_crop(img, size)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DpmotError(f"{name}: not a readable PNG/JPEG image ({reason})") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def _pil_resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's ``center_crop_arr`` on a PIL image."""
    h, w = resized_hw(img.height, img.width, size)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W), (H, W, 1), (H, W, 3) or (C, H, W) uint8 image."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(x: np.ndarray, scale: Scaling) -> np.ndarray:
    """Invert :func:`scale_pixels` for uint8 output (values clipped to [0, 255])."""
    y = np.asarray(x, dtype=np.float32)
    if scale in ("minus1_1", "minus1_1_from_255"):
        y = (y + 1.0) * 127.5
    elif scale == "unit":
        y = y * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)
