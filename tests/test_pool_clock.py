"""The pool's timing on trio's MockClock, against real nbdkit: the watchdog, the deadline
while reconnecting, the backoff between attempts. The clock jumps only while every task
has been idle for a while of real time, so a real server's prompt replies come first, and
a minute of the pool's waiting takes well under a second."""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from nbdfs.connection import Connection
from nbdfs.errors import RequestTimeout
from nbdfs.pool import BACKOFF_MAX, BACKOFF_MIN, Backoff, ExportPool
from nbdfs.target import parse_target
from nbdfs.tls import TlsConfig

from .servers import free_port, nbdkit
from .test_faults import PauseControl

TIMEOUT = 60.0


def run_clocked(body: Callable[[trio.Nursery], Awaitable[None]]) -> float:
    """Run ``body`` on a MockClock; return the real seconds it took."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await body(nursery)
            nursery.cancel_scope.cancel()

    start = time.monotonic()
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))
    return time.monotonic() - start


async def _read(conn: Connection) -> bytearray:
    return await conn.read(0, 4096)


def test_the_watchdog_times_a_stalled_reply_out_between_timeout_and_one_tick_later(
    tmp_path: Path,
) -> None:
    control = tmp_path / "pause.sock"
    with nbdkit("--filter=pause", "memory", "1M", f"pause-control={control}") as srv:
        pause = PauseControl(control)

        async def body(nursery: trio.Nursery) -> None:
            pool = ExportPool(parse_target(srv.address), "", TlsConfig(), nursery, timeout=TIMEOUT)
            await pool.run(_read)  # connected, answered
            pause.send(b"p")
            start = trio.current_time()
            with pytest.raises(RequestTimeout):
                await pool.run(_read)
            waited = trio.current_time() - start
            assert TIMEOUT <= waited <= TIMEOUT + 2 * min(1.0, TIMEOUT / 4), waited
            assert pool.stats.timeouts == 1 and pool.connections == 0  # dropped
            pause.send(b"r")
            await pool.run(_read)  # a new connection: the next request works
            await pool.aclose()

        assert run_clocked(body) < 20


def test_a_server_gone_is_retried_with_backoff_until_the_deadline() -> None:
    port = free_port()
    with nbdkit("memory", "1M", port=port) as srv:
        address = srv.address

        async def body(nursery: trio.Nursery) -> None:
            pool = ExportPool(parse_target(address), "", TlsConfig(), nursery, timeout=TIMEOUT)
            await pool.run(_read)
            srv.kill(signal.SIGKILL)
            start = trio.current_time()
            with pytest.raises(RequestTimeout):
                await pool.run(_read)
            waited = trio.current_time() - start
            assert TIMEOUT <= waited < TIMEOUT + 1, waited
            await pool.aclose()

        assert run_clocked(body) < 20


def test_backoff_doubles_from_min_to_max() -> None:
    async def main() -> list[float]:
        backoff, waits = Backoff(), []
        for _ in range(10):
            start = trio.current_time()
            await backoff.wait()
            waits.append(trio.current_time() - start)
        return waits

    waits = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert waits[0] == pytest.approx(BACKOFF_MIN)
    assert waits[1] == pytest.approx(2 * BACKOFF_MIN)
    assert max(waits) == pytest.approx(BACKOFF_MAX) and waits[-1] == pytest.approx(BACKOFF_MAX)
