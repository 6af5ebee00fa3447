"""Storage plumbing: fsspec URIs, atomic writes, ``_SUCCESS`` markers, one-line I/O errors.

Every URI may be a local path, ``file://``, ``s3://`` or any other fsspec protocol. The S3
endpoint and credentials come only from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) through s3fs/botocore; nothing here sets them.

Every file is written atomically, so readers never see a half-written file: on object stores
one whole-object put (an object appears complete or not at all), on file systems a temporary
sibling whose name starts with ``.`` (which Parquet readers skip), then a rename.
:func:`create_exclusive` writes only if nothing is there yet (first writer wins: a conditional
put ``If-None-Match: *`` on S3, a hard link on local disk).

Failures: every step that can be repeated safely (a read, a listing, a whole-object put, the
rename of a temporary file) runs under one retry policy, :class:`RetryPolicy` (environment
variables ``DPMOT_IO_RETRIES``, ``DPMOT_IO_BACKOFF``, ``DPMOT_IO_MAX_BACKOFF``,
``DPMOT_IO_TIMEOUT``), through :func:`retrying`; only transient failures (refused or dropped
connections, timeouts, throttling, 5xx) are retried, each retry logged once. Every I/O failure
becomes a one-line :class:`DpmotError` in one place, :func:`storage_errors`. What the files of
a data set are called and hold is :mod:`dpmot_dist.io.datasets`' business.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import botocore.exceptions as boto
import fsspec
import fsspec.asyn
import numpy as np
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from dpmot_dist.errors import DpmotError

logger = logging.getLogger(__name__)

Uri = str | os.PathLike[str]
"""A local path, ``file://``, ``s3://`` or any other fsspec URL."""

SUCCESS = "_SUCCESS"
LEASE_DIR = "_lease"
"""Folder of an output's lease files (:mod:`dpmot_dist.io.lease`); ``--overwrite`` keeps it."""
T = TypeVar("T")

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
_TRANSIENT_CODES = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)
_PUT_BYTES_PER_TIMEOUT = 16 << 20  # a put may take one timeout per 16 MiB (0.5 MiB/s at 30 s)
_TEMP_MARK = ".tmp-"


# ---------------------------------------------------------------------------------------------
# Errors


class StorageUnavailable(DpmotError):
    """A transient storage failure (the store unreachable, a timeout, throttling): retrying
    the step that met it may succeed (:func:`retrying` does)."""


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn I/O, S3 and credential failures inside the block into a one-line DpmotError.

    FileNotFoundError -> "<uri>: no such file or object"; PermissionError and botocore
    credential errors -> "<uri>: access denied (...)"; transient failures ->
    :class:`StorageUnavailable` "<uri>: <short reason>"; any other OSError or botocore error ->
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
        if is_transient(e):
            raise StorageUnavailable(f"{uri}: {_short_reason(e)}") from e
        raise DpmotError(f"{uri}: {_short_reason(e)}") from e
    except Exception as e:
        if is_transient(e):  # e.g. aiohttp errors that botocore did not wrap
            raise StorageUnavailable(f"{uri}: {_short_reason(e)}") from e
        raise


def _is_access_error(e: BaseException) -> bool:
    """True for permission and credential failures (s3fs maps most to PermissionError)."""
    if isinstance(e, PermissionError | NoCredentialsError | PartialCredentialsError):
        return True
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code")) in _ACCESS_CODES
    return False


