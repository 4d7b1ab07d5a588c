"""ExportIO against a real nbdkit: whatever the cache holds, a read returns the export's bytes.

The pattern plugin makes every 8-byte word its own offset (big-endian), so any slice of the
export can be checked without keeping a copy.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from nbdfs.blockio import ExportIO
from nbdfs.cache import SAMPLE_MAX, BlockStore
from nbdfs.errors import CommandError
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
        try:
            await body(await ExportIO.open(pool, BlockStore(cache)))
        finally:  # (a failed check must not leave its connections to the next test)
            with trio.CancelScope(shield=True):
                await pool.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("cache", "maximum"), [(4 * MiB, None), (0, None), (4 * MiB, 65536), (0, 65536)]
)
def test_reads_return_the_exports_bytes_however_they_meet_the_cache(
    cache: int, maximum: int | None
) -> None:
    """Through the cache or without it (``--cache-size 0``), in one request or in several
    when a read is longer than the server's maximum payload."""

    async def body(io: ExportIO) -> None:
        for off in range(0, 8 * MiB, MiB):  # sequential: read-ahead, views of its runs
            assert bytes(await io.read(off, MiB)) == pattern(off, MiB)
        rng = random.Random(7)
        for _ in range(300):  # anywhere, any length: hits, misses, straddles, run views
            off = rng.randrange(0, 12 * MiB)
            n = rng.choice([1, 511, 4096, 40000, 300000, MiB + 3])
            assert bytes(await io.read(off, n)) == pattern(off, n), (off, n)

    limit = [] if maximum is None else ["--filter=blocksize-policy"]
    size = [] if maximum is None else [f"blocksize-maximum={maximum}"]
    with nbdkit(*limit, "pattern", "16M", *size) as srv:
        trio.run(_with_io, srv.address, cache, body)


def test_a_sequential_reader_is_served_by_read_ahead_outside_the_cache() -> None:
    """A scan is read in requests of up to 1 MiB ahead of the reader, and none of it goes
    into the block cache: a scan of the whole export leaves the cache as it was."""

    async def body(io: ExportIO) -> None:
        assert bytes(await io.read(3 * MiB + 5, 4096)) == pattern(3 * MiB + 5, 4096)
        assert bytes(await io.read(0, MiB)) == pattern(0, MiB)  # (at random: cached)
        cached = io.cache.used
        requests = io.pool.stats.requests
        reads = 24
        for off in range(MiB, reads * MiB, MiB):
            assert bytes(await io.read(off, MiB)) == pattern(off, MiB)
        for off in range(reads * MiB, (reads + 1) * MiB, 4096):  # small reads, same scan
            assert bytes(await io.read(off, 4096)) == pattern(off, 4096)
        # (about one per MiB, some smaller while the window grows; through the cache: 279)
        assert io.pool.stats.requests - requests <= reads * 3 // 2
        assert io.cache.used == cached

    with nbdkit("pattern", "64M") as srv:
        trio.run(_with_io, srv.address, 64 * MiB, body)


