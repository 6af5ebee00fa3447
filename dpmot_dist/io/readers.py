"""Data sources for ``prepare``: row blocks read from any fsspec URI without loading the whole set.

A :class:`Source` is a small, picklable description of a data set (header, footers or file
list — never the data) with

- ``n`` rows, each of stored shape ``row_shape`` and numpy ``dtype``;
- :meth:`Source.blocks` — contiguous row ranges of about a requested size (aligned to Parquet
  row groups), each a :class:`Block` that a worker can read on its own;
- :meth:`Source.read` — the rows of one block, ``(rows, *row_shape)`` in the stored dtype.

Kinds (chosen by :func:`open_source` from the URI):

- ``.npy``: an (N, ...) C-order numeric array; a block is one byte-range read.
- ``.npz``: one member of the archive (``column`` names it; default: the only member); a block
  seeks inside the member (cheap when stored uncompressed, as ``np.savez`` does).
- Parquet (a ``.parquet`` file or a folder of them, sorted by path): one column (``column``;
  default: the first usable one) holding a (nested) fixed-size or equal-length list of numbers,
  or encoded PNG/JPEG bytes (``binary``, or a struct with a ``bytes`` field as Hugging Face
  ``datasets`` writes). A sibling ``manifest.json`` with a ``shape`` (a targets or samples
  data set) gives the per-row shape of flat lists.
- A folder of PNG/JPEG files (recursively, sorted by path; one file per row).

Encoded images are decoded to (H, W, C) uint8 in one colour mode for the whole data set —
RGB unless every image is greyscale (then L), or the ``mode`` asked for — and, when
``image_size`` is given, resized as :func:`images.decode_image` does. Deciding that every
image is greyscale reads headers only (:func:`images.peek_mode`), in path order, and stops at
the first colour image: for a colour data set that is its first file or so; an all-grey data
set has every header read once by the driver (the bytes of a Parquet column, the first
16 KiB of each file of a folder, fetched concurrently), which ``mode`` L or RGB skips.
Every error is a one-line :class:`DpmotError` naming the object (file, or file and row).

Class labels (:func:`read_labels`, read on the driver: N integers): the class subfolders of an
image folder (torchvision's ``ImageFolder`` layout: sorted class names → ids 0..C−1), an
integer Parquet column (``label`` by default, as Hugging Face ``datasets`` writes a
``ClassLabel``), or an ``.npz`` member ``y`` or ``labels``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import datasets, images, storage

logger = logging.getLogger(__name__)

_NPY_HEAD_BYTES = 1 << 17
_PARQUET_SUFFIXES = (".parquet", ".pq")
_IMAGE_HEAD_BYTES = 1 << 14  # enough for PNG/JPEG headers (longer ones: the whole file)
_MODE_BATCH = 64  # headers fetched at once while deciding a data set's colour mode
LABEL_COLUMN = "label"  # the default Parquet label column
LABEL_MEMBERS = ("y", "labels")  # the .npz members read as labels, in this order


@dataclass(frozen=True)
class Block:
    """Rows ``start .. stop`` of a source; ``obj`` holds them from its row ``obj_start`` on.

    ``items`` is the kind's payload: Parquet row-group numbers, or image file paths.
    """

    start: int
    stop: int
    obj: str
    obj_start: int
    items: tuple[Any, ...] = ()

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        """The block as errors name it: its object and rows there."""
        return f"{self.obj} (rows {self.obj_start}..{self.obj_start + self.rows - 1})"


@dataclass(frozen=True)
class Source:
    """A data set of ``n`` rows of stored shape ``row_shape`` and dtype ``dtype``."""

    uri: str
    n: int
    row_shape: tuple[int, ...]
    dtype: str
    kind: str = field(init=False, default="")

    @property
    def encoded(self) -> bool:
        """True when rows are decoded images: (H, W, C) uint8."""
        return False

    def blocks(self, rows: int) -> list[Block]:
        """Contiguous blocks of ``rows`` rows (the last may be shorter)."""
        return [
            Block(a, min(a + rows, self.n), self.uri, a) for a in range(0, self.n, max(1, rows))
        ]

    def read(self, block: Block) -> np.ndarray:
        """The block's rows, ``(rows, *row_shape)`` in ``dtype``."""
        raise NotImplementedError

    def head(self, rows: int = 1024) -> np.ndarray:
        """The first block of about ``rows`` rows (driver side: what ``auto`` settings probe)."""
        return self.read(self.blocks(rows)[0])

    def worker_view(self) -> Source:
        """A copy without what only :meth:`blocks` needs (file lists), to ship to workers."""
        return self

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the input."""
        return {
            "uri": self.uri,
            "kind": self.kind,
            "rows": self.n,
            "row_shape": list(self.row_shape),
            "dtype": self.dtype,
        }


# ---------------------------------------------------------------------------------------------
# Helpers


def _corrupt(uri: str, kind: str, reason: BaseException | str) -> DpmotError:
    """The error for a file whose bytes cannot be parsed."""
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return DpmotError(f"{uri}: corrupt or truncated {kind} file ({text[:200]})")


def _check_rows(uri: str, n: int, row_shape: Sequence[int]) -> None:
    """A source needs at least one row and rows with at least one value."""
    if n == 0:
        raise DpmotError(f"{uri}: empty source (0 rows)")
    if math.prod(row_shape) == 0:
        raise DpmotError(f"{uri}: rows have no values (row shape {tuple(row_shape)})")


def _check_numeric(uri: str, dtype: np.dtype) -> None:
    """Stored values must be unsigned/signed integers or floats."""
    if dtype.kind not in "uif" or dtype.fields is not None:
        raise DpmotError(f"{uri}: dtype {dtype} not supported; use unsigned integers or floats")


def _uri_of(fs: Any, path: str) -> str:
    """The URI of a protocol-less path on ``fs`` (as users wrote it: no file:// for local)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _dataset_mode(uri: str, mode: images.ColourMode, modes: Iterator[tuple[str, str]]) -> str:
    """``mode``, or for ``auto`` RGB unless every image is greyscale (``modes``: each image's
    name and mode, in order; read up to the first colour image only)."""
    if mode != "auto":
        return mode
    colour = next((name for name, m in modes if m == "RGB"), None)
    if colour is None:
        logger.info("%s: every image is greyscale: decoded as L (one channel)", uri)
        return "L"
    logger.debug("%s: decoded as RGB (%s is a colour image)", uri, colour)
    return "RGB"


def _mode_of(data: bytes, name: str) -> str:
    """The colour mode of one encoded image from its complete bytes."""
    mode = images.peek_mode(data)
    return mode or ("L" if images.decode_image(data, name).shape[2] == 1 else "RGB")


def _is_hidden(path: str) -> bool:
    """Markers, manifests and temporary files: ``_SUCCESS``, ``.part.tmp-…``, ``_prepare.json``."""
    return path.rsplit("/", 1)[-1].startswith(("_", "."))


# ---------------------------------------------------------------------------------------------
# .npy


@dataclass(frozen=True)
class NpyHeader:
    """Shape, dtype and data offset of an ``.npy`` array."""

    shape: tuple[int, ...]
    dtype: str
    fortran_order: bool
    offset: int


def parse_npy_header(uri: str, head: bytes | Any) -> NpyHeader:
    """Parse an ``.npy`` header from its first bytes (or a file object positioned at 0)."""
    f = io.BytesIO(head) if isinstance(head, bytes) else head
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
        shape, fortran_order, dtype = read_header(f)
    except (ValueError, EOFError) as e:
        raise _corrupt(uri, "npy", e) from e
    return NpyHeader(tuple(int(s) for s in shape), dtype.str, bool(fortran_order), f.tell())


def _check_array(uri: str, h: NpyHeader, size: int, kind: str) -> None:
    """A usable (N, ...) C-order numeric array with all of its bytes present."""
    dtype = np.dtype(h.dtype)
    _check_numeric(uri, dtype)
    if len(h.shape) < 2:
        raise DpmotError(f"{uri}: expected an (N, ...) array of rows, got shape {h.shape}")
    _check_rows(uri, h.shape[0], h.shape[1:])
    if h.fortran_order and len(h.shape) > 1:
        raise DpmotError(f"{uri}: Fortran-ordered array; save it with np.ascontiguousarray")
    expected = h.offset + math.prod(h.shape) * dtype.itemsize
    if size < expected:
        raise _corrupt(uri, kind, f"expected {expected} bytes, found {size}")


@dataclass(frozen=True)
class NpySource(Source):
    """An ``.npy`` file; blocks are byte ranges."""

    offset: int = 0
    kind: str = field(init=False, default="npy")

    @classmethod
    def open(cls, uri: str) -> NpySource:
        fs, path = storage.url_to_fs(uri)
        with storage.storage_errors(uri):
            size = fs.size(path)
            head = fs.cat_file(path, start=0, end=min(size, _NPY_HEAD_BYTES))
        h = parse_npy_header(uri, head)
        _check_array(uri, h, size, "npy")
        return cls(uri, h.shape[0], h.shape[1:], h.dtype, offset=h.offset)

    def read(self, block: Block) -> np.ndarray:
        row_bytes = math.prod(self.row_shape) * np.dtype(self.dtype).itemsize
        fs, path = storage.url_to_fs(self.uri)
        start = self.offset + block.start * row_bytes
        with storage.storage_errors(self.uri):
            data = fs.cat_file(path, start=start, end=start + block.rows * row_bytes)
        if len(data) != block.rows * row_bytes:
            raise _corrupt(self.uri, "npy", f"rows {block.start}..{block.stop} are cut short")
        return np.frombuffer(data, dtype=self.dtype).reshape(block.rows, *self.row_shape)


# ---------------------------------------------------------------------------------------------
# .npz


@dataclass(frozen=True)
class NpzSource(Source):
    """One member of an ``.npz`` archive; blocks seek inside the member."""

    member: str = ""
    offset: int = 0
    kind: str = field(init=False, default="npz")

    @classmethod
    def open(cls, uri: str, column: str | None) -> NpzSource:
        with _open_zip(uri) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            member = _pick_member(uri, names, column)
            info = zf.getinfo(member + ".npy")
            with zf.open(info) as f:
                h = parse_npy_header(uri, f)
        _check_array(f"{uri}[{member}]", h, info.file_size, "npz")
        return cls(uri, h.shape[0], h.shape[1:], h.dtype, member=member, offset=h.offset)

    def read(self, block: Block) -> np.ndarray:
        row_bytes = math.prod(self.row_shape) * np.dtype(self.dtype).itemsize
        nbytes = block.rows * row_bytes
        with _open_zip(self.uri) as zf, zf.open(self.member + ".npy") as f:
            f.seek(self.offset + block.start * row_bytes)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise _corrupt(self.uri, "npz", f"rows {block.start}..{block.stop} are cut short")
        return np.frombuffer(data, dtype=self.dtype).reshape(block.rows, *self.row_shape)


def _pick_member(uri: str, names: list[str], column: str | None) -> str:
    """The archive member to read: ``column``, or the only one (besides labels)."""
    if not names:
        raise DpmotError(f"{uri}: empty source (the archive holds no arrays)")
    if column is not None:
        if column not in names:
            raise DpmotError(f"{uri}: no array named {column!r} (found {', '.join(names)})")
        return column
    data = [n for n in names if n not in LABEL_MEMBERS]
    if len(data) == 1:
        return data[0]
    if len(names) > 1:
        raise DpmotError(f"{uri}: holds several arrays ({', '.join(names)}); set column")
    return names[0]


@contextlib.contextmanager
def _open_zip(uri: str) -> Iterator[zipfile.ZipFile]:
    """A ZipFile over an fsspec file, with zip and I/O failures translated."""
    fs, path = storage.url_to_fs(uri)
    with storage.storage_errors(uri), fs.open(path, "rb") as f, _zip_errors(uri):
        with zipfile.ZipFile(f) as zf:
            yield zf


@contextlib.contextmanager
def _zip_errors(uri: str) -> Iterator[None]:
    """Turn zip/zlib failures into 'corrupt or truncated npz' (I/O errors pass through)."""
    try:
        yield
    except DpmotError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
        raise _corrupt(uri, "npz", e) from e


# ---------------------------------------------------------------------------------------------
# Parquet

ColumnKind = Literal["array", "list", "image", "image_struct"]


def _column_kind(t: pa.DataType) -> ColumnKind | None:
    """How a Parquet column's type is read, or None when it holds no rows of data."""
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = t
        while pa.types.is_fixed_size_list(inner):
            inner = inner.value_type
        if pa.types.is_list(inner) or pa.types.is_large_list(inner):
            inner = inner.value_type
        numeric = pa.types.is_integer(inner) or pa.types.is_floating(inner)
        if not numeric:
            return None
        return "array" if pa.types.is_fixed_size_list(t) and _fixed_leaf(t) else "list"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "image"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        b = t.field("bytes").type
        return "image_struct" if pa.types.is_binary(b) or pa.types.is_large_binary(b) else None
    return None


def _fixed_leaf(t: pa.DataType) -> bool:
    """True when every list level is fixed-size down to a numeric leaf."""
    while pa.types.is_fixed_size_list(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _fixed_shape(t: pa.DataType) -> tuple[tuple[int, ...], pa.DataType]:
    """Sizes of nested fixed-size lists and the leaf type."""
    shape = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return tuple(shape), t


def _pick_column(uri: str, schema: pa.Schema, column: str | None) -> tuple[str, ColumnKind]:
    """The column to read and its kind; a 'foreign schema' error when there is none."""
    found = ", ".join(f"{f.name}:{f.type}" for f in schema)
    if column is not None:
        if column not in schema.names:
            raise DpmotError(f"{uri}: foreign Parquet schema: no column {column!r} (found {found})")
        kind = _column_kind(schema.field(column).type)
        if kind is None:
            raise DpmotError(
                f"{uri}: foreign Parquet schema: column {column!r} is "
                f"{schema.field(column).type}, not a numeric list or image bytes"
            )
        return column, kind
    for f in schema:
        kind = _column_kind(f.type)
        if kind is not None:
            return f.name, kind
    raise DpmotError(
        f"{uri}: foreign Parquet schema: no numeric list or image-bytes column (found {found})"
    )


@dataclass(frozen=True)
class ParquetFilePart:
    """One Parquet file: its URI and the row count of each row group."""

    uri: str
    groups: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.groups)


@dataclass(frozen=True)
class ParquetSource(Source):
    """One column of a Parquet file or folder; blocks are runs of row groups within a file."""

    files: tuple[ParquetFilePart, ...] = ()
    column: str = ""
    column_kind: ColumnKind = "array"
    mode: str = "RGB"
    image_size: int | None = None
    kind: str = field(init=False, default="parquet")

    @property
    def encoded(self) -> bool:
        return self.column_kind in ("image", "image_struct")

    def worker_view(self) -> ParquetSource:
        return dataclasses.replace(self, files=())

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "column": self.column, "files": len(self.files)}
        return {**out, "mode": self.mode} if self.encoded else out

    @classmethod
    def open(
        cls,
        uri: str,
        files: Sequence[str],
        column: str | None,
        image_size: int | None,
        shape_hint: Sequence[int] | None = None,
        mode: images.ColourMode = "auto",
    ) -> ParquetSource:
        parts, schema, name, kind = [], None, "", "array"
        for f in files:
            meta = _parquet_metadata(f)
            if schema is None:
                schema = meta.schema.to_arrow_schema()
                name, kind = _pick_column(f, schema, column)
            else:
                _check_same_column(f, meta.schema.to_arrow_schema(), name, schema.field(name))
            groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            parts.append(ParquetFilePart(f, groups))
        n = sum(p.rows for p in parts)
        if n == 0:
            raise DpmotError(f"{uri}: empty source (0 rows)")
        src = cls(uri, n, (), "", files=tuple(parts), column=name, column_kind=kind)
        first = next(p for p in parts if p.rows)
        probe = src._read_table(Block(0, 1, first.uri, 0, (0,)), first_row_only=True)
        row_shape, dtype, mode = src._probe(
            first.uri, probe, schema.field(name).type, image_size, shape_hint, mode
        )
        _check_rows(uri, n, row_shape)
        return cls(
            uri,
            n,
            row_shape,
            dtype,
            files=tuple(parts),
            column=name,
            column_kind=kind,
            mode=mode,
            image_size=image_size,
        )

    def _probe(
        self,
        obj: str,
        table: pa.Table,
        t: pa.DataType,
        image_size: int | None,
        shape_hint: Sequence[int] | None,
        mode: images.ColourMode,
    ) -> tuple[tuple[int, ...], str, str]:
        """(row shape, dtype, image mode) from the column type and the first row (encoded
        images: the data set's mode, :func:`_dataset_mode`)."""
        col = table.column(self.column).combine_chunks()
        if self.encoded:
            mode = _dataset_mode(self.uri, mode, self._image_modes())
            img = images.decode_image(_image_bytes(col)[0], f"{obj} (row 0)", mode, image_size)
            return img.shape, "uint8", mode
        if self.column_kind == "array":
            shape, leaf = _fixed_shape(t)
        else:
            values = _flat_values(obj, col, self.column_kind, None)
            shape, leaf = (len(values),), _leaf_type(t)
        if shape_hint and len(shape) == 1 and math.prod(shape_hint) == shape[0]:
            shape = tuple(int(s) for s in shape_hint)
        dtype = np.dtype(leaf.to_pandas_dtype())
        _check_numeric(self.uri, dtype)
        return tuple(shape), dtype.str, "RGB"

    def blocks(self, rows: int) -> list[Block]:
        out, start = [], 0
        for part in self.files:
            obj_row, run, run_rows = 0, [], 0
            for g, g_rows in enumerate(part.groups):
                if run and run_rows + g_rows > rows:
                    out.append(Block(start, start + run_rows, part.uri, obj_row, tuple(run)))
                    start, obj_row, run, run_rows = start + run_rows, obj_row + run_rows, [], 0
                if g_rows:
                    run.append(g)
                    run_rows += g_rows
            if run:
                out.append(Block(start, start + run_rows, part.uri, obj_row, tuple(run)))
                start += run_rows
        return out

    def read(self, block: Block) -> np.ndarray:
        col = self._read_table(block).column(self.column).combine_chunks()
        if len(col) != block.rows:
            raise _corrupt(block.obj, "Parquet", f"expected {block.rows} rows, read {len(col)}")
        if self.encoded:
            return self._decode(block, _image_bytes(col))
        values = _flat_values(block.obj, col, self.column_kind, math.prod(self.row_shape))
        return values.reshape(block.rows, *self.row_shape)

    def _image_modes(self) -> Iterator[tuple[str, str]]:
        """(name, colour mode) of each row's image in order; null rows are left to read()."""
        for part in self.files:
            with _parquet_file(part.uri) as pf:
                batches = pf.iter_batches(batch_size=_MODE_BATCH, columns=[self.column])
                rows = (b for batch in batches for b in _image_bytes(batch.column(0)))
                for r, data in enumerate(rows):
                    if data is not None:
                        name = f"{part.uri} (row {r})"
                        yield name, _mode_of(data, name)

    def _read_table(self, block: Block, first_row_only: bool = False) -> pa.Table:
        with _parquet_file(block.obj) as pf:
            if first_row_only:
                batch = next(pf.iter_batches(batch_size=1, columns=[self.column]))
                return pa.Table.from_batches([batch])
            return pf.read_row_groups(list(block.items), columns=[self.column])

    def _decode(self, block: Block, data: list[bytes | None]) -> np.ndarray:
        out = np.empty((block.rows, *self.row_shape), dtype=np.uint8)
        for r, b in enumerate(data):
            name = f"{block.obj} (row {block.obj_start + r})"
            if b is None:
                raise DpmotError(f"{name}: null image")
            out[r] = _same_shape(
                name, images.decode_image(b, name, self.mode, self.image_size), self.row_shape
            )
        return out


