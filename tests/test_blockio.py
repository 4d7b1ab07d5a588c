"""ExportIO against a real nbdkit: whatever the cache holds, a read returns the export's bytes.

The pattern plugin makes every 8-byte word its own offset (big-endian), so any slice of the
export can be checked without keeping a copy.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import trio

from nbdfs.blockio import ExportIO
from nbdfs.pool import ExportPool
from nbdfs.target import parse_target
from nbdfs.tls import TlsConfig

from .servers import nbdkit

MiB = 1 << 20


def pattern(offset: int, length: int) -> bytes:
    start = offset - offset % 8
    words = b"".join(o.to_bytes(8, "big") for o in range(start, offset + length + 8, 8))
    return words[offset - start : offset - start + length]


async def _with_io(address: str, cache: int, body: Callable[[ExportIO], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        pool = ExportPool(parse_target(address), "", TlsConfig(), nursery)
        io = ExportIO(pool, cache, nursery)
        await body(io)
        await pool.aclose()
        nursery.cancel_scope.cancel()


def test_reads_return_the_exports_bytes_however_they_meet_the_cache() -> None:
    async def body(io: ExportIO) -> None:
        for off in range(0, 8 * MiB, MiB):  # sequential: read-ahead, views of its runs
            assert bytes(await io.read(off, MiB)) == pattern(off, MiB)
        rng = random.Random(7)
        for _ in range(300):  # anywhere, any length: hits, misses, straddles, run views
            off = rng.randrange(0, 12 * MiB)
            n = rng.choice([1, 511, 4096, 40000, 300000, MiB + 3])
            assert bytes(await io.read(off, n)) == pattern(off, n), (off, n)

    with nbdkit("pattern", "16M") as srv:
        trio.run(_with_io, srv.address, 4 * MiB, body)


def test_a_block_read_ahead_then_used_at_random_gets_a_copy_of_its_own() -> None:
    """A hot block must not pin the whole read-ahead run it arrived with."""

    async def body(io: ExportIO) -> None:
        for off in range(0, 4 * MiB, MiB):
            await io.read(off, MiB)
        await trio.sleep(0.2)  # let read-ahead land
        cb = io.cache.block_size
        ahead = next(
            b
            for b in range(4 * MiB // cb, 16 * MiB // cb)
            if isinstance(io.cache.get(b, False), memoryview)
        )
        assert bytes(await io.read(ahead * cb + 100, 200)) == pattern(ahead * cb + 100, 200)
        held = io.cache.get(ahead, False)
        assert isinstance(held, bytes) and held == pattern(ahead * cb, cb)

    with nbdkit("pattern", "16M") as srv:
        trio.run(_with_io, srv.address, 8 * MiB, body)
