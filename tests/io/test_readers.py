"""dpmot_dist.io.readers: the colour mode of encoded images is the data set's, never one file's."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import images, readers, storage
from dpmot_dist.io.readers import open_source


def jpeg_with_big_header(a: np.ndarray) -> bytes:
    """A JPEG whose EXIF block (60 kB) is longer than the header bytes the mode scan fetches."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", exif=exif.tobytes(), quality=100)
    return buf.getvalue()


def mixed_folder(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """One grey PNG first (sorted), then 7 RGB PNGs: the case that used to be read as grey."""
    root.mkdir()
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    (root / "0-grey.png").write_bytes(images.encode_png(grey))
    colour = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(7)]
    for i, img in enumerate(colour):
        (root / f"{i + 1}-rgb.png").write_bytes(images.encode_png(img))
    return grey, colour


def read_all(source: readers.Source) -> np.ndarray:
    """Every row, read block by block through the view shipped to workers."""
    view = source.worker_view()
    return np.concatenate([view.read(b) for b in source.blocks(3)])


def test_mixed_folder_decodes_rgb_files_as_rgb(tmp_path: Path, rng) -> None:
    grey, colour = mixed_folder(tmp_path / "imgs", rng)
    source = open_source(tmp_path / "imgs")
    assert source.row_shape == (6, 5, 3) and source.describe()["mode"] == "RGB"
    x = read_all(source)
    np.testing.assert_array_equal(x[1:], np.stack(colour))  # every RGB file as it is
    np.testing.assert_array_equal(x[0], np.repeat(grey[:, :, None], 3, 2))  # grey: repeated


def test_all_grey_folder_is_one_channel(tmp_path: Path, rng, caplog) -> None:
    folder = tmp_path / "grey"
    folder.mkdir()
    greys = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    for i, g in enumerate(greys):
        (folder / f"{i}.png").write_bytes(images.encode_png(g))
    with caplog.at_level(logging.INFO, logger="dpmot_dist.io.readers"):
        source = open_source(folder)
    assert source.row_shape == (4, 4, 1)
    assert "every image is greyscale" in caplog.text
    np.testing.assert_array_equal(read_all(source)[:, :, :, 0], greys)
    forced = open_source(folder, mode="RGB")
    assert forced.row_shape == (4, 4, 3)
    np.testing.assert_array_equal(read_all(forced), np.repeat(greys[..., None], 3, 3))


def test_mode_l_converts_colour_files(tmp_path: Path, rng) -> None:
    _, colour = mixed_folder(tmp_path / "imgs", rng)
    source = open_source(tmp_path / "imgs", mode="L")
    assert source.row_shape == (6, 5, 1)
    luma = np.asarray(Image.fromarray(colour[0]).convert("L"))
    np.testing.assert_array_equal(read_all(source)[1, :, :, 0], luma)


def counted(fn, calls: dict[str, int], name: str):
    """``fn``, counting its calls in ``calls[name]``."""

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def test_mode_scan_stops_at_the_first_colour_file(tmp_path: Path, rng, monkeypatch) -> None:
    """A colour data set costs one batch of header reads, and no file is decoded for it."""
    folder = tmp_path / "many"
    folder.mkdir()
    colour = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    for i in range(3 * readers._MODE_BATCH):
        (folder / f"{i:04d}.png").write_bytes(images.encode_png(colour))
    calls = {"peek_mode": 0, "decode_image": 0}
    for name in calls:
        monkeypatch.setattr(images, name, counted(getattr(images, name), calls, name))
    assert open_source(folder).row_shape == (4, 4, 3)
    assert calls == {"peek_mode": 1, "decode_image": 1}  # one header; one decode: the row shape


def test_headers_longer_than_the_scan_reads(tmp_path: Path, rng) -> None:
    folder = tmp_path / "jpg"
    folder.mkdir()
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    (folder / "a.jpg").write_bytes(jpeg_with_big_header(grey))
    (folder / "b.jpg").write_bytes(jpeg_with_big_header(np.stack([grey] * 3, 2)))
    assert len((folder / "a.jpg").read_bytes()) > readers._IMAGE_HEAD_BYTES
    assert open_source(folder).row_shape == (8, 8, 3)  # b.jpg is RGB (its channels are equal)


def test_unreadable_file_in_the_scan_is_one_line(tmp_path: Path, rng) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(images.encode_png(rng.integers(0, 256, (4, 4), np.uint8)))
    (folder / "b.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(DpmotError) as e:
        open_source(folder)
    assert str(e.value).startswith(f"{folder / 'b.png'}: not a readable PNG/JPEG image")


def test_parquet_image_column_mode_is_the_data_set_s(tmp_path: Path, rng) -> None:
    grey = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    colour = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    pngs = [images.encode_png(grey)] * 70 + [images.encode_png(colour)]  # RGB in a later batch
    pq.write_table(pa.table({"png": pa.array(pngs, pa.binary())}), tmp_path / "x.parquet")
    source = open_source(tmp_path / "x.parquet")
    assert source.row_shape == (4, 4, 3) and source.describe()["mode"] == "RGB"
    x = read_all(source)
    np.testing.assert_array_equal(x[-1], colour)
    np.testing.assert_array_equal(x[0], np.repeat(grey[:, :, None], 3, 2))
    assert open_source(tmp_path / "x.parquet", mode="L").row_shape == (4, 4, 1)


def test_mode_scan_on_s3(s3_bucket: str, rng) -> None:
    """The header scan through s3fs (ranged reads; a header longer than them; an empty object)."""
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    storage.write_bytes_atomic(f"{s3_bucket}/imgs/0.jpg", jpeg_with_big_header(grey))
    storage.write_bytes_atomic(f"{s3_bucket}/imgs/1.png", images.encode_png(grey))
    assert open_source(f"{s3_bucket}/imgs").row_shape == (8, 8, 1)
    colour = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    storage.write_bytes_atomic(f"{s3_bucket}/imgs/2.png", images.encode_png(colour))
    source = open_source(f"{s3_bucket}/imgs")
    assert source.row_shape == (8, 8, 3)
    np.testing.assert_array_equal(read_all(source)[2], colour)
    storage.write_bytes_atomic(f"{s3_bucket}/empty/0.png", b"")
    with pytest.raises(DpmotError, match=r"empty/0.png: not a readable PNG/JPEG image"):
        open_source(f"{s3_bucket}/empty")
