"""How the pool keeps its journal of unflushed writes small, against real nbdkit: a flush
starts behind a writer that never calls fsync, and a writer that finds the journal past its
limit waits for a flush, however slow the server's flushes are."""

from __future__ import annotations

from pathlib import Path

import trio

from nbdfs.connection import Connection
from nbdfs.journal import Change
from nbdfs.pool import ExportPool
from nbdfs.target import parse_target
from nbdfs.tls import TlsConfig

from .servers import nbdkit, slow_flush_disk
from .test_pool import log_events

KiB, MiB = 1 << 10, 1 << 20
LIMIT = MiB  # the tests' journal limit (the default is 64 MiB)
PIECE = 64 * KiB


async def _write(pool: ExportPool, offset: int, data: bytes) -> None:
    async def op(conn: Connection) -> None:
        await conn.write(offset, data)

    await pool.run(op, journal=Change.write(offset, data, False))


def _write_all(address: str, total: int) -> list[int]:
    """Write ``total`` bytes in 64 KiB pieces through a pool with a 1 MiB journal limit,
    never flushing; return the unflushed bytes as each write returned."""
    unflushed: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            pool = ExportPool(parse_target(address), "", TlsConfig(), nursery, journal_limit=LIMIT)
            for offset in range(0, total, PIECE):
                await _write(pool, offset, bytes([offset // PIECE % 251 + 1]) * PIECE)
                unflushed.append(pool.unflushed)
            await pool.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return unflushed


def test_a_flush_starts_behind_a_writer_that_never_calls_fsync(tmp_path: Path) -> None:
    log = tmp_path / "nbdkit.log"
    with nbdkit("--filter=log", "memory", "4M", f"logfile={log}") as srv:
        # Under the limit, so no writer waits; past the eighth of it that starts a flush.
        _write_all(srv.address, LIMIT * 3 // 4)
        events = [e for _, e, _ in log_events(log) if e in ("Write", "Flush")]
    # Flushes came between the writes, not only at the end (aclose's).
    last_write = len(events) - 1 - events[::-1].index("Write")
    assert "Flush" in events[:last_write], events


def test_a_writer_past_the_limit_waits_for_a_slow_flush(tmp_path: Path) -> None:
    """Each flush takes half a second; writes take milliseconds. Without waiting, a writer
    would pile several MiB into the journal while one flush ran."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MiB))
    with nbdkit(*slow_flush_disk(disk, "sleep 0.5")) as srv:
        unflushed = _write_all(srv.address, 3 * MiB)
        data = disk.read_bytes()
    assert max(unflushed) <= LIMIT + PIECE, unflushed
    assert all(
        data[o : o + PIECE] == bytes([o // PIECE % 251 + 1]) * PIECE
        for o in range(0, 3 * MiB, PIECE)
    )