def test_a_cached_block_is_served_from_the_cache_when_the_read_looks_sequential() -> None:
    """A random reader whose next block happens to follow its last one (fio's random map
    does that often once most blocks are used) reads a cached block from the cache: no
    NBD request, no read-ahead started for it."""

    async def body(io: ExportIO) -> None:
        cb = io.cache.block_size
        for off in range(MiB - cb, -1, -cb):  # backwards: whole blocks, cached
            await io.read(off, cb)
        requests = io.pool.stats.requests
        rng = random.Random(3)
        for _ in range(200):
            off = rng.randrange(0, MiB // 4096 - 1) * 4096
            assert bytes(await io.read(off, 4096)) == pattern(off, 4096)
            assert bytes(await io.read(off + 4096, 4096)) == pattern(off + 4096, 4096)
        assert io.pool.stats.requests == requests
        assert not io._ahead.runs

    with nbdkit("pattern", "16M") as srv:
        trio.run(_with_io, srv.address, 64 * MiB, body)


def test_read_ahead_never_serves_bytes_from_before_a_write() -> None:
    """Writes into the window a sequential reader is served from, landed and on its way:
    the reader reads what was written. nbdkit's delay filter keeps every read in flight
    for 50 ms, so the writes land while read-ahead of the same bytes is on its way."""

    async def body(io: ExportIO) -> None:
        await io.write(0, pattern(0, 16 * MiB))
        model = bytearray(pattern(0, 16 * MiB))
        for off in range(0, 2 * MiB, 256 * 1024):  # a scan: read-ahead starts
            assert bytes(await io.read(off, 256 * 1024)) == model[off : off + 256 * 1024]
        writes = [2 * MiB + 4096, 3 * MiB - 100, 4 * MiB, 5 * MiB + 7, 6 * MiB]
        for i, w in enumerate(writes):
            data = bytes([i + 1]) * 5000
            await io.write(w, data)
            model[w : w + 5000] = data
        for off in range(2 * MiB, 8 * MiB, 256 * 1024):  # the scan goes on
            assert bytes(await io.read(off, 256 * 1024)) == model[off : off + 256 * 1024], off

    with nbdkit("--filter=delay", "memory", "16M", "rdelay=50ms") as srv:
        trio.run(_with_io, srv.address, 64 * MiB, body)


def test_a_failed_read_ahead_fails_its_readers_and_is_asked_again(tmp_path: Path) -> None:
    """Read-ahead the server fails gives its reader the server's errno, and a later reader
    of those bytes asks again instead of getting the old error (nbdkit's error filter
    fails every read while a file exists)."""
    inject = tmp_path / "inject"

    async def body(io: ExportIO) -> None:
        await io.read(0, MiB)
        inject.touch()
        with pytest.raises(CommandError) as failed:
            await io.read(MiB, MiB)  # (a scan: its own read and read-ahead fail)
        assert failed.value.errno == errno.EIO
        for run in list(io._ahead.runs):  # (sent while reads fail: a reader who joins one
            await run.done.wait()  # in flight gets its error, as it would a fetch's)
        inject.unlink()
        assert bytes(await io.read(2 * MiB, MiB)) == bytes(MiB)  # (the scan goes on)
        assert bytes(await io.read(3 * MiB, MiB)) == bytes(MiB)

    args = ["error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={inject}"]
    with nbdkit("--filter=error", "memory", "16M", *args) as srv:
        trio.run(_with_io, srv.address, 64 * MiB, body)


def test_a_block_of_a_larger_read_then_read_alone_gets_a_copy_of_its_own() -> None:
    """A hot block must not pin the whole buffer a larger read received it into."""

    async def body(io: ExportIO) -> None:
        assert bytes(await io.read(MiB, MiB)) == pattern(MiB, MiB)
        cb = io.cache.block_size
        b = MiB // cb + 3
        assert isinstance(io.cache.get(b, count=False), memoryview)
        assert bytes(await io.read(b * cb + 100, 200)) == pattern(b * cb + 100, 200)
        held = io.cache.get(b, count=False)
        assert isinstance(held, bytes) and held == pattern(b * cb, cb)

    with nbdkit("pattern", "16M") as srv:
        trio.run(_with_io, srv.address, 8 * MiB, body)


async def _fill_sample(io: ExportIO) -> None:
    """Read enough blocks at random (past 12 MiB) that the cache's sample of what it
    fetched is full: from then on a block's first reader reads its sectors by itself
    (BlockCache.first_touch) instead of through a fetch that others may join."""
    cb = io.cache.block_size
    for i in range(SAMPLE_MAX):
        off = 12 * MiB + (SAMPLE_MAX - i) * 2 * cb  # (backwards: never sequential)
        assert bytes(await io.read(off, 100)) == pattern(off, 100)
    assert len(io.cache.sample()) == SAMPLE_MAX


@pytest.mark.parametrize("sample_full", [False, True])
def test_a_random_read_fetches_what_it_asks_and_a_second_touch_caches_the_whole_block(
    sample_full: bool,
) -> None:
    """A 4 KiB read at random must not cost a whole cache block on the wire (on a 1 Gbit/s
    link, 32 KiB per 4 KiB read caps random reads near 4000 a second by bandwidth alone),
    nor memory the daemon touches for the first time; a block touched twice is worth
    having whole. The same whether the first touch is a fetch (while the sample fills) or
    the reader's own read."""

    async def body(io: ExportIO) -> None:
        await io.read(0, 1)  # learn the block size
        if sample_full:
            await _fill_sample(io)
        baseline, used = io.bytes_read, io.cache.used

        def fetched() -> int:
            return io.bytes_read - baseline

        base = 5 * MiB
        assert bytes(await io.read(base + 8192 + 100, 300)) == pattern(base + 8192 + 100, 300)
        assert fetched() == 4096  # the sector holding it, not the 32 KiB block
        assert io.cache.used == used  # (and not kept: read once, it may never be read again)
        cb = io.cache.block_size
        assert cb > 4096
        assert bytes(await io.read(base + 8192, 4096)) == pattern(base + 8192, 4096)
        assert fetched() == 4096 + cb  # a block touched before: all of it, kept
        assert io.cache.used == used + cb
        assert bytes(await io.read(base + cb - 4096, 4096)) == pattern(base + cb - 4096, 4096)
        assert bytes(await io.read(base, cb)) == pattern(base, cb)
        assert fetched() == 4096 + cb
        # A read across two untouched blocks fetches its sectors, in one request.
        off, n = 9 * MiB - 6000, 10000
        requests = io.pool.stats.requests
        assert bytes(await io.read(off, n)) == pattern(off, n)
        assert fetched() == 4096 + cb + 8192 + 4096  # two sectors before 9 MiB, one after
        assert io.pool.stats.requests == requests + 1

    with nbdkit("pattern", "16M") as srv:
        trio.run(_with_io, srv.address, 4 * MiB, body)


@pytest.mark.parametrize("sample_full", [False, True])
def test_readers_of_one_block_at_once_each_get_their_bytes(sample_full: bool) -> None:
    """Reads of different parts of one untouched block, all at once: the first fetches its
    part (a fetch the others wait for, or, once the sample is full, its own read: then
    the others fetch the block whole), the others then what it did not cover."""

    async def body(io: ExportIO) -> None:
        await io.read(0, 1)  # learn the block size
        if sample_full:
            await _fill_sample(io)
        cb = io.cache.block_size
        got: dict[int, bytes] = {}

        async def one(off: int) -> None:
            got[off] = bytes(await io.read(off, 1000))

        offsets = [3 * MiB + i * cb // 8 + 7 for i in range(8)]
        async with trio.open_nursery() as nursery:
            for off in offsets:
                nursery.start_soon(one, off)
        assert got == {off: pattern(off, 1000) for off in offsets}

    with nbdkit("pattern", "16M") as srv:
        trio.run(_with_io, srv.address, 4 * MiB, body)


@pytest.mark.parametrize("minimum", [1, 4096])
def test_interleaved_reads_and_writes_never_see_stale_bytes(minimum: int) -> None:
    """Eight tasks write and read at random in regions of their own that share cache blocks
    (region edges are not block-aligned), through a small cache: pieces, whole blocks,
    read-modify-write and evictions race, and every read must return what its task wrote
    last (a model kept per task)."""
    region = 100_003

    async def body(io: ExportIO) -> None:
        await io.read(0, 1)

        async def task(i: int) -> None:
            rng = random.Random(i)
            base = i * region
            model = bytearray(pattern(base, region))
            for _ in range(120):
                off = rng.randrange(region)
                n = min(rng.choice([1, 512, 4096, 5000, 40000]), region - off)
                if rng.random() < 0.4:
                    data = rng.randbytes(n)
                    await io.write(base + off, data)
                    model[off : off + n] = data
                else:
                    got = bytes(await io.read(base + off, n))
                    assert got == model[off : off + n], (i, off, n)
                    if rng.random() < 0.2:
                        await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(task, i)

    args = (
        ["memory", "1M"]
        if minimum == 1
        else [
            "--filter=blocksize-policy",
            "memory",
            "1M",
            f"blocksize-minimum={minimum}",
            "blocksize-error-policy=error",
        ]
    )
    with nbdkit(*args) as srv:
        # memory starts as zeros: lay the pattern down first, through another ExportIO
        async def fill(io: ExportIO) -> None:
            await io.write(0, pattern(0, 1 << 20))

        trio.run(_with_io, srv.address, 0, fill)
        trio.run(_with_io, srv.address, 256 * 1024, body)


def test_a_read_after_a_write_never_joins_a_fetch_from_before_it(tmp_path: Path) -> None:
    """A fetch that the server answered from before a write must not serve a read that
    starts after the write was acknowledged. The server (nbdkit eval, requests run in
    parallel) takes a read's bytes at once and answers half a second later, so the write
    lands while the first read's fetch is still in flight."""
    disk = tmp_path / "disk"
    disk.write_bytes(b"o" * 65536)
    pread = f"dd if={disk} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none; sleep 0.5"
    pwrite = f"dd of={disk} seek=$4 conv=notrunc oflag=seek_bytes status=none"

    async def body(io: ExportIO) -> None:
        await io.read(60000, 1)  # connect; (another block)
        got: dict[str, bytes] = {}

        async def first() -> None:
            got["first"] = bytes(await io.read(0, 4096))

        async def second() -> None:
            await trio.sleep(0.2)  # the first read's fetch is in flight
            await io.write(0, b"n" * 4096)
            got["after"] = bytes(await io.read(0, 4096))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
        assert got["after"] == b"n" * 4096
        assert got["first"] in (b"o" * 4096, b"n" * 4096)  # concurrent with the write

    with nbdkit(
        "eval",
        "thread_model=echo parallel",
        f"get_size=stat -c %s {disk}",
        f"pread={pread}",
        f"pwrite={pwrite}",
    ) as srv:
        trio.run(_with_io, srv.address, 4 * MiB, body)
