"""Storage plumbing: fsspec URIs, atomic writes, ``_SUCCESS`` markers, one-line I/O errors.

Every URI may be a local path, ``file://``, ``s3://`` or any other fsspec protocol. The S3
endpoint and credentials come only from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) through s3fs/botocore; nothing here sets them.

Every file is written atomically (a temporary sibling whose name starts with ``.``, then a
move), so readers never see a half-written file. All I/O failures become a one-line
:class:`DpmotError` in one place, :func:`storage_errors`. What the files of a data set are
called and hold is :mod:`dpmot_dist.io.datasets`' business.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from fsspec.spec import AbstractFileSystem

from dpmot_dist.errors import DpmotError

logger = logging.getLogger(__name__)

Uri = str | os.PathLike[str]
"""A local path, ``file://``, ``s3://`` or any other fsspec URL."""

SUCCESS = "_SUCCESS"

_ACCESS_DENIED = "access denied (check AWS credentials / AWS_ENDPOINT_URL)"
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "403",
    }
)
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


# ---------------------------------------------------------------------------------------------
# Errors


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn I/O, S3 and credential failures inside the block into a one-line DpmotError.

    FileNotFoundError -> "<uri>: no such file or object"; PermissionError and botocore
    credential errors -> "<uri>: access denied (...)"; any other OSError or botocore error ->
    "<uri>: <short reason>". A DpmotError raised inside passes through unchanged.
    """
    try:
        yield
    except DpmotError:
        raise
    except FileNotFoundError as e:
        raise DpmotError(f"{uri}: no such file or object") from e
    except (OSError, BotoCoreError, ClientError) as e:
        if _is_access_error(e):
            raise DpmotError(f"{uri}: {_ACCESS_DENIED}") from e
        raise DpmotError(f"{uri}: {_short_reason(e)}") from e


def _is_access_error(e: BaseException) -> bool:
    """True for permission and credential failures (s3fs maps most to PermissionError)."""
    if isinstance(e, PermissionError | NoCredentialsError | PartialCredentialsError):
        return True
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code")) in _ACCESS_CODES
    return False


def _short_reason(e: BaseException) -> str:
    """First line of an exception's reason, without the file name OSError appends."""
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    lines = str(reason).strip().splitlines() or [type(e).__name__]
    return lines[0][:200]


def corrupt_error(uri: str, kind: str, e: BaseException | str) -> DpmotError:
    """The error for a file whose bytes cannot be parsed."""
    reason = e if isinstance(e, str) else _short_reason(e)
    return DpmotError(f"{uri}: corrupt or truncated {kind} file ({reason})")


# ---------------------------------------------------------------------------------------------
# URIs and bytes


def url_to_fs(uri: Uri) -> tuple[AbstractFileSystem, str]:
    """Return the fsspec filesystem and the protocol-less path for ``uri``."""
    uri = os.fspath(uri)
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as e:  # e.g. "Install gcsfs to access Google Storage"
        raise DpmotError(f"{uri}: {_short_reason(e)}") from e
    except ValueError as e:  # e.g. "Protocol not known: foo"
        raise DpmotError(f"{uri}: unsupported URI ({_short_reason(e)})") from e


def join(uri: Uri, *parts: str) -> str:
    """Join path components onto a URI with ``/`` (works for local paths and URLs)."""
    out = os.fspath(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: Uri) -> bool:
    """True when a file, object or folder (a non-empty prefix on object stores) exists."""
    fs, path = url_to_fs(uri)
    with storage_errors(os.fspath(uri)):
        fs.invalidate_cache(path)  # another process may have written it since we last listed
        return bool(fs.exists(path))


def _has_directories(fs: AbstractFileSystem) -> bool:
    """False for object stores, where folders are only key prefixes."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return not set(protocols) & _OBJECT_STORES


def remove_quietly(fs: AbstractFileSystem, path: str) -> None:
    """Best-effort removal of a temporary file."""
    with contextlib.suppress(Exception):
        fs.rm_file(path)


def write_bytes_atomic(uri: Uri, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that readers see either nothing or the whole file.

    The bytes go to a temporary sibling ``.<name>.tmp-<uuid>`` that is then moved into place
    (a rename on local disk, a server-side copy on object stores); on failure it is removed.
    """
    uri = os.fspath(uri)
    fs, path = url_to_fs(uri)
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
    with storage_errors(uri):
        if _has_directories(fs):
            fs.makedirs(parent, exist_ok=True)
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        except BaseException:
            remove_quietly(fs, tmp)
            raise
    logger.debug("wrote %s (%d bytes)", uri, len(data))


def read_bytes(uri: Uri) -> bytes:
    """Read a whole file or object."""
    fs, path = url_to_fs(uri)
    with storage_errors(os.fspath(uri)):
        return fs.cat_file(path)


def write_json_atomic(uri: Uri, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes_atomic(uri, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(uri: Uri) -> Any:
    """Read a JSON file."""
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as e:
        raise DpmotError(f"{os.fspath(uri)}: not valid JSON ({_short_reason(e)})") from e


def save_npy(uri: Uri, arr: np.ndarray) -> None:
    """Save an array in ``.npy`` format, atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    write_bytes_atomic(uri, buf.getvalue())


def load_npy(uri: Uri) -> np.ndarray:
    """Load a ``.npy`` array (no pickled objects)."""
    data = read_bytes(uri)
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise corrupt_error(os.fspath(uri), "npy", e) from e


# ---------------------------------------------------------------------------------------------
# Output folders


def mark_success(folder_uri: Uri) -> None:
    """Write the ``_SUCCESS`` marker that says the folder's output is complete."""
    write_bytes_atomic(join(folder_uri, SUCCESS), b"")


def is_success(folder_uri: Uri) -> bool:
    """True when the folder carries a ``_SUCCESS`` marker."""
    return exists(join(folder_uri, SUCCESS))


def prepare_output(folder_uri: Uri, overwrite: bool, resume: bool = False) -> None:
    """Make ``folder_uri`` ready to receive an output.

    An existing non-empty folder is an error unless ``overwrite`` (delete it first) or
    ``resume`` (keep it, the caller continues from what is there).
    """
    uri = os.fspath(folder_uri)
    if overwrite and resume:
        raise DpmotError(f"{uri}: pass only one of --overwrite and --resume")
    fs, path = url_to_fs(uri)
    with storage_errors(uri):
        fs.invalidate_cache(path)
        has_content = fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path, detail=False)))
        if has_content and overwrite:
            logger.info("removing existing output %s (--overwrite)", uri)
            fs.rm(path, recursive=True)
        elif has_content and not resume:
            raise DpmotError(
                f"{uri}: output exists; pass --overwrite to replace it or --resume to continue"
            )
        if _has_directories(fs):
            fs.makedirs(path, exist_ok=True)


class WatchedFile:
    """Delegate to a file object, remembering the last exception its own I/O raised.

    pyarrow re-raises such exceptions unchanged, so a parse failure can be told apart from a
    storage failure (both may be plain OSError).
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._f, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                self.error = e
                raise

        return call