@contextlib.contextmanager
def _parquet_file(uri: str) -> Iterator[pq.ParquetFile]:
    """An open Parquet file; parse failures → 'corrupt or truncated', I/O → storage errors.

    pyarrow raises plain OSError for corrupt pages too, so the file object records its own
    exceptions (storage's watched file) to tell the two apart.
    """
    fs, path = storage.url_to_fs(uri)
    with storage.storage_errors(uri), fs.open(path, "rb") as raw:
        f = storage.WatchedFile(raw)
        try:
            yield pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            if e is f.error:
                raise  # a storage failure: storage_errors translates it
            raise _corrupt(uri, "Parquet", e) from e


def _parquet_metadata(uri: str) -> pq.FileMetaData:
    with _parquet_file(uri) as pf:
        return pf.metadata


def _check_same_column(uri: str, schema: pa.Schema, name: str, first: pa.Field) -> None:
    """Every file of a Parquet folder holds the chosen column with the same type."""
    if name not in schema.names or schema.field(name).type != first.type:
        found = ", ".join(f"{f.name}:{f.type}" for f in schema)
        raise DpmotError(
            f"{uri}: foreign Parquet schema: expected column {name}:{first.type} as in the "
            f"first file; found {found}"
        )


def _leaf_type(t: pa.DataType) -> pa.DataType:
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return t


