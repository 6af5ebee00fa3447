"""Data-set layout: what the folders of targets, fit outputs and samples hold.

Every output is a folder that the standard Parquet readers (pyarrow datasets, pandas, Ray
Data, Spark, DuckDB's glob) open as one data set: its data files are the only ``*.parquet``
files in it and share one schema; metadata and auxiliary files start with ``_`` (or ``.`` for
temporary files), which those readers skip (the Hadoop/Spark/Arrow convention)::

    targets/                     samples/                      fit/
      _manifest.json               _manifest.json                _manifest.json
      _prepare.json                _plan/plan.parquet            _checkpoints/latest.npz
      part-00000.parquet           chunk-00000.parquet           h.npy, metrics.jsonl
      ...                          ...                           _SUCCESS
      _SUCCESS                     _SUCCESS

A targets part holds ``index: int64`` (global row number), ``y:
fixed_size_list<float>[dim]`` and, for labelled data, ``label: int64`` (the class of the data
point the row was diffused from); ``_manifest.json`` says kind="targets", version=1, n, dim,
shape, dtype and the parts (and ``labels``: number of classes, counts, class names).
``_SUCCESS`` is written last: the data set is complete. Folders written by the earlier layout
(``manifest.json``, ``plan.parquet``, ``checkpoints/``) still open: :func:`find_aux` looks for
the current name first, then the legacy one.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpmot_dist.errors import DpmotError
from dpmot_dist.io.storage import (
    SUCCESS,
    Uri,
    WatchedFile,
    corrupt_error,
    create_exclusive,
    exists,
    is_success,
    join,
    list_names,
    load_npy,
    mark_success,
    read_bytes,
    read_json,
    remove_quietly,
    retrying,
    storage_errors,
    url_to_fs,
    write_bytes_atomic,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PLAN = "_plan/plan.parquet"
CHECKPOINT = "_checkpoints/latest.npz"
WORKERS = "_workers.json"
LEGACY_NAMES = {
    MANIFEST: "manifest.json",
    PLAN: "plan.parquet",
    CHECKPOINT: "checkpoints/latest.npz",
    WORKERS: "workers.json",
}
TARGETS_KIND = "targets"
TARGETS_VERSION = 1
TARGET_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}

_MANIFEST_KEYS = ("kind", "version", "n", "dim", "shape", "dtype", "parts")
_PART_BYTES = 128 << 20  # default size of one Parquet part
_GROUP_BYTES = 16 << 20  # size of one row group: the unit of a partial read
_CHECK_BYTES = 64 << 20  # rows checked for NaN/Inf at a time
_NPY_HEAD_BYTES = 1 << 17  # enough for any .npy header of a plain numeric array


# ---------------------------------------------------------------------------------------------
# Auxiliary files


def find_aux(folder_uri: Uri, name: str) -> str | None:
    """The URI of auxiliary file ``name`` (e.g. :data:`MANIFEST`) in a folder: the current
    name, else the earlier layout's, else None."""
    for candidate in (name, LEGACY_NAMES.get(name)):
        if candidate and exists(join(folder_uri, candidate)):
            return join(folder_uri, candidate)
    return None


def read_manifest(folder_uri: Uri) -> dict[str, Any]:
    """A folder's ``_manifest.json`` (or the earlier layout's ``manifest.json``)."""
    uri = find_aux(folder_uri, MANIFEST) or join(folder_uri, MANIFEST)
    return read_json(uri)


# ---------------------------------------------------------------------------------------------
# Targets data sets: writing


