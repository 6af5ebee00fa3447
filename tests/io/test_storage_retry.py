"""The retry policy and first-writer-wins writes of dpmot_dist.io.storage, against a moto server
in its own process that the tests hang (SIGSTOP) and kill (connection refused)."""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from storefaults import in_thread

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import storage


def retries_logged(caplog: pytest.LogCaptureFixture, uri: str) -> list[int]:
    """The retry numbers logged for ``uri``, in order."""
    pattern = re.compile(rf"^{re.escape(uri)}: .*; retry (\d+) of \d+ in [\d.]+ s$")
    return [int(m.group(1)) for r in caplog.records if (m := pattern.match(r.getMessage()))]


def one_line_error(fn, *args) -> str:
    with pytest.raises(DpmotError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# The policy


def test_policy_from_environment(monkeypatch) -> None:
    for name in ("RETRIES", "BACKOFF", "MAX_BACKOFF", "TIMEOUT"):
        monkeypatch.delenv(f"DPMOT_IO_{name}", raising=False)
    default = storage.RetryPolicy.from_env()
    assert default == storage.RetryPolicy(retries=5, backoff=1, max_backoff=30, timeout=20)
    assert [default.wait(k) for k in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert default.put_deadline(0) == 20 and default.put_deadline(32 << 20) == 60
    monkeypatch.setenv("DPMOT_IO_RETRIES", "2")
    monkeypatch.setenv("DPMOT_IO_BACKOFF", "0.5")
    monkeypatch.setenv("DPMOT_IO_TIMEOUT", "3")
    p = storage.RetryPolicy.from_env()
    assert (p.retries, p.backoff, p.timeout) == (2, 0.5, 3)
    for name, value in [("DPMOT_IO_RETRIES", "x"), ("DPMOT_IO_BACKOFF", "-1")]:
        monkeypatch.setenv(name, value)
        assert one_line_error(storage.RetryPolicy.from_env).startswith(f"{name}={value!r}")
        monkeypatch.delenv(name)
    monkeypatch.setenv("DPMOT_IO_TIMEOUT", "0")
    assert "must be positive" in one_line_error(storage.RetryPolicy.from_env)


def test_which_failures_are_transient() -> None:
    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "PutObject")

    wrapped = OSError(errno.EBUSY, "busy")  # how s3fs translates a 503
    wrapped.__cause__ = client_error("503")
    transient = [
        EndpointConnectionError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        ConnectionRefusedError(),
        TimeoutError(),
        client_error("SlowDown"),
        client_error("InternalError"),
        wrapped,
    ]
    permanent = [
        client_error("AccessDenied"),
        client_error("ExpiredToken"),
        client_error("NoSuchKey"),
        FileNotFoundError("x"),
        PermissionError("x"),
        OSError(errno.ENOSPC, "No space left on device"),
        ValueError("a bug"),
    ]
    assert all(storage.is_transient(e) for e in transient)
    assert not any(storage.is_transient(e) for e in permanent)


def test_permanent_failures_are_not_retried(tmp_path, caplog) -> None:
    missing = str(tmp_path / "missing.bin")
    t0 = time.monotonic()
    assert one_line_error(storage.read_bytes, missing) == f"{missing}: no such file or object"
    assert time.monotonic() - t0 < 1 and not retries_logged(caplog, missing)


# ---------------------------------------------------------------------------------------------
# A hung store (paused server: connections accepted, no answer)


def test_hung_put_times_out_and_is_retried(moto_process, caplog) -> None:
    uri = f"{moto_process.bucket}/hang/a.bin"
    data = bytes(range(256)) * 4000  # 1 MB
    caplog.set_level(logging.WARNING, "dpmot_dist.io.storage")
    outage = threading.Thread(target=moto_process.fault, args=("hang", 2.5))
    outage.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    storage.write_bytes_atomic(uri, data)
    seconds = time.monotonic() - t0
    outage.join()
    assert storage.read_bytes(uri) == data
    retries = retries_logged(caplog, uri)
    assert retries and retries == list(range(1, len(retries) + 1))  # each retry logged once
    assert 2.0 < seconds < 10
    assert storage.list_names(f"{moto_process.bucket}/hang") == ["a.bin"]  # nothing else


def test_hung_store_gives_up_in_bounded_time(moto_process, monkeypatch) -> None:
    monkeypatch.setenv("DPMOT_IO_RETRIES", "1")
    uri = f"{moto_process.bucket}/hang/b.bin"
    moto_process.pause()
    try:
        t0 = time.monotonic()
        message = one_line_error(storage.write_bytes_atomic, uri, b"x" * 1000)
        seconds = time.monotonic() - t0
    finally:
        moto_process.resume()
    assert message.startswith(f"{uri}: no answer within 1 s (gave up after 2 attempts")
    assert seconds < 6  # two 1 s attempts, a 0.1 s wait (and fsspec's 1 s polling)
    assert "DPMOT_IO_RETRIES" in message
    # the server executes the abandoned puts once it runs again: whole objects, or none
    time.sleep(0.5)
    names = storage.list_names(f"{moto_process.bucket}/hang")
    assert names in ([], ["b.bin"]) and (not names or storage.read_bytes(uri) == b"x" * 1000)


def test_hung_read_times_out_and_is_retried(moto_process, caplog) -> None:
    uri = f"{moto_process.bucket}/hang/c.bin"
    storage.write_bytes_atomic(uri, b"payload")
    caplog.set_level(logging.WARNING, "dpmot_dist.io.storage")
    outage = threading.Thread(target=moto_process.fault, args=("hang", 2.0))
    outage.start()
    time.sleep(0.2)
    assert storage.read_bytes(uri) == b"payload"
    assert storage.exists(uri)
    outage.join()
    assert retries_logged(caplog, uri)


# ---------------------------------------------------------------------------------------------
# A store that refuses connections (server killed, then back with its objects)


def test_refused_connections_are_retried_until_the_store_is_back(moto_process, caplog) -> None:
    kept = f"{moto_process.bucket}/refused/kept.bin"
    storage.write_bytes_atomic(kept, b"written before the outage")
    caplog.set_level(logging.WARNING, "dpmot_dist.io.storage")
    outage = threading.Thread(target=moto_process.fault, args=("refused", 1.0))
    outage.start()
    time.sleep(0.2)
    new = f"{moto_process.bucket}/refused/new.bin"
    storage.write_bytes_atomic(new, b"written during the outage")
    outage.join()
    assert storage.read_bytes(kept) == b"written before the outage"  # the state came back
    assert storage.read_bytes(new) == b"written during the outage"
    assert "Could not connect" in caplog.text and retries_logged(caplog, new)[0] == 1


def test_refused_for_good_fails_with_one_line(moto_process, monkeypatch) -> None:
    monkeypatch.setenv("DPMOT_IO_RETRIES", "2")
    uri = f"{moto_process.bucket}/refused/x.bin"
    moto_process.kill()
    message = one_line_error(storage.read_bytes, uri)
    assert message.startswith(f"{uri}: Could not connect to the endpoint URL")
    assert "gave up after 3 attempts" in message


# ---------------------------------------------------------------------------------------------
# First writer wins


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_exclusive_first_writer_wins(where, tmp_path, request) -> None:
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    uri = storage.join(root, "x", "first.bin")
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    assert storage.list_names(storage.join(root, "x")) == ["first.bin"]  # no temporaries


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_exclusive_race(where, tmp_path, request) -> None:
    """Eight threads create the same names at once: exactly one wins each, its bytes stay."""
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    storage.url_to_fs(root)[0].invalidate_cache()
    barrier = threading.Barrier(8)
    wins: dict[int, list[int]] = {k: [] for k in range(5)}

    def writer(w: int) -> None:
        barrier.wait()
        for k in range(5):
            if storage.create_exclusive(storage.join(root, "race", f"{k}.bin"), bytes([w]) * 64):
                wins[k].append(w)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, winners in wins.items():
        assert len(winners) == 1
        assert storage.read_bytes(storage.join(root, "race", f"{k}.bin")) == bytes(winners) * 64
    assert sorted(storage.list_names(storage.join(root, "race"))) == [f"{k}.bin" for k in range(5)]


def test_create_exclusive_under_a_hang_counts_our_own_late_put(moto_process) -> None:
    """The first conditional put lands only after its client gave up; the retry meets the
    object and recognises its own bytes."""
    uri = f"{moto_process.bucket}/x/late.bin"
    moto_process.pause()
    thread, out = in_thread(lambda: storage.create_exclusive(uri, b"ours" * 1000))
    time.sleep(1.5)  # the first attempt has timed out
    moto_process.resume()
    thread.join(30)
    assert out == {"result": True} and storage.read_bytes(uri) == b"ours" * 1000
    assert not storage.create_exclusive(uri, b"theirs")


def test_stale_temporaries_are_swept(tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".part-00001.parquet.tmp-dead").write_bytes(b"a killed run's leftover")
    (folder / "part-00000.parquet").write_bytes(b"kept")
    assert storage.remove_stale_temps(str(folder)) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.parquet"]


@pytest.mark.parametrize("exclusive", [False, True])
def test_local_temp_swept_by_another_run_is_written_again(tmp_path, monkeypatch, exclusive):
    """Another run's sweep (remove_stale_temps at its start) removes this run's temporary file
    between its write and its rename / link: the write is done again."""
    folder, swept = tmp_path / "out", []
    name = "link" if exclusive else "rename"
    real = getattr(os, name)

    def after_a_sweep(src, dst, *args, **kwargs):
        if not swept:
            swept.append(storage.remove_stale_temps(str(folder)))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, name, after_a_sweep)
    write = storage.create_exclusive if exclusive else storage.write_bytes_atomic
    write(str(folder / "f.bin"), b"payload")
    assert swept == [1] and (folder / "f.bin").read_bytes() == b"payload"
    assert sorted(p.name for p in folder.iterdir()) == ["f.bin"]


def test_prepare_output_keeps_the_lease(tmp_path) -> None:
    out = tmp_path / "out"
    storage.write_bytes_atomic(str(out / storage.LEASE_DIR / "00000001.json"), b"{}")
    storage.prepare_output(str(out), overwrite=False)  # only a lease: an empty output
    storage.write_bytes_atomic(str(out / "h.npy"), b"x")
    storage.prepare_output(str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [storage.LEASE_DIR]