def _flat_values(obj: str, col: pa.Array, kind: ColumnKind, dim: int | None) -> np.ndarray:
    """Values of a (nested) list column as a flat numpy array; rows checked for nulls and length."""
    if col.null_count:
        raise DpmotError(f"{obj}: column has {col.null_count} null rows")
    if kind == "list":
        lengths = np.diff(col.offsets.to_numpy())
        expect = lengths[0] if dim is None else dim
        bad = np.flatnonzero(lengths != expect)
        if bad.size:
            raise DpmotError(
                f"{obj} (row {bad[0]}): row has {lengths[bad[0]]} values, expected {expect} "
                "(mixed shapes)"
            )
        col = col.flatten()
    while pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
        col = col.flatten()
    if col.null_count:
        raise DpmotError(f"{obj}: column has {col.null_count} null values")
    return col.to_numpy(zero_copy_only=False)


def _image_bytes(col: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(col.type):
        col = col.field("bytes")
    return col.to_pylist()


def _same_shape(name: str, img: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reject an image whose size differs from the first image's."""
    if img.shape != tuple(shape):
        got = f"{img.shape[1]}×{img.shape[0]}×{img.shape[2]}"
        want = f"{shape[1]}×{shape[0]}×{shape[2]}"
        raise DpmotError(
            f"{name}: image is {got} (W×H×C), the first image is {want} "
            "(mixed shapes; set image_size to resize all images)"
        )
    return img


# ---------------------------------------------------------------------------------------------
# Image folders


@dataclass(frozen=True)
class ImageFolderSource(Source):
    """A folder of PNG/JPEG files, one row per file in path order; blocks are file lists."""

    root: str = ""
    files: tuple[str, ...] = ()
    mode: str = "RGB"
    image_size: int | None = None
    kind: str = field(init=False, default="images")

    @property
    def encoded(self) -> bool:
        return True

    @classmethod
    def open(
        cls,
        uri: str,
        paths: Sequence[str],
        image_size: int | None,
        mode: images.ColourMode = "auto",
    ) -> ImageFolderSource:
        fs, _ = storage.url_to_fs(uri)
        mode = _dataset_mode(uri, mode, _file_modes(uri, fs, paths))
        first = _uri_of(fs, paths[0])
        img = images.decode_image(storage.read_bytes(first), first, mode, image_size)
        return cls(
            uri,
            len(paths),
            img.shape,
            "uint8",
            root=uri,
            files=tuple(paths),
            mode=mode,
            image_size=image_size,
        )

    def describe(self) -> dict[str, Any]:
        ends = {"first_file": self.files[0], "last_file": self.files[-1]}
        return {**super().describe(), **ends, "mode": self.mode}

    def worker_view(self) -> ImageFolderSource:
        return dataclasses.replace(self, files=())

    def blocks(self, rows: int) -> list[Block]:
        return [
            Block(b.start, b.stop, self.uri, b.start, self.files[b.start : b.stop])
            for b in super().blocks(rows)
        ]

    def read(self, block: Block) -> np.ndarray:
        fs, _ = storage.url_to_fs(self.root)
        with storage.storage_errors(self.uri):
            data = fs.cat(list(block.items), on_error="return")
        out = np.empty((block.rows, *self.row_shape), dtype=np.uint8)
        for r, path in enumerate(block.items):
            name = _uri_of(fs, path)
            raw = data.get(path) if isinstance(data, dict) else data
            if isinstance(raw, BaseException):
                with storage.storage_errors(name):
                    raise raw
            img = images.decode_image(raw, name, self.mode, self.image_size)
            out[r] = _same_shape(name, img, self.row_shape)
        return out


def _file_modes(uri: str, fs: Any, paths: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(URI, colour mode) of each image file from its first bytes (the whole file when its
    header is longer), ``_MODE_BATCH`` files fetched at once."""
    for a in range(0, len(paths), _MODE_BATCH):
        if a and a % (1 << 16) == 0:
            logger.info("%s: %d of %d images grey so far (--mode skips this)", uri, a, len(paths))
        batch = list(paths[a : a + _MODE_BATCH])
        n = len(batch)
        with storage.storage_errors(uri):
            heads = fs.cat_ranges(batch, [0] * n, [_IMAGE_HEAD_BYTES] * n, on_error="return")
        for path, head in zip(batch, heads, strict=True):
            name = _uri_of(fs, path)
            mode = None if isinstance(head, BaseException) else images.peek_mode(head)
            yield name, mode or _mode_of(storage.read_bytes(name), name)


# ---------------------------------------------------------------------------------------------
# Opening


def open_source(
    uri: storage.Uri,
    column: str | None = None,
    image_size: int | None = None,
    mode: images.ColourMode = "auto",
) -> Source:
    """Describe the data set at ``uri`` (reads headers, footers and listings only; ``mode``:
    the colour mode of encoded images, ``auto`` for RGB unless every image is greyscale)."""
    uri = os.fspath(uri).rstrip("/")
    fs, path = storage.url_to_fs(uri)
    with storage.storage_errors(uri):
        fs.invalidate_cache(path)
        if not fs.exists(path):
            raise FileNotFoundError(path)
        is_dir = fs.isdir(path)
    lower = uri.lower()
    if not is_dir:
        if lower.endswith(".npy"):
            return NpySource.open(uri)
        if lower.endswith(".npz"):
            return NpzSource.open(uri, column)
        if lower.endswith(_PARQUET_SUFFIXES):
            return ParquetSource.open(uri, [uri], column, image_size, mode=mode)
        if lower.endswith(images.IMAGE_SUFFIXES):
            return ImageFolderSource.open(uri, [path], image_size, mode)
        raise DpmotError(
            f"{uri}: unsupported input; expected .npy, .npz, .parquet, or a folder of Parquet "
            "or PNG/JPEG files"
        )
    with storage.storage_errors(uri):
        found = sorted(p for p in fs.find(path) if not _is_hidden(p))
    tables = [_uri_of(fs, p) for p in found if p.lower().endswith(_PARQUET_SUFFIXES)]
    if tables:
        return ParquetSource.open(uri, tables, column, image_size, _shape_hint(uri), mode)
    pictures = [p for p in found if p.lower().endswith(images.IMAGE_SUFFIXES)]
    if pictures:
        return ImageFolderSource.open(uri, pictures, image_size, mode)
    raise DpmotError(f"{uri}: empty source (no Parquet or PNG/JPEG files in the folder)")


def _shape_hint(uri: str) -> list[int] | None:
    """The per-row ``shape`` from a data set's ``manifest.json``, if the folder has one."""
    manifest = storage.join(uri, datasets.MANIFEST)
    if not storage.exists(manifest):
        return None
    m = storage.read_json(manifest)
    shape = m.get("shape") if isinstance(m, dict) else None
    if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
        return shape
    return None


# ---------------------------------------------------------------------------------------------
# Class labels


@dataclass(frozen=True)
class Labels:
    """One class id per source row: ``values`` (n,) int64 ≥ 0, and where they come from.

    ``classes`` names the ids of an image folder's class subfolders (id = position).
    """

    values: np.ndarray
    origin: str  # "folder", "column NAME" or "array NAME"
    classes: tuple[str, ...] = ()

    def describe(self, copies: int = 1) -> dict[str, Any]:
        """The targets manifest's ``labels`` (each row written ``copies`` times)."""
        targets = np.repeat(self.values, copies)
        return {"origin": self.origin, **datasets.label_summary(targets, self.classes)}


def read_labels(source: Source, column: str | None = None) -> Labels | None:
    """The class labels of ``source``'s rows, or None when it has none.

    ``column`` names the Parquet column or ``.npz`` member (default: ``label``; ``y`` or
    ``labels``); a named one must exist. Image folders take their class subfolders. Missing,
    non-integer and negative labels are one-line errors naming the file (and row).
    """
    if isinstance(source, ImageFolderSource) and column is None:
        return _folder_labels(source)
    if isinstance(source, ParquetSource):
        return _column_labels(source, column)
    if isinstance(source, NpzSource):
        return _array_labels(source, column)
    if column is not None:
        raise DpmotError(f"{source.uri}: a {source.kind} source has no label column {column!r}")
    return None


def check_labels(obj: str, values: np.ndarray, first_row: int = 0) -> np.ndarray:
    """``values`` as int64 class ids; missing (NaN), non-integer or negative ones are errors."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise DpmotError(f"{obj}: labels must be integers, got {values.dtype}")
    problems = ()
    if values.dtype.kind == "f":
        problems = ((np.isnan(values), "missing"), (values != np.round(values), "not an integer"))
    for bad, what in (*problems, (values < 0, "negative")):
        if bad.any():
            r = int(np.argmax(bad))
            raise DpmotError(f"{obj} (row {first_row + r}): label {values[r]} is {what}")
    return values.astype(np.int64)


def _folder_labels(source: ImageFolderSource) -> Labels | None:
    """Ids of the first-level subfolders holding each image; None when all lie in the root."""
    fs, root = storage.url_to_fs(source.root)
    root = root.rstrip("/")
    parts = [p[len(root) + 1 :].split("/") for p in source.files]
    if all(len(q) == 1 for q in parts):
        return None
    loose = next((p for p, q in zip(source.files, parts, strict=True) if len(q) == 1), None)
    if loose is not None:
        raise DpmotError(
            f"{_uri_of(fs, loose)}: not in a class subfolder, while other images are (an "
            "image folder with classes keeps every image in one; label_column none ignores them)"
        )
    classes = tuple(sorted({q[0] for q in parts}))
    ids = {c: i for i, c in enumerate(classes)}
    return Labels(np.array([ids[q[0]] for q in parts], np.int64), "folder", classes)


def _column_labels(source: ParquetSource, column: str | None) -> Labels | None:
    """The integer column ``column`` (default ``label``) of every file, in row order."""
    name = column or LABEL_COLUMN
    out = []
    for part in source.files:
        schema = _parquet_metadata(part.uri).schema.to_arrow_schema()
        if name not in schema.names:
            if column is None and not out:
                return None
            found = ", ".join(schema.names)
            raise DpmotError(f"{part.uri}: no label column {name!r} (found {found})")
        with _parquet_file(part.uri) as pf:
            col = pf.read(columns=[name]).column(name).combine_chunks()
        if col.null_count:
            r = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
            raise DpmotError(f"{part.uri} (row {r}): label is missing")
        t = col.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise DpmotError(f"{part.uri}: label column {name!r} is {t}, not integers")
        out.append(check_labels(part.uri, col.to_numpy(zero_copy_only=False)))
    return Labels(np.concatenate(out), f"column {name}")


def _array_labels(source: NpzSource, column: str | None) -> Labels | None:
    """The archive member ``column`` (default ``y``, else ``labels``): one label per row."""
    with _open_zip(source.uri) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if column is not None and column not in names:
            raise DpmotError(f"{source.uri}: no label array {column!r} (found {', '.join(names)})")
        found = [n for n in LABEL_MEMBERS if n in names and n != source.member]
        name = column or (found[0] if found else None)
        if name is None:
            return None
        with zf.open(name + ".npy") as f:
            values = np.lib.format.read_array(f, allow_pickle=False)
    obj = f"{source.uri}[{name}]"
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise DpmotError(f"{obj}: labels must be one integer per row, got shape {values.shape}")
    if len(values) != source.n:
        raise DpmotError(f"{obj}: {len(values)} labels for {source.n} rows (missing for some rows)")
    return Labels(check_labels(obj, values), f"array {name}")
