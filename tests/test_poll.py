"""Adaptive polling: its rule on a real epoll descriptor, and inside a real trio loop."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nbdfs import poll
from nbdfs.poll import MIN_BUDGET, AdaptivePoll

from .conftest import run_nbdfs
from .mounts import mounted
from .servers import nbdkit


@pytest.fixture
def pipe_epoll() -> Iterator[tuple[AdaptivePoll, int]]:
    """An instrument polling an epoll set that holds one pipe; yields it and the write end."""
    r, w = os.pipe()
    ep = select.epoll()
    ep.register(r, select.EPOLLIN)
    try:
        yield AdaptivePoll(ep.fileno(), max_budget=0.05), w
    finally:
        ep.close()
        os.close(r)
        os.close(w)


def test_a_wait_that_polling_catches_does_not_sleep(pipe_epoll: tuple[AdaptivePoll, int]) -> None:
    p, w = pipe_epoll
    p.budget = p.max_budget
    os.write(w, b"x")  # ready before the loop would block
    start = time.perf_counter()
    p.before_io_wait(10.0)
    assert time.perf_counter() - start < 0.04
    p.after_io_wait(10.0)
    assert (p.caught, p.slept, p.budget) == (1, 0, p.max_budget)


def test_a_short_wait_grows_the_budget_a_long_one_resets_it(
    pipe_epoll: tuple[AdaptivePoll, int],
) -> None:
    p, _ = pipe_epoll
    for expected in (MIN_BUDGET, 2 * MIN_BUDGET, 4 * MIN_BUDGET):
        p.before_io_wait(10.0)  # nothing ready: polls (if at all) in vain, then "sleeps"
        p.after_io_wait(10.0)  # ...for far less than max_budget
        assert p.budget == pytest.approx(expected)
    p.before_io_wait(10.0)
    time.sleep(2 * p.max_budget)  # a wait longer than polling may last
    p.after_io_wait(10.0)
    assert p.budget == 0 and p.caught == 0 and p.slept == 4


def test_polling_is_bounded_by_the_budget_and_the_timeout(
    pipe_epoll: tuple[AdaptivePoll, int],
) -> None:
    p, _ = pipe_epoll
    p.budget = p.max_budget
    start = time.perf_counter()
    p.before_io_wait(10.0)
    assert p.max_budget <= time.perf_counter() - start < 0.5  # polled its budget, in vain
    p.after_io_wait(10.0)
    start = time.perf_counter()
    p.before_io_wait(0.005)  # a deadline comes sooner than the budget ends
    assert time.perf_counter() - start < p.max_budget
    p.after_io_wait(0.005)
    p.before_io_wait(0)  # tasks are runnable: the scheduler only peeks, no polling
    p.after_io_wait(0)
    assert p.slept == 2 and p.caught == 0


def test_in_a_trio_loop_polling_catches_io_and_an_idle_loop_does_not_spin() -> None:
    async def main() -> None:
        p = poll.install(max_budget=0.5)
        assert p is not None and p.active  # found trio's epoll descriptor
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            p.budget = p.max_budget
            timer = threading.Timer(0.02, lambda: b.send(b"x"))
            timer.start()
            await trio.lowlevel.wait_readable(a)  # the loop polls instead of sleeping
            timer.join()
            assert p.caught >= 1 and a.recv(1) == b"x"
        p.max_budget = 0.01
        await trio.sleep(0.1)  # an idle wait, longer than polling may last
        assert p.budget == 0
        cpu = time.process_time()
        await trio.sleep(0.3)
        assert time.process_time() - cpu < 0.1  # idle: asleep, not spinning
        for _ in range(poll.BUSY):
            p.enter()
        assert not p.active  # many requests in progress: the instrument is removed
        p.network += 1  # (one of them went to the server)
        for _ in range(poll.BUSY):
            p.leave()
        assert p.active and p.in_progress == 0
        for _ in range(poll.QUIET):  # requests served without the network (cache hits)
            assert p.active
            p.enter()
            p.leave()
        assert not p.active  # nothing to wait for but the application: no polling
        p.enter()
        p.network += 1
        p.leave()
        assert p.active  # a request waited for the server again

    trio.run(main)


def test_install_zero_means_off() -> None:
    async def main() -> None:
        assert poll.install(0) is None

    trio.run(main)


@pytest.mark.fuse
@pytest.mark.parametrize("partitions", [False, True])
def test_status_shows_polling_and_poll_max_zero_turns_it_off(tmp: Path, partitions: bool) -> None:
    """(With --partitions the exports' pools open before the mount is up: they must be
    handed the poller all the same.)"""
    extra = ["--partitions"] if partitions else []
    with nbdkit("memory", "8M") as srv:
        # 10 ms: far longer than any loopback reply takes, so the mount's small reads are
        # answered by polling (the default, 100 us, adapts to how fast this machine is).
        with mounted(srv.address, tmp / "a", "-o", "poll_max=10000", *extra) as mnt:
            fd = os.open(mnt / "%default%", os.O_RDONLY | os.O_DIRECT)
            try:
                import mmap

                buf = mmap.mmap(-1, 4096)
                for i in range(200):
                    os.preadv(fd, [buf], (i * 40961) % (8 << 20) // 4096 * 4096)
            finally:
                os.close(fd)
            status = json.loads(run_nbdfs("status", "--json", str(mnt)).stdout)
            assert status["poll"]["max_us"] == 10000
            assert status["poll"]["caught"] >= 100, status["poll"]
            assert "polling: up to 10000 us" in run_nbdfs("status", str(mnt)).stdout
        with mounted(srv.address, tmp / "b", "--poll-max", "0") as mnt:
            status = json.loads(run_nbdfs("status", "--json", str(mnt)).stdout)
            assert "poll" not in status
            assert "polling: up to" not in run_nbdfs("status", str(mnt)).stdout


@pytest.mark.fuse
def test_reads_served_from_the_cache_turn_polling_off_until_one_goes_to_the_server(
    tmp: Path,
) -> None:
    import mmap

    def waits() -> int:
        p = json.loads(run_nbdfs("status", "--json", str(mnt)).stdout)["poll"]
        return int(p["caught"]) + int(p["slept"])

    with nbdkit("memory", "8M") as srv, mounted(srv.address, tmp / "mnt") as mnt:
        fd = os.open(mnt / "%default%", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            for _ in range(poll.QUIET + 10):  # one miss, then cache hits
                os.preadv(fd, [buf], 0)
            before = waits()
            for _ in range(200):
                os.preadv(fd, [buf], 0)
            assert waits() == before  # the instrument is out of the loop: nothing counted
            os.preadv(fd, [buf], 4 << 20)  # a miss: the request waits for the server
            for _ in range(20):
                os.preadv(fd, [buf], 0)
            assert waits() > before  # polling is back
        finally:
            os.close(fd)


def test_poll_max_out_of_range_is_a_clear_error(tmp: Path) -> None:
    result = run_nbdfs("mount", "--poll-max", "-5", "localhost", str(tmp), check=False)
    assert result.returncode != 0 and "--poll-max takes microseconds" in result.stderr
    assert "Traceback" not in result.stderr