def _rows_shape(uri: str, shape: Sequence[int]) -> tuple[int, int]:
    """(N, D) of an (N, ...) data shape, D = prod(...); reject 0-D, 1-D, empty and 0-wide."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise DpmotError(f"{uri}: expected an N×D array, got shape {shape}")
    if shape[0] == 0:
        raise DpmotError(f"{uri}: empty data (0 rows)")
    dim = math.prod(shape[1:])
    if dim == 0:
        raise DpmotError(f"{uri}: rows have no values (shape {shape})")
    return shape[0], dim


def _rows_2d(uri: str, y: np.ndarray) -> np.ndarray:
    """View an (N, ...) array as (N, D), flattening each row."""
    return y.reshape(_rows_shape(uri, y.shape))


def _check_dtype(uri: str, dtype: str) -> None:
    """Targets are stored as float32 or float16."""
    if dtype not in TARGET_DTYPES:
        raise DpmotError(f"{uri}: storage dtype {dtype!r} not supported; use float32 or float16")


def _default_rows_per_part(dim: int, dtype: str) -> int:
    """Rows that make a part of about ``_PART_BYTES``."""
    return max(1, _PART_BYTES // (dim * np.dtype(dtype).itemsize))


def part_name(part_no: int) -> str:
    """File name of Parquet part ``part_no``: ``part-00000.parquet``, ..."""
    return f"part-{part_no:05d}.parquet"


def write_targets_part(
    folder_uri: Uri,
    part_no: int,
    start: int,
    y_block: np.ndarray,
    dtype: str = "float32",
    labels: np.ndarray | None = None,
    exclusive: bool = False,
) -> dict[str, Any]:
    """Write rows ``start .. start + len(y_block)`` as one Parquet part; return its manifest entry.

    Columns: ``index`` (int64, global row number), ``y`` (fixed_size_list<dtype>[D]) and,
    given ``labels`` (one per row), ``label`` (int64). Parts can be written in parallel (e.g.
    by Ray tasks); the driver then calls :func:`write_targets_manifest` with the entries.
    ``exclusive``: keep a part that another run of the same plan wrote first
    (:func:`~dpmot_dist.io.storage.create_exclusive`).
    """
    uri = os.fspath(folder_uri)
    _check_dtype(uri, dtype)
    block = _rows_2d(uri, np.asarray(y_block))
    rows, dim = block.shape
    values = pa.array(np.ascontiguousarray(block, dtype=dtype).ravel())
    columns = {
        "index": pa.array(np.arange(start, start + rows, dtype=np.int64)),
        "y": pa.FixedSizeListArray.from_arrays(values, dim),
    }
    if labels is not None:
        assert len(labels) == rows, (len(labels), rows)
        columns["label"] = pa.array(np.asarray(labels, np.int64))
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    group_rows = max(1, _GROUP_BYTES // (dim * np.dtype(dtype).itemsize))
    pq.write_table(table, sink, row_group_size=group_rows, use_dictionary=False)
    name = part_name(part_no)
    data = sink.getvalue().to_pybytes()
    if not exclusive:
        write_bytes_atomic(join(uri, name), data)
    elif not create_exclusive(join(uri, name), data):
        logger.info("%s: already written by another run; kept", join(uri, name))
    return {"path": name, "rows": int(rows), "start": int(start)}


def write_targets_manifest(
    folder_uri: Uri,
    parts: Sequence[dict[str, Any]],
    dim: int,
    dtype: str,
    shape: Sequence[int],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit a targets data set: write ``_manifest.json``, then ``_SUCCESS``; return the manifest.

    ``parts`` are the entries returned by :func:`write_targets_part`, in any order; they must
    tile rows ``0 .. n`` without gaps. ``extra`` adds free-form keys (``schedule``, ``step``,
    ``config``, ...).
    """
    uri = os.fspath(folder_uri)
    _check_dtype(uri, dtype)
    parts = sorted((dict(p) for p in parts), key=lambda p: p["start"])
    shape = [int(s) for s in shape]
    manifest: dict[str, Any] = {
        "kind": TARGETS_KIND,
        "version": TARGETS_VERSION,
        "n": sum(int(p["rows"]) for p in parts),
        "dim": int(dim),
        "shape": shape,
        "dtype": dtype,
        "parts": parts,
    }
    _check_layout(uri, manifest)
    clash = sorted(set(extra or {}) & set(manifest))
    if clash:
        raise DpmotError(f"{uri}: extra manifest keys {clash} clash with reserved keys")
    manifest.update(extra or {})
    write_json_atomic(join(uri, MANIFEST), manifest)
    mark_success(uri)
    return manifest


