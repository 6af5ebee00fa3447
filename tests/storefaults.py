"""Storage faults for tests: a moto S3 server in a process of its own, and what a folder holds.

:class:`MotoProcess` runs moto's server (``python tests/storefaults.py PORT``: moto's
``ThreadedMotoServer`` behind moto's request recorder) on 127.0.0.1. A test can

- ``pause()`` / ``resume()`` it (SIGSTOP / SIGCONT): the kernel still accepts connections, but
  nothing answers: clients see a *hung* store and must time out; its state is kept;
- ``kill()`` it (SIGKILL) and ``start()`` it again on the same port: clients see *refused*
  connections until the new process listens, and the new process holds the objects the old
  one had: before it listens it replays the old one's request log (every request moto
  received, written as it arrived) into its own backends through a private port. A request
  the old process received but had not finished when killed is replayed as done, like a put
  whose answer was lost.

:func:`audit` counts what readers of a Parquet data-set folder see.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class MotoProcess:
    """A moto S3 server process on 127.0.0.1 that a test can hang, kill and bring back."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.log = folder / "moto-requests.jsonl"
        self.output = folder / "moto-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (replaying the request log, if any) and wait until it listens."""
        env = {
            **os.environ,
            "MOTO_ENABLE_RECORDING": "True",
            "MOTO_RECORDER_FILEPATH": str(self.log),
        }
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self.listening, timeout, f"moto on port {self.port}")

    def listening(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.output.read_text()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        """Resumed if paused, started again (with its state) if killed."""
        if self.alive():
            self.resume()
        else:
            self.start()

    def stop(self) -> None:
        if self.alive():
            self.resume()
            self.kill()

    def fault(self, kind: str, seconds: float) -> None:
        """An outage of ``seconds``: ``hang`` (paused) or ``refused`` (killed, then back)."""
        if kind == "hang":
            self.pause()
            time.sleep(seconds)
            self.resume()
        else:
            self.kill()
            time.sleep(seconds)
            self.start()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; the dict receives ``result`` or ``error``."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def audit(folder: str, key: str) -> dict[str, Any]:
    """What readers of a data-set folder see: ``rows`` and ``duplicates`` of column ``key`` in
    its data files (``*.parquet`` not starting with ``_`` or ``.``), ``partial`` (data files
    that do not parse), ``temporaries`` (``.``-names), ``success`` and ``keys`` (sorted)."""
    from dpmot_dist.io import storage

    names = storage.list_names(folder)
    data = sorted(n for n in names if n.endswith(".parquet") and n[0] not in "_.")
    keys, partial = [], 0
    for name in data:
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(folder, name))))
        except Exception:  # noqa: BLE001 - a partial file is what we count
            partial += 1
            continue
        keys.extend(table.column(key).to_pylist())
    return {
        "rows": len(keys),
        "duplicates": len(keys) - len(set(keys)),
        "partial": partial,
        "temporaries": sum(n.startswith(".") for n in names),
        "success": storage.SUCCESS in names,
        "files": len(data),
        "keys": sorted(keys),
    }


def _drop_torn_last_line(path: Path) -> None:
    """A server killed while logging a request leaves half a line: drop it."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    good = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            continue
        good.append(line)
    path.write_text("".join(line + "\n" for line in good))


def serve(port: int) -> None:
    """The server process: replay the request log into this process's moto backends (through
    a private port), then serve them on ``port`` until killed."""
    from moto.moto_api import recorder
    from moto.server import ThreadedMotoServer

    log = Path(os.environ["MOTO_RECORDER_FILEPATH"])
    _drop_torn_last_line(log)
    if log.exists() and log.stat().st_size:
        seed_port = free_port()
        seed = ThreadedMotoServer(ip_address="127.0.0.1", port=seed_port, verbose=False)
        seed.start()
        recorder.replay_recording(target_host=f"http://127.0.0.1:{seed_port}")
        seed.stop()
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    print(f"moto listening on 127.0.0.1:{port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
