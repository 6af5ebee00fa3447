"""Tests for dpmot_dist.io.storage on local disk, file:// URLs and a real (moto) S3 server."""

from __future__ import annotations

import errno
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from fsspec.implementations.local import LocalFileSystem

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, storage

DENIED = "access denied (check AWS credentials / AWS_ENDPOINT_URL)"


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(params=["local", "file", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A writable folder URI: a plain path, a file:// URL or an S3 prefix on the moto server."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/data"
    if request.param == "file":
        return f"file://{tmp_path}/data"
    return str(tmp_path / "data")


def listing(uri: str) -> list[str]:
    """Base names of everything under a folder URI (recursively)."""
    fs, path = storage.url_to_fs(uri)
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))


def make_targets(rng: np.random.Generator, n: int = 10, shape: tuple[int, ...] = (2, 3)):
    """A small float32 targets array (n, *shape)."""
    return rng.normal(size=(n, *shape)).astype(np.float32)


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a Parquet file (replacing a part with something else)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())


def error_of(fn, *args, **kwargs) -> str:
    """The message of the DpmotError that ``fn(*args, **kwargs)`` raises."""
    with pytest.raises(DpmotError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Bytes, JSON, npy, markers


def test_join_and_url_to_fs(tmp_path) -> None:
    assert storage.join("s3://b/x/", "/y", "z.npy") == "s3://b/x/y/z.npy"
    assert storage.join(str(tmp_path), "a") == f"{tmp_path}/a"
    fs, path = storage.url_to_fs(f"file://{tmp_path}/a")
    assert isinstance(fs, LocalFileSystem) and path == f"{tmp_path}/a"
    assert "nosuchproto://x" in error_of(storage.url_to_fs, "nosuchproto://x")


def test_bytes_json_npy_round_trip(root: str, rng: np.random.Generator) -> None:
    storage.write_bytes_atomic(storage.join(root, "sub", "a.bin"), b"abc")
    assert storage.read_bytes(storage.join(root, "sub", "a.bin")) == b"abc"
    storage.write_bytes_atomic(storage.join(root, "sub", "a.bin"), b"replaced")
    assert storage.read_bytes(storage.join(root, "sub", "a.bin")) == b"replaced"
    obj = {"kind": "x", "values": [1, 2.5, None], "nested": {"a": "b"}}
    storage.write_json_atomic(storage.join(root, "o.json"), obj)
    assert storage.read_json(storage.join(root, "o.json")) == obj
    for arr in (rng.normal(size=(4, 3)), np.arange(5, dtype=np.int32), np.float16([1, 2])):
        storage.save_npy(storage.join(root, "a.npy"), arr)
        back = storage.load_npy(storage.join(root, "a.npy"))
        assert back.dtype == arr.dtype and np.array_equal(back, arr)
    assert storage.exists(storage.join(root, "o.json"))
    assert not storage.exists(storage.join(root, "missing.json"))


def test_atomic_write_leaves_no_temp_files(root: str) -> None:
    for k in range(3):
        storage.write_bytes_atomic(storage.join(root, f"f{k}.bin"), bytes([k]) * 100)
        storage.write_json_atomic(storage.join(root, "m.json"), {"k": k})
    storage.save_npy(storage.join(root, "a.npy"), np.zeros(3))
    storage.mark_success(root)
    assert listing(root) == ["_SUCCESS", "a.npy", "f0.bin", "f1.bin", "f2.bin", "m.json"]
    assert storage.is_success(root)


def test_atomic_write_failure_removes_temp_and_keeps_old(tmp_path, monkeypatch) -> None:
    target = tmp_path / "a.bin"
    storage.write_bytes_atomic(str(target), b"old")

    def broken_mv(self, path1, path2, **kwargs):
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(LocalFileSystem, "mv", broken_mv)
    message = error_of(storage.write_bytes_atomic, str(target), b"new")
    assert message == f"{target}: disk on fire"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    assert target.read_bytes() == b"old"


def test_success_marker(root: str) -> None:
    assert not storage.is_success(root)
    storage.mark_success(root)
    assert storage.is_success(root)


# ---------------------------------------------------------------------------------------------
# prepare_output


def test_prepare_output_refuses_overwrites_and_resumes(root: str) -> None:
    storage.prepare_output(root, overwrite=False)  # missing: created
    storage.prepare_output(root, overwrite=False)  # exists but empty: fine
    storage.write_bytes_atomic(storage.join(root, "x.bin"), b"1")
    message = error_of(storage.prepare_output, root, overwrite=False)
    assert (
        message == f"{root}: output exists; pass --overwrite to replace it or --resume to continue"
    )
    storage.prepare_output(root, overwrite=False, resume=True)
    assert storage.exists(storage.join(root, "x.bin"))
    storage.prepare_output(root, overwrite=True)
    assert not storage.exists(storage.join(root, "x.bin"))
    assert "only one of" in error_of(storage.prepare_output, root, overwrite=True, resume=True)


# ---------------------------------------------------------------------------------------------
# Targets data sets


RANGES = [(0, None), (0, 10), (2, 9), (3, 6), (4, 5), (5, 5), (9, 10), (6, None)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_targets_round_trip(root: str, rng: np.random.Generator, dtype: str) -> None:
    y = make_targets(rng)
    folder = storage.join(root, "targets")
    extra = {"schedule": {"kind": "vp"}, "step": 7, "config": {"seed": 0}}
    manifest = datasets.write_targets(folder, y, rows_per_part=3, dtype=dtype, extra=extra)
    assert manifest == datasets.read_targets_manifest(folder)
    assert (manifest["n"], manifest["dim"], manifest["shape"]) == (10, 6, [2, 3])
    assert manifest["dtype"] == dtype and manifest["step"] == 7
    assert [(p["start"], p["rows"]) for p in manifest["parts"]] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert listing(folder) == ["_SUCCESS", "_manifest.json"] + [
        f"part-0000{k}.parquet" for k in range(4)
    ]
    assert storage.is_success(folder)
    assert datasets.targets_shape(folder) == (10, 6)
    expected = y.reshape(10, 6).astype(dtype).astype(np.float32)
    for start, stop in RANGES:
        rows = datasets.load_targets(folder, start, stop)
        assert rows.dtype == np.float32
        np.testing.assert_array_equal(rows, expected[start:stop])


def test_targets_parquet_schema(tmp_path, rng: np.random.Generator) -> None:
    datasets.write_targets(tmp_path, make_targets(rng), rows_per_part=4, dtype="float16")
    schema = pq.read_schema(tmp_path / "part-00001.parquet")
    assert schema.field("index").type == pa.int64()
    assert schema.field("y").type == pa.list_(pa.float16(), 6)
    index = pq.read_table(tmp_path / "part-00001.parquet").column("index").to_pylist()
    assert index == [4, 5, 6, 7]


def test_targets_reads_only_overlapping_parts(tmp_path, rng: np.random.Generator) -> None:
    y = make_targets(rng)
    datasets.write_targets(tmp_path, y, rows_per_part=3)
    (tmp_path / "part-00000.parquet").write_bytes(b"garbage")
    (tmp_path / "part-00003.parquet").unlink()
    np.testing.assert_array_equal(datasets.load_targets(tmp_path, 3, 9), y.reshape(10, 6)[3:9])


def test_targets_parts_written_in_parallel(root: str, rng: np.random.Generator) -> None:
    y = make_targets(rng, n=7, shape=(4,))
    blocks = [(2, 5, y[5:]), (0, 0, y[:2]), (1, 2, y[2:5])]  # any order, e.g. from Ray tasks
    parts = [datasets.write_targets_part(root, k, start, b, "float32") for k, start, b in blocks]
    assert not storage.is_success(root)
    manifest = datasets.write_targets_manifest(root, parts, 4, "float32", [4], {"step": 3})
    assert [p["path"] for p in manifest["parts"]] == [datasets.part_name(k) for k in range(3)]
    np.testing.assert_array_equal(datasets.load_targets(root), y)
    gap = [p for p in parts if p["start"] != 2]
    assert "gap or overlap at row 2" in error_of(
        datasets.write_targets_manifest, root, gap, 4, "float32", [4]
    )


def test_npy_targets(root: str, rng: np.random.Generator) -> None:
    y = rng.normal(size=(9, 2, 2))
    for dtype in (np.float64, np.float32, np.float16):
        uri = storage.join(root, "y.npy")
        storage.save_npy(uri, y.astype(dtype))
        assert datasets.targets_shape(uri) == (9, 4)
        expected = y.astype(dtype).astype(np.float32).reshape(9, 4)
        for start, stop in RANGES[:-1]:
            if stop is None or stop <= 9:
                got = datasets.load_targets(uri, start, stop)
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, expected[start:stop])
    fortran = storage.join(root, "f.npy")
    storage.save_npy(fortran, np.asfortranarray(y[:, :, 0]))
    expected = y[1:4, :, 0].astype(np.float32)
    np.testing.assert_array_equal(datasets.load_targets(fortran, 1, 4), expected)


def test_row_range_checked(tmp_path, rng: np.random.Generator) -> None:
    datasets.write_targets(tmp_path, make_targets(rng), rows_per_part=4)
    assert "row range [4, 11)" in error_of(datasets.load_targets, tmp_path, 4, 11)


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_targets(root: str, rng: np.random.Generator, bad: float) -> None:
    y = make_targets(rng)
    y[7, 1, 2] = bad
    npy, folder = storage.join(root, "y.npy"), storage.join(root, "t")
    storage.save_npy(npy, y)
    datasets.write_targets(folder, y, rows_per_part=3)
    for uri in (npy, folder):
        assert error_of(datasets.load_targets, uri) == (
            f"{uri}: contains NaN or Inf values (first at row 7)"
        )
        assert error_of(datasets.load_targets, uri, 5, 9).endswith("(first at row 7)")
        assert datasets.load_targets(uri, 0, 7).shape == (7, 6)


def test_empty_and_one_dimensional_npy(root: str) -> None:
    empty, flat = storage.join(root, "empty.npy"), storage.join(root, "flat.npy")
    storage.save_npy(empty, np.zeros((0, 5), np.float32))
    storage.save_npy(flat, np.zeros(5, np.float32))
    assert error_of(datasets.load_targets, empty) == f"{empty}: empty data (0 rows)"
    assert error_of(datasets.targets_shape, empty) == f"{empty}: empty data (0 rows)"
    assert error_of(datasets.load_targets, flat).startswith(f"{flat}: expected an N×D array")
    assert "empty data (0 rows)" in error_of(datasets.write_targets, root, np.zeros((0, 3)))
    assert "rows_per_part" in error_of(
        datasets.write_targets, root, np.ones((2, 3)), rows_per_part=0
    )
    assert "float16" in error_of(datasets.write_targets, root, np.ones((2, 3)), dtype="int8")


def test_unsupported_npy_dtype(tmp_path) -> None:
    uri = str(tmp_path / "i.npy")
    storage.save_npy(uri, np.zeros((3, 2), np.int64))
    assert error_of(datasets.load_targets, uri).startswith(f"{uri}: dtype int64 not supported")


def test_foreign_parquet_schema(root: str, rng: np.random.Generator) -> None:
    folder = storage.join(root, "t")
    datasets.write_targets(folder, make_targets(rng), rows_per_part=5)
    part = storage.join(folder, "part-00001.parquet")
    values = pa.array(np.zeros(5 * 6, np.float32))
    foreign = [
        pa.table({"index": pa.array(np.arange(5, 10)), "x": pa.array(np.zeros(5))}),
        pa.table({"index": pa.array(np.arange(5, 10)), "y": pa.array([[0.0] * 6] * 5)}),
        pa.table(
            {
                "index": pa.array(np.arange(5, 10)),
                "y": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(5 * 3, np.float32)), 3),
            }
        ),
        pa.table(
            {
                "index": pa.array(np.arange(5, 10, dtype=np.int32)),
                "y": pa.FixedSizeListArray.from_arrays(values, 6),
            }
        ),
    ]
    for table in foreign:
        write_parquet(part, table)
        message = error_of(datasets.load_targets, folder)
        assert message.startswith(
            f"{part}: foreign Parquet schema: expected columns index:int64, "
            "y:fixed_size_list<float>[6]"
        )
    assert datasets.load_targets(folder, 0, 5).shape == (5, 6)  # part 0 is still fine