def write_targets(
    folder_uri: Uri,
    y: np.ndarray,
    *,
    rows_per_part: int | None = None,
    dtype: str = "float32",
    shape: Sequence[int] | None = None,
    extra: dict[str, Any] | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write targets ``y`` (N, *shape) as a data set: parts, manifest, ``_SUCCESS``.

    ``shape`` is the per-row data shape recorded in the manifest (default ``y.shape[1:]``);
    rows are stored flattened to D = prod(shape). ``rows_per_part`` defaults to ~128 MiB parts.
    ``labels`` (N,) non-negative integers become the ``label`` column (and ``labels`` in the
    manifest). Any stale ``_SUCCESS`` is removed first, so a crash leaves the folder marked
    incomplete.
    """
    uri = os.fspath(folder_uri)
    _check_dtype(uri, dtype)
    y = np.asarray(y)
    rows = _rows_2d(uri, y)
    n, dim = rows.shape
    shape = list(y.shape[1:]) if shape is None else list(shape)
    step = _default_rows_per_part(dim, dtype) if rows_per_part is None else rows_per_part
    if step < 1:
        raise DpmotError(f"{uri}: rows_per_part must be at least 1, got {step}")
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (n,) or (labels < 0).any():
            raise DpmotError(f"{uri}: labels must be {n} non-negative integers")
        extra = {**(extra or {}), "labels": label_summary(labels)}
    fs, path = url_to_fs(uri)
    remove_quietly(fs, f"{path}/{SUCCESS}")
    parts = [
        write_targets_part(
            uri,
            k,
            start,
            rows[start : start + step],
            dtype,
            None if labels is None else labels[start : start + step],
        )
        for k, start in enumerate(range(0, n, step))
    ]
    return write_targets_manifest(uri, parts, dim, dtype, shape, extra)


def label_summary(labels: np.ndarray, classes: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest's ``labels``: number of classes, per-class counts (and class names)."""
    num_classes = len(classes) or int(labels.max()) + 1
    summary: dict[str, Any] = {"num_classes": num_classes}
    if classes:
        summary["classes"] = list(classes)
    summary["counts"] = np.bincount(labels, minlength=num_classes).tolist()
    return summary


# ---------------------------------------------------------------------------------------------
# Targets data sets: reading


@dataclass(frozen=True)
class _Part:
    """One manifest entry: a Parquet file holding global rows ``start .. start + rows``."""

    path: str
    start: int
    rows: int


def _check_layout(uri: str, m: dict[str, Any]) -> None:
    """Check a manifest's n/dim/shape/dtype/parts for consistency."""
    bad = _layout_problem(m)
    if bad:
        raise DpmotError(f"{uri}/{MANIFEST}: {bad}; rerun prepare")


def _layout_problem(m: dict[str, Any]) -> str | None:
    """Describe the first inconsistency in a manifest's layout, or None."""
    if not all(isinstance(m[k], int) and m[k] >= 0 for k in ("n", "dim")) or m["dim"] < 1:
        return f"n and dim must be non-negative integers with dim ≥ 1, got {m['n']}, {m['dim']}"
    if m["dtype"] not in TARGET_DTYPES:
        return f"dtype {m['dtype']!r} is not float32 or float16"
    shape = m["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
        return f"shape {shape!r} is not a list of integers"
    if math.prod(shape) != m["dim"]:
        return f"shape {shape} does not have dim={m['dim']} values"
    if not isinstance(m["parts"], list):
        return "parts is not a list"
    expected = 0
    for p in m["parts"]:
        name = p.get("path") if isinstance(p, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            return f"bad part entry {p!r}"
        if p.get("start") != expected or not isinstance(p.get("rows"), int) or p["rows"] < 0:
            return f"parts do not tile rows 0..n (gap or overlap at row {expected})"
        expected += p["rows"]
    if expected != m["n"]:
        return f"parts hold {expected} rows, n is {m['n']}"
    return None


def read_targets_manifest(folder_uri: Uri) -> dict[str, Any]:
    """Read and validate a complete targets data set's ``_manifest.json`` (or, written by
    the earlier layout, ``manifest.json``)."""
    uri = os.fspath(folder_uri).rstrip("/")
    if not is_success(uri):
        if not exists(uri):
            raise DpmotError(f"{uri}: no such file or object")
        raise DpmotError(f"{uri}: incomplete targets data set (no _SUCCESS); rerun prepare")
    m = read_manifest(uri)
    if not isinstance(m, dict) or m.get("kind") != TARGETS_KIND:
        kind = m.get("kind") if isinstance(m, dict) else type(m).__name__
        raise DpmotError(f"{uri}: not a targets data set (manifest kind is {kind!r})")
    if m.get("version") != TARGETS_VERSION:
        raise DpmotError(
            f"{uri}: targets version {m.get('version')!r} not supported "
            f"(this dpmot-dist reads version {TARGETS_VERSION}); rerun prepare"
        )
    missing = [k for k in _MANIFEST_KEYS if k not in m]
    if missing:
        raise DpmotError(f"{uri}/{MANIFEST}: missing keys {missing}; rerun prepare")
    _check_layout(uri, m)
    return m


def _is_npy(uri: str) -> bool:
    """A plain ``.npy`` file rather than a data set folder."""
    return uri.rstrip("/").lower().endswith(".npy")


def _row_range(uri: str, n: int, start: int, stop: int | None) -> tuple[int, int]:
    """Validate ``[start, stop)`` against ``n`` rows; ``stop=None`` means ``n``."""
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise DpmotError(f"{uri}: row range [{start}, {stop}) outside the {n} rows")
    return start, stop


def _check_finite(uri: str, rows: np.ndarray, first_row: int) -> None:
    """Reject NaN/Inf, naming the first bad global row; checks in chunks to bound memory."""
    step = max(1, _CHECK_BYTES // max(1, rows.shape[1] * rows.itemsize))
    for a in range(0, len(rows), step):
        bad = ~np.isfinite(rows[a : a + step]).all(axis=1)
        if bad.any():
            r = first_row + a + int(np.argmax(bad))
            raise DpmotError(f"{uri}: contains NaN or Inf values (first at row {r})")


@dataclass(frozen=True)
class _NpyHeader:
    """What a ``.npy`` header says: data shape, dtype, layout and where the data start."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int


def _read_npy_header(uri: str) -> _NpyHeader:
    """Read and check only the header of a ``.npy`` targets file (and its size)."""
    fs, path = url_to_fs(uri)
    size, head = retrying(uri, _file_head, fs, path)
    buf = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(buf)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
        shape, fortran_order, dtype = read_header(buf)
    except ValueError as e:
        raise corrupt_error(uri, "npy", e) from e
    header = _NpyHeader(tuple(shape), dtype, fortran_order, buf.tell())
    _check_npy_header(uri, header, size)
    return header


def _file_head(fs: Any, path: str) -> tuple[int, bytes]:
    """A file's size and its first bytes (enough for a header)."""
    size = fs.size(path)
    return size, fs.cat_file(path, start=0, end=min(size, _NPY_HEAD_BYTES))


def _check_npy_header(uri: str, h: _NpyHeader, size: int) -> None:
    """Targets .npy must be a float (N, D, ...) array with all of its bytes present."""
    if h.dtype.kind != "f" or h.dtype.itemsize not in (2, 4, 8):
        raise DpmotError(f"{uri}: dtype {h.dtype} not supported; use float16, float32 or float64")
    _rows_shape(uri, h.shape)
    expected = h.offset + math.prod(h.shape) * h.dtype.itemsize
    if size < expected:
        raise corrupt_error(uri, "npy", f"expected {expected} bytes, found {size}")


def _load_npy_rows(uri: str, start: int, stop: int | None) -> np.ndarray:
    """Rows ``[start, stop)`` of a ``.npy`` targets file as float32 (N, D); reads only those."""
    h = _read_npy_header(uri)
    n, dim = _rows_shape(uri, h.shape)
    start, stop = _row_range(uri, n, start, stop)
    if start == stop:
        return np.empty((0, dim), dtype=np.float32)
    if h.fortran_order:  # rows are not contiguous: read everything
        rows = _rows_2d(uri, load_npy(uri))[start:stop]
        return rows.astype(np.float32)
    row_bytes = dim * h.dtype.itemsize
    fs, path = url_to_fs(uri)
    data = retrying(
        uri, fs.cat_file, path, start=h.offset + start * row_bytes, end=h.offset + stop * row_bytes
    )
    if len(data) != (stop - start) * row_bytes:
        expected = (stop - start) * row_bytes
        raise corrupt_error(uri, "npy", f"expected {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=h.dtype).reshape(stop - start, dim).astype(np.float32)


def _check_part_schema(part_uri: str, schema: pa.Schema, dim: int) -> None:
    """A part must hold ``index: int64`` and ``y: fixed_size_list<float32|float16>[dim]``
    (and, when labelled, ``label: int64``)."""
    names = set(schema.names)
    y_type = schema.field("y").type if "y" in names else pa.null()
    ok = (
        "index" in names
        and schema.field("index").type == pa.int64()
        and pa.types.is_fixed_size_list(y_type)
        and y_type.list_size == dim
        and y_type.value_type in TARGET_DTYPES.values()
        and ("label" not in names or schema.field("label").type == pa.int64())
    )
    if not ok:
        found = ", ".join(f"{f.name}:{f.type}" for f in schema)
        raise DpmotError(
            f"{part_uri}: foreign Parquet schema: expected columns index:int64, "
            f"y:fixed_size_list<float>[{dim}]; found {found}"
        )


def _row_groups(meta: pq.FileMetaData, a: int, b: int) -> tuple[list[int], int]:
    """Row groups overlapping local rows ``[a, b)`` and the first row of the first of them."""
    groups, first, row = [], None, 0
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        if row < b and row + rows > a:
            groups.append(g)
            first = row if first is None else first
        row += rows
    return groups, a if first is None else first


def _part_table(part_uri: str, f: Any, part: _Part, lo: int, hi: int, dim: int) -> pa.Table:
    """Read global rows ``[lo, hi)`` of one part from an open file (only the row groups needed)."""
    pf = pq.ParquetFile(f)
    _check_part_schema(part_uri, pf.schema_arrow, dim)
    if pf.metadata.num_rows != part.rows:
        raise DpmotError(
            f"{part_uri}: holds {pf.metadata.num_rows} rows, the manifest says {part.rows}; "
            "rerun prepare"
        )
    groups, first = _row_groups(pf.metadata, lo - part.start, hi - part.start)
    table = pf.read_row_groups(groups, columns=["index", "y"])
    return table.slice(lo - part.start - first, hi - lo)


def _table_rows(part_uri: str, table: pa.Table, lo: int, dim: int) -> np.ndarray:
    """The ``y`` rows of a part slice as an (rows, dim) array; checks ``index`` and nulls."""
    index = table.column("index").to_numpy()
    if not np.array_equal(index, np.arange(lo, lo + len(index))):
        raise DpmotError(f"{part_uri}: index column does not match the manifest; rerun prepare")
    y = table.column("y").combine_chunks()
    if y.null_count:
        raise DpmotError(f"{part_uri}: contains {y.null_count} null rows; rerun prepare")
    return y.flatten().to_numpy(zero_copy_only=False).reshape(len(y), dim)


def _read_part_rows(part_uri: str, part: _Part, lo: int, hi: int, dim: int) -> np.ndarray:
    """Global rows ``[lo, hi)`` stored in ``part``, read with pyarrow over fsspec (the whole
    read is retried after a transient storage failure)."""
    table = retrying(part_uri, _read_part_table, part_uri, part, lo, hi, dim)
    return _table_rows(part_uri, table, lo, dim)


def _read_part_table(part_uri: str, part: _Part, lo: int, hi: int, dim: int) -> pa.Table:
    fs, path = url_to_fs(part_uri)
    with fs.open(path, "rb") as raw:
        f = WatchedFile(raw)
        try:
            return _part_table(part_uri, f, part, lo, hi, dim)
        except (pa.ArrowException, OSError) as e:
            if e is f.error:
                raise  # a storage failure: retrying translates (and maybe retries) it
            raise corrupt_error(part_uri, "Parquet", e) from e


def _load_dataset_rows(uri: str, start: int, stop: int | None) -> np.ndarray:
    """Rows ``[start, stop)`` of a targets data set; reads only the parts overlapping them."""
    m = read_targets_manifest(uri)
    _rows_shape(uri, (m["n"], m["dim"]))
    start, stop = _row_range(uri, m["n"], start, stop)
    out = np.empty((stop - start, m["dim"]), dtype=np.float32)
    for entry in m["parts"]:
        part = _Part(entry["path"], entry["start"], entry["rows"])
        lo, hi = max(start, part.start), min(stop, part.start + part.rows)
        if lo < hi:
            part_uri = join(uri, part.path)
            out[lo - start : hi - start] = _read_part_rows(part_uri, part, lo, hi, m["dim"])
    return out


def load_targets(uri: Uri, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Targets rows ``[start, stop)`` as a float32 (rows, D) array.

    ``uri`` is a ``.npy`` file holding an (N, D) or (N, *shape) float array (rows are
    flattened) or a targets data set folder; either way only the requested rows are read, so
    a shard loads just its slice. Raises DpmotError for empty, non-finite or corrupt data.
    """
    uri = os.fspath(uri).rstrip("/")
    load = _load_npy_rows if _is_npy(uri) else _load_dataset_rows
    rows = load(uri, start, stop)
    _check_finite(uri, rows, start)
    return rows


def load_target_labels(uri: Uri, start: int = 0, stop: int | None = None) -> np.ndarray | None:
    """The ``label`` (rows,) int64 of targets rows ``[start, stop)``; None for unlabelled
    targets (a data set without ``labels`` in its manifest, or a ``.npy``)."""
    uri = os.fspath(uri).rstrip("/")
    if _is_npy(uri):
        return None
    m = read_targets_manifest(uri)
    if not m.get("labels"):
        return None
    start, stop = _row_range(uri, m["n"], start, stop)
    out = np.empty(stop - start, np.int64)
    for entry in m["parts"]:
        part = _Part(entry["path"], entry["start"], entry["rows"])
        lo, hi = max(start, part.start), min(stop, part.start + part.rows)
        if lo < hi:
            out[lo - start : hi - start] = _read_part_labels(join(uri, part.path), part, lo, hi)
    return out


def _read_part_labels(part_uri: str, part: _Part, lo: int, hi: int) -> np.ndarray:
    """The ``label`` column of global rows ``[lo, hi)`` of one part."""
    fs, path = url_to_fs(part_uri)
    with storage_errors(part_uri), fs.open(path, "rb") as raw:
        f = WatchedFile(raw)
        try:
            pf = pq.ParquetFile(f)
            if "label" not in pf.schema_arrow.names:
                raise DpmotError(f"{part_uri}: no label column, the manifest has labels")
            groups, first = _row_groups(pf.metadata, lo - part.start, hi - part.start)
            table = pf.read_row_groups(groups, columns=["label"])
        except (pa.ArrowException, OSError) as e:
            if e is f.error:
                raise
            raise corrupt_error(part_uri, "Parquet", e) from e
    col = table.slice(lo - part.start - first, hi - lo).column("label")
    if col.null_count or col.type != pa.int64():
        raise DpmotError(f"{part_uri}: label column must be int64 without nulls; rerun prepare")
    return col.to_numpy()


def targets_shape(uri: Uri) -> tuple[int, int]:
    """(N, D) of a ``.npy`` targets file or a targets data set, from its header or manifest."""
    uri = os.fspath(uri).rstrip("/")
    if _is_npy(uri):
        return _rows_shape(uri, _read_npy_header(uri).shape)
    m = read_targets_manifest(uri)
    return _rows_shape(uri, (m["n"], m["dim"]))


def load_weights(uri: Uri, n: int) -> np.ndarray:
    """Target weights nu (n,) from a ``.npy`` of non-negative numbers, normalised to sum 1."""
    uri = os.fspath(uri)
    w = load_npy(uri)
    if w.ndim != 1 or w.dtype.kind not in "iuf":
        raise DpmotError(f"{uri}: weights must be a 1-D numeric array, got {w.dtype} {w.shape}")
    if len(w) != n:
        raise DpmotError(f"{uri}: weights have length {len(w)}, targets have {n}")
    w = w.astype(np.float64)
    for bad, what in ((~np.isfinite(w), "NaN or Inf values"), (w < 0, "negative values")):
        if bad.any():
            raise DpmotError(f"{uri}: weights contain {what} (first at index {np.argmax(bad)})")
    total = w.sum()
    if total == 0:
        raise DpmotError(f"{uri}: weights are all zero")
    return w / total


# ---------------------------------------------------------------------------------------------
# Samples data sets

SAMPLES_KIND = "samples"
SAMPLES_VERSION = 1
_CHUNK_RE = re.compile(r"chunk-(\d+)\.parquet$")


def chunk_name(c: int) -> str:
    """File name of output chunk ``c``: ``chunk-00000.parquet``, ..."""
    return f"chunk-{c:05d}.parquet"


def written_chunks(folder_uri: Uri) -> set[int]:
    """Numbers of the chunk files present in a samples folder (each written atomically)."""
    return {int(m.group(1)) for name in list_names(folder_uri) if (m := _CHUNK_RE.match(name))}


def manifest_kind(folder_uri: Uri) -> str | None:
    """The ``kind`` in a folder's manifest (``targets``, ``samples``, ``potential``), or None
    when the folder has no manifest."""
    uri = find_aux(folder_uri, MANIFEST)
    if uri is None:
        return None
    m = read_json(uri)
    return m.get("kind") if isinstance(m, dict) else None


def read_samples_manifest(folder_uri: Uri) -> dict[str, Any]:
    """The manifest of a finished samples data set (a one-line error otherwise)."""
    uri = os.fspath(folder_uri).rstrip("/")
    if not is_success(uri):
        raise DpmotError(f"{uri}: not a finished samples data set (no _SUCCESS)")
    m = read_manifest(uri)
    if m.get("kind") != SAMPLES_KIND:
        raise DpmotError(f"{uri}: not a samples data set (manifest kind {m.get('kind')!r})")
    return m


def read_samples(folder_uri: Uri) -> tuple[dict, pa.Table]:
    """A finished samples data set: its manifest and all its rows, ordered by sample_id."""
    m = read_samples_manifest(folder_uri)
    tables = []
    for name in m["files"]:
        uri = join(folder_uri, name)
        with storage_errors(uri):
            tables.append(pq.read_table(io.BytesIO(read_bytes(uri))))
    return m, pa.concat_tables(tables).sort_by("sample_id")
