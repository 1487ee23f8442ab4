"""One run per output: the lease is exclusive, renewed, taken over only when stale, released."""
from __future__ import annotations

import json
import threading
import time

import pytest

from vitray import storage
from vitray.errors import VitrayError
from vitray.lease import LEASE_NAME, Lease, LeaseLost


def _out(where: str, tmp_path, request) -> str:
    return str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_prefix") + "/out"


WHERE = ["local", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.mark.parametrize("where", WHERE)
def test_a_second_run_is_refused_with_the_holder_and_the_lease_age(where, tmp_path, request):
    out = _out(where, tmp_path, request)
    with Lease(out, "run-a", stale_s=30):
        held = storage.read_json(storage.join(out, LEASE_NAME))
        assert held["run_id"] == "run-a" and held["pid"] > 0 and held["host"]
        with pytest.raises(VitrayError, match=r"in use by run run-a on .* \(pid \d+\), whose lease was renewed 0 s ago"):
            Lease(out, "run-b", stale_s=30).acquire()
    assert not storage.exists(storage.join(out, LEASE_NAME))  # released
    with Lease(out, "run-b", stale_s=30) as lease:
        assert lease.took_over is None


@pytest.mark.parametrize("where", WHERE)
def test_many_runs_racing_for_one_output_get_one_lease(where, tmp_path, request):
    out = _out(where, tmp_path, request)
    winners, refused, start = [], [], threading.Barrier(6)

    def race(n: int) -> None:
        start.wait()
        try:
            winners.append(Lease(out, f"run-{n}", stale_s=30).acquire())
        except VitrayError:
            refused.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 5
    winners[0].release()


@pytest.mark.parametrize("where", WHERE)
def test_a_stale_lease_is_taken_over_once_and_its_old_holder_finds_out(where, tmp_path, request):
    out = _out(where, tmp_path, request)
    gone = Lease(out, "gone", stale_s=0.5, heartbeat_s=3600).acquire()  # a run that stopped renewing
    time.sleep(0.6)  # the lease's age is the condition under test

    racers, taken, refused = [Lease(out, f"new-{n}", stale_s=0.5) for n in range(3)], [], []
    start = threading.Barrier(3)

    def race(lease: Lease) -> None:
        start.wait()
        try:
            taken.append(lease.acquire())
        except VitrayError:
            refused.append(lease)

    threads = [threading.Thread(target=race, args=(lease,)) for lease in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 1 and len(refused) == 2
    assert taken[0].took_over["run_id"] == "gone" and taken[0].took_over["silent_s"] >= 0.5

    gone.renew()  # the old holder wakes up: its compare-and-swap fails
    with pytest.raises(LeaseLost, match="took this run's lease over"):
        gone.check()
    gone.release()  # must not delete the new holder's lease
    assert storage.read_json(storage.join(out, LEASE_NAME))["run_id"] == taken[0].run_id
    taken[0].release()


def test_the_heartbeat_keeps_a_long_run_fresh(tmp_path):
    out = str(tmp_path / "out")
    with Lease(out, "long", stale_s=0.4):
        first = json.loads((tmp_path / "out" / LEASE_NAME).read_text())["heartbeat"]
        deadline = time.monotonic() + 5
        while json.loads((tmp_path / "out" / LEASE_NAME).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "the heartbeat was never renewed"
            time.sleep(0.02)
        with pytest.raises(VitrayError, match="in use by run long"):
            Lease(out, "other", stale_s=0.4).acquire()


def test_a_damaged_lease_file_counts_by_its_age(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_NAME).write_text('{"run_id": "half')  # a write cut short
    with pytest.raises(VitrayError, match="in use by run"):
        Lease(str(out), "next", stale_s=30).acquire()
    with Lease(str(out), "next", stale_s=1e-3) as lease:
        assert lease.took_over is not None