def _causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from (s3fs wraps botocore's in OSError)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
    """True for failures that may pass if the same step is tried again: refused, dropped or
    timed-out connections, throttling and 5xx answers. Never for missing objects, access
    errors or local disk errors (ENOSPC, EIO, ...)."""
    if isinstance(e, StorageUnavailable):
        return True
    if _is_access_error(e) or isinstance(e, FileNotFoundError | DpmotError):
        return False
    for x in _causes(e):
        if isinstance(x, ClientError):
            return str(x.response.get("Error", {}).get("Code")) in _TRANSIENT_CODES
        if isinstance(x, boto.SSLError):
            return False
        if isinstance(x, boto.ConnectionError | boto.HTTPClientError | boto.IncompleteReadError):
            return True
        if isinstance(x, ConnectionError | TimeoutError) or _is_aiohttp_error(x):
            return True
    return False


def _is_aiohttp_error(e: BaseException) -> bool:
    """aiohttp's client errors (the transport under s3fs), when aiohttp is installed."""
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(e, aiohttp.ClientError)


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
# Retries


def _env_number(name: str, default: float, kind: type = float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise DpmotError(f"{name}={raw!r}: expected a non-negative {kind.__name__}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How a storage step survives a flaky store: after a transient failure it is tried up to
    ``retries`` more times, waiting w_k = min(``backoff`` · 2^k, ``max_backoff``) seconds
    before retry k + 1 (k = 0, 1, ...). Each attempt is bounded: ``timeout`` seconds to connect
    and between bytes of an answer (botocore's connect/read timeouts) and, for a put of B
    bytes, ``timeout`` · (1 + B / 16 MiB) in all, so a hung server (one that accepts
    connections and never answers) costs at most (retries + 1) attempts + Σ w_k.
    """

    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    timeout: float = 20.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy set by ``DPMOT_IO_RETRIES``, ``DPMOT_IO_BACKOFF``,
        ``DPMOT_IO_MAX_BACKOFF`` and ``DPMOT_IO_TIMEOUT`` (seconds; defaults 5, 1, 30, 20)."""
        d = cls()
        timeout = _env_number("DPMOT_IO_TIMEOUT", d.timeout)
        if timeout == 0:
            raise DpmotError("DPMOT_IO_TIMEOUT=0: the timeout must be positive")
        return cls(
            retries=int(_env_number("DPMOT_IO_RETRIES", d.retries, int)),
            backoff=_env_number("DPMOT_IO_BACKOFF", d.backoff),
            max_backoff=_env_number("DPMOT_IO_MAX_BACKOFF", d.max_backoff),
            timeout=timeout,
        )

    def wait(self, k: int) -> float:
        """Seconds before retry k + 1."""
        return min(self.backoff * 2**k, self.max_backoff)

    def put_deadline(self, nbytes: int) -> float:
        """Longest a put of ``nbytes`` may take before it counts as hung."""
        return self.timeout * (1 + nbytes / _PUT_BYTES_PER_TIMEOUT)


def retrying(uri: Uri, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` — one step on ``uri`` that is safe to repeat (a read, a listing,
    a whole-object put) — under :class:`RetryPolicy`; failures become one-line DpmotErrors.

    Transient failures (:func:`is_transient`, also a :class:`StorageUnavailable` from a nested
    :func:`storage_errors`) are retried, each retry logged once as a warning; when the retries
    run out the error names the object, the reason and the attempts. Any other failure is
    raised at once.
    """
    uri = os.fspath(uri)
    policy, t0 = RetryPolicy.from_env(), time.monotonic()
    for k in range(policy.retries + 1):
        try:
            with storage_errors(uri):
                return fn(*args, **kwargs)
        except StorageUnavailable as e:
            if k == policy.retries:
                seconds = time.monotonic() - t0
                raise DpmotError(
                    f"{e} (gave up after {k + 1} attempts in {seconds:.0f} s; "
                    "DPMOT_IO_RETRIES and DPMOT_IO_BACKOFF set the retries)"
                ) from e
            logger.warning("%s; retry %d of %d in %.1f s", e, k + 1, policy.retries, policy.wait(k))
            time.sleep(policy.wait(k))
    raise AssertionError("unreachable")


def _bounded(fs: AbstractFileSystem, method: str, timeout: float, *args: Any, **kw: Any) -> Any:
    """``fs.method(*args, **kw)``, cancelled after ``timeout`` seconds on async filesystems.

    botocore's read timeout alone does not bound a put: aiohttp waits for the server's
    ``100 Continue`` and for the body to drain without any timeout.
    """
    if not isinstance(fs, fsspec.asyn.AsyncFileSystem) or fs.asynchronous:
        return getattr(fs, method)(*args, **kw)
    try:
        return fsspec.asyn.sync(fs.loop, getattr(fs, f"_{method}"), *args, timeout=timeout, **kw)
    except FSTimeoutError as e:
        raise TimeoutError(f"no answer within {timeout:.0f} s") from e


# ---------------------------------------------------------------------------------------------
# URIs and bytes


def url_to_fs(uri: Uri) -> tuple[AbstractFileSystem, str]:
    """Return the fsspec filesystem and the protocol-less path for ``uri``.

    S3 filesystems get the policy's connect/read timeouts and no retries of their own
    (neither s3fs's nor botocore's): :func:`retrying` is the one retry loop. They keep no
    listings cache: another run may have written an object since we last listed its folder.
    """
    uri = os.fspath(uri)
    protocol = fsspec.core.split_protocol(uri)[0]
    try:
        if protocol in ("s3", "s3a"):
            options = {"config_kwargs": _s3_config(protocol), "use_listings_cache": False}
            fs, path = fsspec.core.url_to_fs(uri, **options)
            fs.retries = 1  # s3fs's own loop: one attempt
            return fs, path
        return fsspec.core.url_to_fs(uri)
    except ImportError as e:  # e.g. "Install gcsfs to access Google Storage"
        raise DpmotError(f"{uri}: {_short_reason(e)}") from e
    except ValueError as e:  # e.g. "Protocol not known: foo"
        raise DpmotError(f"{uri}: unsupported URI ({_short_reason(e)})") from e


def _s3_config(protocol: str) -> dict[str, Any]:
    """botocore client options: the policy's timeouts, one attempt per call (user fsspec
    configuration, e.g. ``FSSPEC_S3_CONFIG_KWARGS``, takes precedence)."""
    timeout = RetryPolicy.from_env().timeout
    ours = {
        "connect_timeout": timeout,
        "read_timeout": timeout,
        "retries": {"total_max_attempts": 1},
    }
    theirs = fsspec.config.conf.get(protocol, {}).get("config_kwargs", {})
    return {**ours, **theirs}


def join(uri: Uri, *parts: str) -> str:
    """Join path components onto a URI with ``/`` (works for local paths and URLs)."""
    out = os.fspath(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: Uri) -> bool:
    """True when a file, object or folder (a non-empty prefix on object stores) exists."""
    fs, path = url_to_fs(uri)
    return retrying(uri, _exists, fs, path)


def _exists(fs: AbstractFileSystem, path: str) -> bool:
    fs.invalidate_cache(path)  # another process may have written it since we last listed
    return bool(fs.exists(path))


def _has_directories(fs: AbstractFileSystem) -> bool:
    """False for object stores, where folders are only key prefixes."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return not set(protocols) & _OBJECT_STORES


def list_names(folder_uri: Uri) -> list[str]:
    """Base names of the entries of a folder, listed afresh (none when it does not exist)."""
    fs, path = url_to_fs(folder_uri)
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in retrying(folder_uri, _listing, fs, path)]


def _listing(fs: AbstractFileSystem, path: str) -> list[str]:
    fs.invalidate_cache(path)  # another process may have written there since we last listed
    return fs.ls(path, detail=False) if fs.exists(path) else []


def remove(uri: Uri) -> None:
    """Remove a file, object or folder (nothing to do when it is not there)."""
    fs, path = url_to_fs(uri)
    retrying(uri, _remove_tree, fs, path)


def remove_empty_folder(uri: Uri) -> None:
    """Remove a folder if it is empty (file systems only: object stores have no folders)."""
    fs, path = url_to_fs(uri)
    if _has_directories(fs):
        with contextlib.suppress(OSError):
            fs.rmdir(path)


def remove_quietly(fs: AbstractFileSystem, path: str) -> None:
    """Best-effort removal of a temporary file."""
    with contextlib.suppress(Exception):
        fs.rm_file(path)


def write_bytes_atomic(uri: Uri, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that readers see either nothing, the old file or the whole
    new one.

    Object stores: one whole-object put (retried; repeating it is harmless). File systems: the
    bytes go to a temporary sibling ``.<name>.tmp-<uuid>`` that is then renamed into place;
    on failure it is removed.
    """
    _write(os.fspath(uri), data, exclusive=False)


def create_exclusive(uri: Uri, data: bytes) -> bool:
    """Write ``data`` to ``uri`` atomically unless something is there already (first writer
    wins); True when this call created it.

    S3: a put with ``If-None-Match: *`` (when an earlier attempt of this call may have landed
    before its answer was lost, the object is read back: our bytes count as ours). Local disk:
    a temporary file hard-linked to the name (``link`` fails when the name exists). Other
    file systems: a check, then a rename (not atomic between two writers).
    """
    return _write(os.fspath(uri), data, exclusive=True)


def _write(uri: str, data: bytes, exclusive: bool) -> bool:
    fs, path = url_to_fs(uri)
    if _has_directories(fs):
        created = retrying(uri, _write_via_temp, fs, path, data, exclusive)
    else:
        attempts: list[int] = []
        created = retrying(uri, _put_object, fs, path, data, exclusive, attempts)
    logger.debug("wrote %s (%d bytes)%s", uri, len(data), "" if created else ": already there")
    return created


def _put_object(
    fs: AbstractFileSystem, path: str, data: bytes, exclusive: bool, attempts: list[int]
) -> bool:
    """One attempt at a whole-object put (``attempts`` counts them across retries)."""
    attempts.append(1)
    deadline = RetryPolicy.from_env().put_deadline(len(data))
    try:
        _bounded(fs, "pipe_file", deadline, path, data, **({"mode": "create"} if exclusive else {}))
    except FileExistsError:
        if len(attempts) > 1 and _bounded(fs, "cat_file", deadline, path) == data:
            return True  # an earlier attempt of ours landed; its answer was lost
        return False
    return True


def _write_via_temp(fs: AbstractFileSystem, path: str, data: bytes, exclusive: bool) -> bool:
    """Write a temporary sibling, then rename (or, exclusive, link) it into place.

    A temporary file that another run removed meanwhile (:func:`remove_stale_temps` at its
    start) is written again, up to three times.
    """
    parent, _, name = path.rpartition("/")
    fs.makedirs(parent, exist_ok=True)
    for attempt in range(3):
        tmp = f"{parent}/.{name}{_TEMP_MARK}{uuid.uuid4().hex}"
        try:
            fs.pipe_file(tmp, data)
            if not exclusive:
                fs.mv(tmp, path)
                return True
            return _link_exclusive(fs, tmp, path)
        except FileNotFoundError:
            if attempt == 2 or fs.exists(tmp) or not fs.isdir(parent):
                raise
            logger.info("%s: temporary file removed by another run; writing it again", path)
        finally:
            remove_quietly(fs, tmp)
    raise AssertionError("unreachable")


def _link_exclusive(fs: AbstractFileSystem, tmp: str, path: str) -> bool:
    """Give the finished temporary file ``tmp`` the name ``path`` unless it exists."""
    if isinstance(fs, LocalFileSystem):
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise  # else a file system without hard links: check, then rename
    if fs.exists(path):
        return False
    fs.mv(tmp, path)
    return True


def read_bytes(uri: Uri) -> bytes:
    """Read a whole file or object."""
    fs, path = url_to_fs(uri)
    return retrying(uri, fs.cat_file, path)


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
    content = retrying(uri, _contents, fs, path)
    if content and overwrite:
        logger.info("removing existing output %s (--overwrite)", uri)
        for child in content:
            retrying(uri, _remove_tree, fs, child)
    elif content and not resume:
        raise DpmotError(
            f"{uri}: output exists; pass --overwrite to replace it or --resume to continue"
        )
    if _has_directories(fs):
        retrying(uri, fs.makedirs, path, exist_ok=True)


def _contents(fs: AbstractFileSystem, path: str) -> list[str]:
    """What a folder holds apart from its lease (``[path]`` when it is a file)."""
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    if not fs.isdir(path):
        return [path]
    names = fs.ls(path, detail=False)
    return [p for p in names if p.rstrip("/").rsplit("/", 1)[-1] != LEASE_DIR]


def _remove_tree(fs: AbstractFileSystem, path: str) -> None:
    """Remove a file or folder; one already gone (an earlier attempt) is fine."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def remove_stale_temps(folder_uri: Uri) -> int:
    """Remove the temporary files (``.<name>.tmp-<uuid>``) that killed writers left in a
    folder; returns how many. A writer running now whose temporary file goes writes it again."""
    stale = [n for n in list_names(folder_uri) if n.startswith(".") and _TEMP_MARK in n]
    for name in stale:
        remove(join(folder_uri, name))
    return len(stale)


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
