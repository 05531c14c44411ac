"""`GATEWAY_MAX_SOCKETS` as counted by app/places.py: in one process, and across the worker
processes of `gateway serve --workers N` (their slots in one file, written under flock)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.places import SLOT_BYTES, Places, SharedPlaces, clear_slot, create_slots

ROOT = Path(__file__).resolve().parent.parent

# A worker taking the node's one place and giving it back, over and over for the same second as
# another: how often it got the place, and how often the node held more than its cap then.
RACE = """
import sys, time
from app.places import SharedPlaces
path, index, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
places = SharedPlaces(1, path, index)
while time.time() < start:
    pass
got = over = 0
while time.time() < start + 1.0:
    if places.take():
        got += 1
        over += places.node_total() > 1
        places.give()
print(got, over)
"""


def test_one_process_counts_its_places() -> None:
    places = Places(2)
    assert places.take() and places.take()
    assert not places.take()
    places.give()
    assert places.take()
    assert places.held == 2


def test_two_workers_racing_for_the_last_place_never_both_take_it(tmp_path: Path) -> None:
    path = str(tmp_path / "socket-places")
    create_slots(path, 2)
    start = time.time() + 1.0  # both interpreters are up by then
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, path, str(index), str(start)],
            stdout=subprocess.PIPE,
            env=env,
        )
        for index in (0, 1)
    ]
    results = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    got, over = [int(r[0]) for r in results], [int(r[1]) for r in results]
    print(f"\nplaces taken by each worker in 1 s: {got}")
    assert over == [0, 0], f"the node held 2 places of 1 {sum(over)} times"
    assert min(got) > 1000, f"the two loops did not contend: {got}"
    places = SharedPlaces(1, path, 0)
    try:
        assert places.node_total() == 0
    finally:
        places.close()


def test_a_dead_workers_slot_is_cleared_and_its_places_free_again(tmp_path: Path) -> None:
    path = str(tmp_path / "socket-places")
    create_slots(path, 2)
    first, second = SharedPlaces(3, path, 0), SharedPlaces(3, path, 1)
    try:
        assert first.take() and first.take() and second.take()
        assert not second.take() and not first.take()
        clear_slot(path, 0)  # what the parent does when worker 0 dies
        assert second.node_total() == 1
        assert second.take() and second.take()
        assert not second.take()
        second.give()
        assert second.node_total() == 2
    finally:
        first.close()
        second.close()


def test_a_file_without_the_workers_slot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "socket-places"
    path.write_bytes(bytes(SLOT_BYTES))
    with pytest.raises(ValueError, match="no slot 1"):
        SharedPlaces(3, str(path), 1)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError):
        SharedPlaces(3, str(path), 1)
    assert len(os.listdir("/proc/self/fd")) == fds  # the file is closed again