def test_truncated_parquet(root: str, rng: np.random.Generator) -> None:
    folder = storage.join(root, "t")
    datasets.write_targets(folder, make_targets(rng), rows_per_part=5)
    part = storage.join(folder, "part-00000.parquet")
    data = storage.read_bytes(part)
    for broken in (data[: len(data) // 2], data[:0], data[:4] + bytes(40) + data[44:]):
        storage.write_bytes_atomic(part, broken)
        message = error_of(datasets.load_targets, folder)
        assert message.startswith(f"{part}: corrupt or truncated Parquet file (")


def test_truncated_npy(root: str, rng: np.random.Generator) -> None:
    uri = storage.join(root, "y.npy")
    storage.save_npy(uri, rng.normal(size=(6, 4)))
    data = storage.read_bytes(uri)
    for broken in (data[:-8], data[:60], data[:5], b"not an npy file at all"):
        storage.write_bytes_atomic(uri, broken)
        for fn in (datasets.load_targets, datasets.targets_shape, storage.load_npy):
            assert error_of(fn, uri).startswith(f"{uri}: corrupt or truncated npy file (")


def test_missing_and_incomplete(root: str, rng: np.random.Generator) -> None:
    missing = storage.join(root, "nothing")
    assert error_of(datasets.load_targets, missing) == f"{missing}: no such file or object"
    npy = storage.join(root, "nothing.npy")
    for fn in (datasets.load_targets, datasets.targets_shape, storage.load_npy, storage.read_bytes):
        assert error_of(fn, npy) == f"{npy}: no such file or object"
    assert error_of(storage.read_json, missing) == f"{missing}: no such file or object"
    folder = storage.join(root, "t")
    datasets.write_targets_part(folder, 0, 0, make_targets(rng, n=3), "float32")
    assert error_of(datasets.load_targets, folder) == (
        f"{folder}: incomplete targets data set (no _SUCCESS); rerun prepare"
    )


def test_bad_manifest(tmp_path, rng: np.random.Generator) -> None:
    datasets.write_targets(tmp_path, make_targets(rng), rows_per_part=4)
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    for change, problem in [
        ({"kind": "samples"}, "not a targets data set (manifest kind is 'samples')"),
        ({"version": 99}, "targets version 99 not supported"),
        ({"n": 11}, "parts hold 10 rows, n is 11"),
        ({"dtype": "int8"}, "dtype 'int8' is not float32 or float16"),
    ]:
        storage.write_json_atomic(tmp_path / "_manifest.json", {**manifest, **change})
        assert problem in error_of(datasets.load_targets, tmp_path)
    del manifest["parts"]
    storage.write_json_atomic(tmp_path / "_manifest.json", manifest)
    assert "missing keys ['parts']" in error_of(datasets.read_targets_manifest, tmp_path)
    (tmp_path / "_manifest.json").write_text("{not json")
    assert "manifest.json: not valid JSON" in error_of(datasets.read_targets_manifest, tmp_path)


# ---------------------------------------------------------------------------------------------
# Weights


def test_weights(tmp_path) -> None:
    uri = str(tmp_path / "w.npy")
    storage.save_npy(uri, np.array([1, 3, 0, 4]))
    w = datasets.load_weights(uri, 4)
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, [0.125, 0.375, 0.0, 0.5])
    assert (
        error_of(datasets.load_weights, uri, 5) == f"{uri}: weights have length 4, targets have 5"
    )
    for bad, problem in [
        ([1.0, -2.0, 3.0, 1.0], "weights contain negative values (first at index 1)"),
        ([1.0, 2.0, np.nan, 1.0], "weights contain NaN or Inf values (first at index 2)"),
        ([1.0, np.inf, 1.0, 1.0], "weights contain NaN or Inf values (first at index 1)"),
        ([0.0, 0.0, 0.0, 0.0], "weights are all zero"),
    ]:
        storage.save_npy(uri, np.array(bad))
        assert error_of(datasets.load_weights, uri, 4) == f"{uri}: {problem}"
    storage.save_npy(uri, np.ones((4, 1)))
    assert "1-D" in error_of(datasets.load_weights, uri, 4)


# ---------------------------------------------------------------------------------------------
# Error translation and credentials


def test_storage_errors_translation() -> None:
    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")

    cases = [
        (FileNotFoundError("x"), "u: no such file or object"),
        (PermissionError("x"), f"u: {DENIED}"),
        (NoCredentialsError(), f"u: {DENIED}"),
        (client_error("InvalidAccessKeyId"), f"u: {DENIED}"),
        (client_error("ExpiredToken"), f"u: {DENIED}"),
        (OSError(errno.ENOSPC, "No space left on device", "/x"), "u: No space left on device"),
        (OSError("first line\nsecond line"), "u: first line"),
    ]
    for exc, message in cases:
        with pytest.raises(DpmotError) as info, storage.storage_errors("u"):
            raise exc
        assert str(info.value) == message
        assert info.value.__cause__ is exc


def test_wrong_credentials_on_s3(s3_bucket: str, moto_user, rng: np.random.Generator) -> None:
    folder = f"{s3_bucket}/t"
    y = make_targets(rng)
    datasets.write_targets(folder, y, rows_per_part=4)
    moto_user["switch_on"](moto_user["secret"])  # the right secret: reads work
    np.testing.assert_array_equal(datasets.load_targets(folder, 2, 9), y.reshape(10, 6)[2:9])
    moto_user["switch_on"]("wrong-secret")
    part = f"{folder}/part-00000.parquet"
    for fn, uri in [
        (storage.read_bytes, part),
        (storage.exists, part),
        (storage.is_success, folder),
        (datasets.load_targets, folder),
        (datasets.targets_shape, folder),
        (lambda u: storage.write_bytes_atomic(u, b"x"), f"{folder}/new.bin"),
        (lambda u: storage.prepare_output(u, overwrite=True), folder),
    ]:
        message = error_of(fn, uri)
        assert message.startswith(s3_bucket) and message.endswith(DENIED)
        assert "wrong-secret" not in message and moto_user["secret"] not in message
