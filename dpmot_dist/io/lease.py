"""Output leases: one run at a time writes a folder whose files it rewrites (a fit's checkpoints).

A lease is a file ``_lease/<generation>.json`` in the output folder::

    {"owner": "<uuid4 hex>", "host": "...", "pid": 123, "boot_id": "...", "pid_ns": "...",
     "taken": 1700000000.0, "expires": 1700000300.0, "ttl": 300.0}

*Taking it.* The newest generation g in ``_lease/`` is live while it has not expired and its
holder is not provably gone (same host, boot and process namespace as this process, and no
such pid: a run killed on this machine frees its folder at once). A live lease refuses the
run with one line. Otherwise the run creates generation g + 1 with
:func:`~dpmot_dist.io.storage.create_exclusive` (a conditional put ``If-None-Match: *`` on S3,
a hard link on local disk): of two runs that take over at the same moment exactly one
succeeds, the other refuses. Older generations are then removed.

*Holding it.* A background thread rewrites the holder's own file with a later expiry every
ttl / 4 seconds. :meth:`OutputLease.check`, called before each write of the holder, fails
from ttl / 8 before the expiry by the holder's clock (renewals failed: the store was down for
longer than that, or the process was frozen) and once a generation g + 1 exists (another run
took over). *Releasing* removes the file.

The TTL is ``DPMOT_LEASE_TTL`` seconds (default 300): a run that dies on another machine
locks its folder for at most that long. The hosts' clocks must agree to well within the TTL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import storage

logger = logging.getLogger(__name__)

DEFAULT_TTL = 300.0
_GENERATION_RE = re.compile(r"(\d{8})\.json$")
_HELD: set[str] = set()  # owners of the leases this process holds now


def lease_ttl() -> float:
    """Seconds a lease lasts without renewal: ``DPMOT_LEASE_TTL`` (default 300)."""
    raw = os.environ.get("DPMOT_LEASE_TTL", "").strip()
    if not raw:
        return DEFAULT_TTL
    try:
        ttl = float(raw)
    except ValueError:
        ttl = 0.0
    if not ttl > 0:
        raise DpmotError(f"DPMOT_LEASE_TTL={raw!r}: expected a positive number of seconds")
    return ttl


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def this_process() -> dict[str, Any]:
    """Who holds a lease: host, pid, boot id and pid namespace (the last two on Linux)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
    }


def holder_is_gone(record: dict[str, Any]) -> bool:
    """True when the lease's holder ran on this very machine and process namespace (same
    host, boot id and pid namespace) and its process no longer exists, or is this process
    and no longer holds it (an earlier run in this process that ended without releasing)."""
    me = this_process()
    same = all(me[k] and record.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))
    if not same:
        return False
    if record.get("pid") == me["pid"]:
        return record.get("owner") not in _HELD
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return False


class OutputLease:
    """The lease on ``folder`` (a context manager: take, renew in the background, release)."""

    def __init__(self, folder: storage.Uri, ttl: float | None = None) -> None:
        self.folder = os.fspath(folder).rstrip("/")
        self.ttl = lease_ttl() if ttl is None else ttl
        self.owner = uuid.uuid4().hex
        self.generation = 0
        self.taken = self.expires = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _uri(self, generation: int) -> str:
        return storage.join(self.folder, storage.LEASE_DIR, f"{generation:08d}.json")

    def _generations(self) -> list[int]:
        names = storage.list_names(storage.join(self.folder, storage.LEASE_DIR))
        return sorted(int(m.group(1)) for name in names if (m := _GENERATION_RE.match(name)))

    def _read(self, generation: int) -> dict[str, Any] | None:
        """A lease file's record; None when it is gone; {} when it is not a lease record."""
        uri = self._uri(generation)
        try:
            record = json.loads(storage.read_bytes(uri))
        except DpmotError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None  # released meanwhile
            raise
        except ValueError as e:
            logger.warning("%s: not a lease record (%s); treating it as expired", uri, e)
            return {}
        return record if isinstance(record, dict) else {}

    def _record(self, now: float) -> dict[str, Any]:
        return {
            "owner": self.owner,
            **this_process(),
            "taken": self.taken or now,
            "expires": now + self.ttl,
            "ttl": self.ttl,
        }

    def _refusal(self, record: dict[str, Any], generation: int) -> DpmotError:
        left = float(record.get("expires", 0)) - time.time()
        return DpmotError(
            f"{self.folder}: in use by another run (pid {record.get('pid', '?')} on "
            f"{record.get('host', '?')}, lease {self._uri(generation)}, which expires in "
            f"{max(left, 0):.0f} s unless renewed); wait for that run or stop it"
        )

    def acquire(self) -> None:
        """Take the lease, or raise a one-line DpmotError while another run holds it."""
        generations = self._generations()
        latest = generations[-1] if generations else 0
        record = self._read(latest) if generations else None
        if record is not None and _is_live(record):
            raise self._refusal(record, latest)
        now = time.time()
        mine = self._record(now)
        if not storage.create_exclusive(self._uri(latest + 1), _dump(mine)):
            raise self._refusal(self._read(latest + 1) or {}, latest + 1)
        self.generation, self.taken, self.expires = latest + 1, now, mine["expires"]
        _HELD.add(self.owner)
        for g in generations:
            storage.remove(self._uri(g))
        logger.debug("lease taken: %s (ttl %.0f s)", self._uri(self.generation), self.ttl)

    def renew(self) -> None:
        """Push the expiry ttl seconds ahead (the holder's own file; nobody else writes it)."""
        now = time.time()
        try:
            self._check_held(now)
            if self.lost is not None:
                return
            record = self._record(now)
            storage.write_bytes_atomic(self._uri(self.generation), _dump(record))
        except DpmotError as e:  # the store is down: the next renewal may succeed
            logger.warning("lease renewal failed (%s); next try in %.0f s", e, self.ttl / 4)
            return
        self.expires = record["expires"]

    def _check_held(self, now: float) -> None:
        if self.lost is None and now >= self.expires - self.ttl / 8:
            self.lost = "it was not renewed in time: the store was unreachable or the run paused"
        elif self.lost is None and storage.exists(self._uri(self.generation + 1)):
            self.lost = "another run took it over"

    def check(self) -> None:
        """Raise a one-line DpmotError unless this run still holds the lease."""
        self._check_held(time.time())
        if self.lost is not None:
            raise DpmotError(
                f"{self.folder}: lost the output lease ({self.lost}); stopped before writing "
                "more; another run may be writing there"
            )

    def release(self) -> None:
        """Remove the lease file (best effort: an expired lease frees itself anyway)."""
        _HELD.discard(self.owner)
        try:
            storage.remove(self._uri(self.generation))
            storage.remove_empty_folder(storage.join(self.folder, storage.LEASE_DIR))
        except DpmotError as e:
            logger.warning("%s: could not release the lease (%s)", self.folder, e)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self.renew()

    def __enter__(self) -> OutputLease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="dpmot-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()


def _is_live(record: dict[str, Any]) -> bool:
    """Whether a lease record still holds its folder."""
    try:
        expires = float(record.get("expires", 0))
    except (TypeError, ValueError):
        return False
    return expires > time.time() and not holder_is_gone(record)


def _dump(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()
