"""Output leases on local disk and on a real (moto) S3 server: refuse, renew, expire, take over."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from dpmot_dist.errors import DpmotError
from dpmot_dist.io import storage
from dpmot_dist.io.lease import OutputLease, lease_ttl


@pytest.fixture(params=["local", "s3"])
def folder(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/fit"
    return str(tmp_path / "fit")


def lease_files(folder: str) -> list[str]:
    return storage.list_names(storage.join(folder, storage.LEASE_DIR))


def refusal(lease: OutputLease) -> str:
    with pytest.raises(DpmotError) as info:
        lease.acquire()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_held_lease_refuses_a_second_run_until_released(folder) -> None:
    with OutputLease(folder) as first:
        assert lease_files(folder) == ["00000001.json"]
        record = json.loads(storage.read_bytes(storage.join(folder, "_lease", "00000001.json")))
        assert record["owner"] == first.owner and record["expires"] > time.time() + 290
        message = refusal(OutputLease(folder))
        assert message.startswith(f"{folder}: in use by another run (pid ")
        assert "00000001.json, which expires in" in message
        first.check()
    assert lease_files(folder) == []
    with OutputLease(folder):
        assert lease_files(folder) == ["00000001.json"]


def test_renewal_keeps_a_short_lease(folder) -> None:
    with OutputLease(folder, ttl=1.0) as lease:
        first_expiry = lease.expires
        time.sleep(1.6)  # past the first expiry: renewed every 0.25 s
        lease.check()
        assert lease.expires > first_expiry + 1
        assert "in use by another run" in refusal(OutputLease(folder))


def test_an_expired_lease_is_taken_over_and_the_old_holder_stops(folder) -> None:
    stale = OutputLease(folder, ttl=0.5)
    stale.acquire()  # taken, never renewed: a frozen or partitioned run
    assert "in use by another run" in refusal(OutputLease(folder))
    time.sleep(0.6)
    with OutputLease(folder) as new:
        assert new.generation == 2 and lease_files(folder) == ["00000002.json"]
        with pytest.raises(DpmotError, match="lost the output lease"):
            stale.check()
        stale.release()  # the old holder's cleanup does not touch the new lease
        assert lease_files(folder) == ["00000002.json"]
        new.check()


def test_a_taken_over_lease_is_noticed_before_it_expires(folder) -> None:
    holder = OutputLease(folder, ttl=60)
    holder.acquire()
    storage.write_bytes_atomic(storage.join(folder, "_lease", "00000002.json"), b"{}")
    with pytest.raises(DpmotError, match="another run took it over"):
        holder.check()


def test_a_holder_that_died_on_this_machine_frees_the_folder_at_once(tmp_path) -> None:
    folder = str(tmp_path / "fit")
    code = (
        "import os, sys; from dpmot_dist.io.lease import OutputLease; "
        "OutputLease(sys.argv[1]).acquire(); os._exit(0)"  # dies holding the lease
    )
    subprocess.run([sys.executable, "-c", code, folder], check=True, timeout=120)
    assert lease_files(folder) == ["00000001.json"]
    with OutputLease(folder) as lease:
        assert lease.generation == 2


def test_concurrent_takeovers_let_exactly_one_run_in(folder) -> None:
    stale = OutputLease(folder, ttl=0.2)
    stale.acquire()
    time.sleep(0.3)
    barrier, won, refused = threading.Barrier(6), [], []

    def contender() -> None:
        lease = OutputLease(folder)
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except DpmotError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=contender) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert all("in use by another run" in m for m in refused)
    won[0].check()
    won[0].release()


def test_ttl_from_environment(monkeypatch) -> None:
    monkeypatch.delenv("DPMOT_LEASE_TTL", raising=False)
    assert lease_ttl() == 300
    monkeypatch.setenv("DPMOT_LEASE_TTL", "2.5")
    assert lease_ttl() == 2.5
    monkeypatch.setenv("DPMOT_LEASE_TTL", "0")
    with pytest.raises(DpmotError, match="DPMOT_LEASE_TTL='0'"):
        lease_ttl()
