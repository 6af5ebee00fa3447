"""Class labels through ``prepare``: image-folder classes, Parquet columns, ``.npz`` arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, images
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare


def config(data: Path, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(data=str(data), out=str(out), **{"step": 10, "workers": 0, **kw})


def error_of(cfg: PrepareConfig) -> str:
    with pytest.raises(DpmotError) as info:
        run_prepare(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


def class_folder(root: Path, rng, counts: dict[str, int], size: int = 8) -> Path:
    """PNG files under one subfolder per class (torchvision ImageFolder layout)."""
    for name, k in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(k):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            (root / name / f"{i:03d}.png").write_bytes(images.encode_png(pixels))
    return root


def test_image_folder_classes_become_labels_and_copies_keep_them(tmp_path, rng):
    data = class_folder(tmp_path / "data", rng, {"dog": 2, "cat": 3, "emu": 1})
    m = run_prepare(config(data, tmp_path / "t", copies=2, rows_per_part=3))
    # sorted class names → ids: cat 0, dog 1, emu 2; files are read in path order
    expect = np.repeat([0, 0, 0, 1, 1, 2], 2)
    assert m["labels"]["classes"] == ["cat", "dog", "emu"]
    assert m["labels"]["num_classes"] == 3 and m["labels"]["counts"] == [6, 4, 2]
    np.testing.assert_array_equal(datasets.load_target_labels(tmp_path / "t"), expect)
    np.testing.assert_array_equal(datasets.load_target_labels(tmp_path / "t", 5, 9), expect[5:9])
    table = pq.read_table(tmp_path / "t")  # one data set for standard readers, label included
    assert table.schema.field("label").type == pa.int64()
    assert datasets.load_targets(tmp_path / "t").shape == (12, 192)
    off = run_prepare(config(data, tmp_path / "t2", label_column="none"))
    assert off["labels"] is None and datasets.load_target_labels(tmp_path / "t2") is None


def test_npz_and_parquet_labels(tmp_path, rng):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = np.array([2, 0, 1, 1, 0])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    run_prepare(config(tmp_path / "d.npz", tmp_path / "a"))  # x picked: y is the labels
    np.testing.assert_array_equal(datasets.load_target_labels(tmp_path / "a"), y)
    np.savez(tmp_path / "e.npz", data=x, labels=y.astype(np.float64))
    run_prepare(config(tmp_path / "e.npz", tmp_path / "b"))
    np.testing.assert_array_equal(datasets.load_target_labels(tmp_path / "b"), y)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 3)
    pq.write_table(pa.table({"v": vectors, "label": pa.array(y)}), tmp_path / "p.parquet")
    m = run_prepare(config(tmp_path / "p.parquet", tmp_path / "c", copies=3))
    assert m["labels"]["origin"] == "column label" and m["labels"]["counts"] == [6, 6, 3]
    np.testing.assert_array_equal(datasets.load_target_labels(tmp_path / "c"), np.repeat(y, 3))
    pq.write_table(pa.table({"v": vectors, "cls": pa.array(y)}), tmp_path / "q.parquet")
    run_prepare(config(tmp_path / "q.parquet", tmp_path / "d", label_column="cls"))
    np.testing.assert_array_equal(datasets.load_target_labels(tmp_path / "d"), y)
    assert datasets.load_target_labels(tmp_path / "c", 0, 0).shape == (0,)


@pytest.mark.parametrize(
    "case, message",
    [
        ("short", "5 labels for 6 rows (missing for some rows)"),
        ("fraction", "(row 2): label 1.5 is not an integer"),
        ("negative", "(row 4): label -1 is negative"),
        ("nan", "(row 1): label nan is missing"),
        ("null", "(row 3): label is missing"),
        ("strings", "is string, not integers"),
        ("loose", "not in a class subfolder"),
        ("absent", "no label column 'cls'"),
    ],
)
def test_bad_labels_are_one_line_errors_naming_the_file(tmp_path, rng, case, message):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 3)
    y = {
        "short": np.arange(5),
        "fraction": np.array([0, 1, 1.5, 0, 1, 0]),
        "negative": np.array([0, 1, 1, 0, -1, 0]),
        "nan": np.array([0, np.nan, 1, 0, 1, 0]),
    }
    kw = {}
    if case in y:
        data = tmp_path / "d.npz"
        np.savez(data, x=x, y=y[case])
        name = f"{data}[y]"
    elif case in ("null", "strings", "absent"):
        data = name = tmp_path / "d.parquet"
        column = pa.array([0, 1, 0, None, 1, 0]) if case == "null" else pa.array(list("abcdef"))
        pq.write_table(pa.table({"v": vectors, "label": column}), data)
        kw = {"label_column": "cls"} if case == "absent" else {}
    else:
        data = class_folder(tmp_path / "data", rng, {"a": 2})
        (data / "stray.png").write_bytes((data / "a" / "000.png").read_bytes())
        name = data / "stray.png"
    msg = error_of(config(data, tmp_path / "out", **kw))
    assert str(name) in msg and message in msg
    assert not (tmp_path / "out" / "part-00000.parquet").exists()  # checked before writing
