"""Byte-addressed I/O on one export: alignment, splitting, the block cache and read-ahead.

This is where a FUSE read or write of any offset and length becomes NBD requests that obey
the export's constraints ("Size constraints"): every request is aligned to the minimum
block and no larger than the maximum payload; a write that is not aligned is done as
read-modify-write while holding its aligned range exclusively, so no other write to those
bytes can interleave. Writes are write-through: :meth:`ExportIO.write` returns only after
the server acknowledged every piece.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from .cache import Block, BlockCache, BlockStore, Entry, Fetch, Piece, sectors
from .connection import Connection
from .errors import NbdError, ReadFailed
from .extents import Extents
from .journal import Change, Kind
from .pool import ExportPool
from .readahead import ReadAhead, Run
from .session import Geometry
from .wire import META_CONTEXT_ALLOCATION, StateFlag, TransmissionFlag

log = logging.getLogger(__name__)

CHANGE_MAX = 1 << 30  # bytes per NBD_CMD_TRIM / WRITE_ZEROES (lengths are 32-bit)
STATUS_MAX = 1 << 30  # bytes asked about per NBD_CMD_BLOCK_STATUS
ALLOCATED_MAX_ASKS = 32  # block status requests one allocation count may take, at most

# How far ahead a sequential reader is served, in runs of at most the kernel's largest FUSE
# read (each such read is then a view of one run). Bytes read ahead wait in memory between
# the socket's copy and FUSE's; with fewer of them both copies cost less: 4 MiB in runs of
# 1 MiB moved 1.10-1.28x the MB/s of 8 MiB in runs of up to the server's largest on
# loopback and 1.11-1.22x over a 1 ms link (docs/architecture.md, step 2).
READAHEAD_MAX = 4 * 1024 * 1024
RUN_MAX = 1024 * 1024
UNALIGNED_SIZE = "the export's size is not a multiple of its minimum block"


class RunBuffer(bytearray):
    """The buffer one NBD read of several adjacent blocks was received into; the cached
    blocks are views of it (no copy), and a read of consecutive blocks of it is one view."""

    __slots__ = ("start",)
    start: int  # export offset of its first byte

    @classmethod
    def zeroed(cls, size: int, start: int) -> RunBuffer:
        buf = cls(size)
        buf.start = start
        return buf


class RangeLock:
    """Exclusive locks on byte ranges: overlapping writes run one after the other.

    That keeps read-modify-write atomic, and it means a write sent again after a lost
    connection can never land after a newer write to the same bytes.
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._changed = trio.Event()

    def _conflicts(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._held)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while self._conflicts(start, end):
            changed = self._changed
            await changed.wait()
        entry = (start, end)
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            self._changed.set()
            self._changed = trio.Event()


async def _concurrently(*calls: tuple[Callable[..., Awaitable[None]], tuple[object, ...]]) -> None:
    """Run calls side by side; raise the first :class:`NbdError` itself, not a group."""
    if len(calls) == 1:  # the usual case: no nursery, no task
        fn, args = calls[0]
        await fn(*args)
        return
    try:
        async with trio.open_nursery() as nursery:
            for fn, args in calls:
                nursery.start_soon(fn, *args)
    except BaseExceptionGroup as group:
        match, _ = group.split(NbdError)
        if match is not None:
            leaf: BaseException = match
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None
        raise


def _all_zero(data: memoryview) -> bool:
    """Whether ``data`` is all zero bytes; cheap for the usual non-zero data."""
    if not data or data[0] or data[-1]:
        return not data
    return not data.tobytes().strip(b"\0")


def _bytes_of(entry: Entry) -> tuple[Block, int]:
    """A cache entry's bytes and the offset in its block where they start."""
    return (entry.data, entry.lo) if isinstance(entry, Piece) else (entry, 0)


def _part(data: Block, base: int, lo: int, hi: int) -> Block:
    """Bytes ``lo`` to ``hi`` of a block whose ``data`` starts at ``base``: ``data`` itself
    when that is all of them, else a view (no copy)."""
    return data if lo == base and hi - lo == len(data) else memoryview(data)[lo - base : hi - base]


def _one_run(used: list[Block]) -> RunBuffer | None:
    """The run buffer that holds all these (consecutive) blocks' bytes, if one does."""
    first = used[0]
    if not isinstance(first, memoryview) or not isinstance(first.obj, RunBuffer):
        return None
    buf = first.obj
    if any(not isinstance(data, memoryview) or data.obj is not buf for data in used):
        return None
    return buf


class ExportIO:
    """Reads and writes of one export, shared by every open file of it.

    Built whole by :meth:`open` once the first connection told the export's geometry.
    """

    def __init__(self, pool: ExportPool, geometry: Geometry, store: BlockStore) -> None:
        self.pool = pool
        self.geometry = geometry
        # (the geometry's fields as plain attributes: they are read on every request)
        self.size, self.minimum, self.maximum = geometry.size, geometry.minimum, geometry.maximum
        self._sector = geometry.sector
        self._ranges = RangeLock()
        self._next_sequential = -1  # where a read that continues the last one starts
        self.cache = BlockCache(store, geometry.cache_block)
        budget = store.read_ahead  # (the mount's: a quarter of the cache)
        limit = min(READAHEAD_MAX, budget.capacity)
        run = min(self.maximum, RUN_MAX)
        self._ahead = ReadAhead(budget, limit, self.size, run, self.minimum)
        self._use_fua = bool(pool.flags & TransmissionFlag.SEND_FUA)
        self._use_zeroes = bool(pool.flags & TransmissionFlag.SEND_WRITE_ZEROES)
        self.can_trim = bool(pool.flags & TransmissionFlag.SEND_TRIM)
        session = pool.session
        self._allocation = session is not None and META_CONTEXT_ALLOCATION in session.meta_contexts
        self.bytes_read = self.bytes_written = 0
        self.extents = Extents()  # what block status said, for lseek
        # (start, end) -> (extents generation, bytes allocated): for st_blocks
        self._allocated: dict[tuple[int, int], tuple[int, int]] = {}
        pool.verify = self._same_disk

    @classmethod
    async def open(cls, pool: ExportPool, store: BlockStore) -> ExportIO:
        """Connect (the first connection tells the geometry) and build the export's I/O.
        Its read-ahead runs in the pool's nursery, so closing the pool ends it."""
        return cls(pool, await pool.ensure_connected(), store)

    def stats(self) -> dict[str, object]:
        """This export's counters for ``nbdfs status``."""
        pool, cache = self.pool, self.cache
        return dataclasses.asdict(pool.stats) | {
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "connections": pool.connections,
            "unflushed": pool.unflushed,
            "failed": pool.failed is not None,
            "cache": {"used": cache.used, "hits": cache.hits, "misses": cache.misses},
        }

    # -- reads -----------------------------------------------------------------------------

    async def _same_disk(self, conn: Connection) -> str | None:
        """Whether ``conn`` reaches the disk we knew: the blocks we fetched and did not write
        since read back the same (a bounded sample, by checksum). Returns why not."""
        cb = self.cache.block_size
        sample = self.cache.sample()
        differ = 0
        for b, lo, length, crc in sample:
            start = b * cb + lo
            if start % self.minimum or length % self.minimum:
                continue  # (the export's last, short block)
            if self.pool.unflushed_in(start, start + length):
                continue  # (fetched after our unflushed write: the server may have lost it)
            if zlib.crc32(await conn.read(start, length)) != crc:
                differ += 1
        if differ:
            return f"{differ} of {len(sample)} blocks read before differ"
        return None

    async def read(
        self, offset: int, length: int, *, reader: bool = True
    ) -> bytes | bytearray | memoryview:
        """Bytes ``offset`` to ``offset + length`` (clamped to the export): for a reader
        who goes on from where its last read ended, from the runs read ahead of it
        (:mod:`.readahead`), unless one cached block holds them; else through the cache:
        each block's cached bytes, or the fetch in flight it joins, or a new fetch; then
        sliced. ``reader`` False: the read of a read-modify-write, which counts no hit or
        miss and leaves the sequential detector and read-ahead alone."""
        if self.pool.failed is not None:
            if self.cache.used:  # (cached bytes are of another disk: dropped once)
                self.cache.clear()
            self._ahead.clear()
            raise self.pool.failed
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        if not self.cache.enabled:
            return await self._read_direct(offset, end)
        cb = self.cache.block_size
        first, last = offset // cb, (end - 1) // cb
        if reader:
            sequential = offset == self._next_sequential
            self._next_sequential = end
            if not sequential:
                self._ahead.restart()
            if first == last:
                # The usual read, inside one block: what the rest of this method does for
                # it, without its lists and loops. A cached block first, even for a read
                # that continues the last one: cached bytes never go to the server again
                # (a random reader's next block often follows its last, as fio's random
                # map picks).
                lo, hi = offset - first * cb, end - first * cb
                hit = self.cache.hit(first)
                if hit is not None:
                    return _part(*_bytes_of(self.cache.own(first, hit)), lo, hi)
                if not sequential:
                    length = self._length(first)
                    s_lo, s_hi = sectors(lo, hi, self._sector, length)
                    if (s_lo or s_hi != length) and self.cache.first_touch(first):
                        # Its first touch: the sectors holding the bytes, read for this
                        # reader alone (what a Fetch of them would bring is a piece, which
                        # the cache never keeps; a reader at random rarely has company).
                        b0 = first * cb
                        return await self._read_span(
                            b0 + s_lo, self._aligned_end(b0 + s_hi), offset, end
                        )
                    item, started = self.cache.lookup(first, length, lo, hi, self._sector)
                    if started:
                        assert isinstance(item, Fetch)
                        await self._fetch_run([(first, item)])  # (in this task)
                    return _part(*_bytes_of(await self._settle(first, item, lo, hi)), lo, hi)
            if sequential:
                return await self._read_ahead(offset, end)
        # Only the sectors asked for, in a block touched the first time.
        fetches, mine = self._fetches_for(
            range(first, last + 1), (offset, end), count=reader, inline=True
        )
        if mine:
            await self._fetch_run(mine)  # in this task: no task to spawn and wake
        parts = []
        used: list[Block] = []
        for b, item in fetches:
            lo, hi = max(offset - b * cb, 0), min(end - b * cb, cb)
            data, base = _bytes_of(await self._settle(b, item, lo, hi))
            used.append(data)
            parts.append(_part(data, base, lo, hi))
        # pyfuse3 takes any buffer: a slice of one block, or of the buffer one request for
        # several blocks was received into, is passed on without a copy.
        if len(parts) == 1:
            return parts[0]
        run = _one_run(used)
        if run is not None:
            return memoryview(run)[offset - run.start : end - run.start]
        return b"".join(parts)

    async def _read_ahead(self, offset: int, end: int) -> bytes | memoryview:
        """A sequential reader's bytes, from the runs read ahead of it (any it finds missing
        read in its own task), and the runs that keep it served a window ahead."""
        a0, a1 = offset - offset % self.minimum, end + (-end % self.minimum)
        runs, missing = self._ahead.cover(a0, a1)
        for run in [*missing[:-1], *self._ahead.top_up(a1)]:
            self.pool.tasks.start_soon(self._fetch_ahead, run)
        if missing:
            await self._fetch_ahead(missing[-1])  # in this task: no task to spawn and wake
        parts = []
        for run in runs:
            if not run.done.is_set():
                await run.done.wait()
            if run.data is None:
                raise run.error or ReadFailed(f"reading {run.start}+{run.end - run.start} failed")
            lo = max(offset, run.start) - run.start
            parts.append(memoryview(run.data)[lo : min(end, run.end) - run.start])
        # (pyfuse3 takes any buffer: a read inside one run is a view of it, no copy)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _fetch_ahead(self, run: Run) -> None:
        """Read a run ahead; a failed one is dropped (its readers get the error, later ones
        ask again)."""
        start, size = run.start, run.end - run.start
        try:
            if run.end > self.size:
                raise ReadFailed(UNALIGNED_SIZE)
            run.data = await self.pool.run(lambda c: c.read(start, size))
            self.bytes_read += size
        except NbdError as exc:
            log.info("export %r: read of %d+%d failed: %s", self.pool.name, start, size, exc)
            run.error = exc
        except BaseException:  # cancelled: its other readers must not wait forever
            run.error = ReadFailed(f"reading {start}+{size} of {self.pool.name!r} stopped")
            raise
        finally:
            if run.data is None:
                self._ahead.drop(run)
            run.done.set()

    async def _read_span(self, a0: int, a1: int, offset: int, end: int) -> memoryview:
        """Bytes ``offset`` to ``end`` of the span ``a0`` to ``a1`` around them, read in one
        request in this task; the buffer it was received into is passed on as a view."""
        data = await self.pool.run(lambda c: c.read(a0, a1 - a0))
        self.bytes_read += len(data)
        return memoryview(data)[offset - a0 : end - a0]

    async def _settle(self, b: int, item: Entry | Fetch, lo: int, hi: int) -> Entry:
        """The entry holding bytes ``lo`` to ``hi`` of block ``b``: ``item`` if it is one,
        else what the fetch ``item`` brings once done.

        The fetch may be another reader's, of another part of the block; then the block is
        fetched again (whole, now that it was touched twice).
        """
        while isinstance(item, Fetch):
            if not item.done.is_set():  # (the reader's own is: no pass through the scheduler)
                await item.done.wait()
            entry = item.data
            if entry is None:
                raise item.error or ReadFailed(f"reading block {b} of {self.pool.name!r} failed")
            if not isinstance(entry, Piece) or entry.holds(lo, hi):
                return entry
            cb = self.cache.block_size
            ((_, item),), _ = self._fetches_for(range(b, b + 1), (b * cb + lo, b * cb + hi))
        # A block that came with a larger read: a copy of its own, so a hot block never pins
        # the whole buffer it arrived in.
        return self.cache.own(b, item)

    def _fetches_for(
        self,
        blocks: range,
        span: tuple[int, int],
        count: bool = True,
        inline: bool = False,
    ) -> tuple[list[tuple[int, Entry | Fetch]], list[tuple[int, Fetch]]]:
        """For each block, its cached bytes or the fetch that will bring them.

        ``span``: the bytes the read asks for; a block it touches the first time is
        fetched only in part (the sectors in the span), otherwise whole. Fetches are
        started here, a run of adjacent blocks per request, each in a task of its own; with
        ``inline`` the last run is returned instead, for the caller to await
        :meth:`_fetch_run` on itself. ``count``: whether lookups count as cache hits and
        misses (not for a read-modify-write's reads).
        """
        out: list[tuple[int, Entry | Fetch]] = []
        runs: list[list[tuple[int, Fetch]]] = []
        run: list[tuple[int, Fetch]] = []
        cb = self.cache.block_size
        per_request = max(1, self.maximum // cb)
        for b in blocks:
            b0 = b * cb
            size = self._length(b)
            lo, hi = max(span[0] - b0, 0), min(span[1] - b0, size)
            item, started = self.cache.lookup(b, size, lo, hi, self._sector, count)
            if started:
                assert isinstance(item, Fetch)
                fetch = item
                out.append((b, fetch))
                if run and (
                    run[-1][0] != b - 1
                    or run[-1][1].hi != cb
                    or fetch.lo
                    or len(run) >= per_request
                ):
                    runs.append(run)
                    run = []
                run.append((b, fetch))
                continue
            out.append((b, item))
            if run:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
        mine = runs.pop() if inline and runs else []
        for r in runs:
            self.pool.tasks.start_soon(self._fetch_run, r)
        return out, mine

    async def _fetch_run(self, run: list[tuple[int, Fetch]]) -> None:
        cb = self.cache.block_size
        start = run[0][0] * cb + run[0][1].lo
        end = min(run[-1][0] * cb + run[-1][1].hi, self.size)
        data: bytes | bytearray | None = None
        error: Exception | None = None
        try:
            size = self._aligned_end(end) - start
            if len(run) == 1:
                data = await self.pool.run(lambda c: c.read(start, size))
            else:
                # A fresh buffer for each attempt: a reply cut short by a lost connection
                # must not leave bytes behind for the next one.
                data = await self.pool.run(
                    lambda c: c.read(start, size, into=RunBuffer.zeroed(size, start))
                )
            self.bytes_read += len(data)
        except NbdError as exc:
            log.info("export %r: read of %d+%d failed: %s", self.pool.name, start, end - start, exc)
            error = exc
        except BaseException:  # cancelled: other readers of these blocks must not wait forever
            cancelled = ReadFailed(f"reading {start}+{end - start} of {self.pool.name!r} stopped")
            for b, fetch in run:
                self.cache.end_fetch(b, fetch, cancelled)
            raise
        if data is not None and len(run) == 1 and len(data) == end - start:
            # One block (or part of one), read for itself (the usual random read): the
            # buffer the reply was received into is cached as it is, without a copy.
            b, fetch = run[0]
            self.cache.end_fetch(b, fetch, self._entry(b, fetch, data))
            return
        if data is None:
            failed = error or ReadFailed(f"reading {start}+{end - start} failed")
            for b, fetch in run:
                self.cache.end_fetch(b, fetch, failed)
            return
        view = memoryview(data)
        for b, fetch in run:
            lo = b * cb + fetch.lo - start
            self.cache.end_fetch(
                b, fetch, self._entry(b, fetch, view[lo : lo + fetch.hi - fetch.lo])
            )

    def _aligned_end(self, end: int) -> int:
        """Where a read of bytes up to ``end`` (inside the export) ends on the wire: at the
        next multiple of the minimum block; ReadFailed if that is past the export's end."""
        aligned = end + (-end % self.minimum)
        if aligned > self.size:
            raise ReadFailed(UNALIGNED_SIZE)
        return aligned

    def _entry(self, b: int, fetch: Fetch, data: Block) -> Entry:
        """What a fetch brought: the block, or a piece of it (for its readers alone)."""
        return data if not fetch.lo and fetch.hi == self._length(b) else Piece(fetch.lo, data)

    def _length(self, b: int) -> int:
        """Block ``b``'s length: the cache block, or less for the export's last one."""
        cb = self.cache.block_size
        return min(cb, self.size - b * cb)

    async def _read_direct(self, offset: int, end: int) -> memoryview:
        """Without a cache: the bytes, read in requests of at most the maximum payload,
        side by side, from and to a multiple of the minimum block."""
        a0 = offset - offset % self.minimum
        a1 = min(end + (-end % self.minimum), self.size)
        if a1 - a0 <= self.maximum:  # (the usual: one request)
            return await self._read_span(a0, a1, offset, end)
        pieces: dict[int, memoryview] = {}

        async def one(start: int, length: int) -> None:
            pieces[start] = await self._read_span(start, start + length, start, start + length)

        await _concurrently(
            *((one, (s, min(self.maximum, a1 - s))) for s in range(a0, a1, self.maximum))
        )
        whole = b"".join(pieces[k] for k in sorted(pieces))
        return memoryview(whole)[offset - a0 : end - a0]

    # -- writes ----------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> int:
        """Write ``data`` at ``offset`` (the caller keeps it inside the export)."""
        end = offset + len(data)
        assert end <= self.size
        if offset % self.minimum or end % self.minimum:
            a0 = offset - offset % self.minimum
            a1 = end + (-end % self.minimum)
            async with self._ranges.hold(a0, a1):
                head = await self.read(a0, offset - a0, reader=False)
                tail = await self.read(end, a1 - end, reader=False)
                await self._write_aligned(a0, b"".join((head, data, tail)), fua)
        else:
            async with self._ranges.hold(offset, end):
                await self._write_aligned(offset, data, fua)
        return len(data)

    async def _write_aligned(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        end = offset + len(data)
        cb = self.cache.block_size
        blocks = range(offset // cb, (end - 1) // cb + 1)
        started = self.cache.start_write(blocks)
        self._forget(offset, end)
        use_fua = fua and self._use_fua
        view = memoryview(data)
        ok = False
        try:
            await _concurrently(
                *(
                    (
                        self._write_piece,
                        (s, view[s - offset : min(s - offset + self.maximum, len(data))], use_fua),
                    )
                    for s in range(offset, end, self.maximum)
                )
            )
            if fua and not use_fua:
                await self.pool.flush()
            ok = True
        finally:
            # A block written whole is dropped (end_write drops each block without an
            # update), not stored: copying it into the cache cost as much as the write
            # itself, and the kernel's page cache already holds what a buffered writer
            # reads back. Only the first and the last can be written in part: patched.
            updates: dict[int, Block | None] = {}
            if ok and self.cache.enabled:
                for b in {blocks[0], blocks[-1]}:
                    b0, b1 = b * cb, min(b * cb + cb, self.size)
                    lo, hi = max(offset, b0), min(end, b1)
                    if lo != b0 or hi != b1:
                        updates[b] = self.cache.patch(b, lo - b0, view[lo - offset : hi - offset])
            self.cache.end_write(started, updates, ok)
            self._forget(offset, end)  # (and what was asked or read ahead meanwhile)

    def _forget(self, start: int, end: int) -> None:
        """What a change to bytes ``start`` to ``end`` makes untrue, when it starts and again
        when it ends (a reply on its way meanwhile may be from before it): what block status
        said of them, and the runs read ahead over them. (The cache has its generations.)"""
        self.extents.forget(start, end)
        self._ahead.discard(start, end)

    async def _write_piece(self, start: int, piece: memoryview, fua: bool) -> None:
        if self._use_zeroes and _all_zero(piece):
            # Nothing to carry on the wire, and a sparse export stays sparse (the server may
            # punch a hole: NBD_CMD_FLAG_NO_HOLE is not set).
            await self.pool.run(
                lambda c: c.write_zeroes(start, len(piece), fua),
                journal=Change(start, len(piece), Kind.ZERO, durable=fua),
            )
        else:
            await self.pool.run(
                lambda c: c.write(start, piece, fua), journal=Change.write(start, piece, fua)
            )
        self.bytes_written += len(piece)

    # -- trim, zeroes, holes ------------------------------------------------------------

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """NBD_CMD_TRIM of ``length`` bytes at ``offset`` (inside the export; the caller
        checked that it can trim): what an aligned range needs, the edges written as zeros."""
        await self._change(offset, length, fua, Kind.TRIM)

    async def zero(self, offset: int, length: int, fua: bool = False) -> None:
        """Zeros over ``length`` bytes at ``offset``: NBD_CMD_WRITE_ZEROES where the export
        has it (a sparse one may punch a hole: NBD_CMD_FLAG_NO_HOLE is not set), else zero
        bytes written."""
        await self._change(offset, length, fua, Kind.ZERO)

    async def _change(self, offset: int, length: int, fua: bool, kind: Kind) -> None:
        end = offset + length
        m = self.minimum
        a0, a1 = offset + (-offset % m), end - end % m  # the aligned part inside
        if a0 >= a1:
            await self.write(offset, bytes(length), fua)
            return
        if offset < a0:
            await self.write(offset, bytes(a0 - offset), fua)
        if a1 < end:
            await self.write(a1, bytes(end - a1), fua)
        cb = self.cache.block_size
        blocks = range(a0 // cb, (a1 - 1) // cb + 1)
        use_fua = fua and self._use_fua
        async with self._ranges.hold(a0, a1):
            started = self.cache.start_write(blocks)
            self._forget(a0, a1)
            ok = False
            try:
                if kind is Kind.ZERO and not self._use_zeroes:
                    zeros = memoryview(bytes(min(self.maximum, a1 - a0)))
                    for s in range(a0, a1, len(zeros)):
                        await self._write_piece(s, zeros[: min(len(zeros), a1 - s)], use_fua)
                else:
                    step = CHANGE_MAX - CHANGE_MAX % m  # (the request's length is 32 bits)
                    for s in range(a0, a1, step):
                        await self._send_change(s, min(step, a1 - s), kind, use_fua)
                if fua and not use_fua:
                    await self.pool.flush()
                ok = True
            finally:
                # Every block the change touched is dropped (the next read asks the server),
                # and what block status said of it (asked while it was on its way, too).
                self.cache.end_write(started, dict.fromkeys(blocks), ok)
                self._forget(a0, a1)

    async def _send_change(self, start: int, length: int, kind: Kind, fua: bool) -> None:
        async def op(c: Connection) -> None:
            if kind is Kind.TRIM:
                await c.trim(start, length, fua)
            else:
                await c.write_zeroes(start, length, fua)

        await self.pool.run(op, journal=Change(start, length, kind, durable=fua))

    async def next_extent(self, offset: int, data: bool) -> int | None:
        """The first offset at or after ``offset`` (inside the export) that holds data
        (``data``) or is a hole; None if no data follows. From NBD_CMD_BLOCK_STATUS
        (base:allocation), through the bounded :class:`Extents` map that writes, trims and
        zeroes keep true; without block status the export is all data, with a hole at its
        end."""
        if not self._allocation:
            return offset if data else self.size
        pos = offset
        while pos < self.size:
            spans, _ = await self._spans_at(pos)
            if spans is None:  # (nothing useful: call it data)
                return offset if data else self.size
            for start, end, hole in spans:
                if end <= pos:
                    continue
                if hole != data:
                    return max(start, pos)
                pos = end
        return None if data else self.size

    async def allocated(self, start: int, end: int) -> int | None:
        """How many of bytes ``start`` to ``end`` hold data, as block status says (holes
        excluded); None if the server cannot say, or would need more than
        ALLOCATED_MAX_ASKS requests to. From the :class:`Extents` map, which writes, trims
        and zeroes keep true: after a change only what it touched is asked again."""
        if not self._allocation:
            return None
        key = (start, end)
        known = self._allocated.get(key)
        if known is not None and known[0] == self.extents.generation:
            return known[1]
        generation = self.extents.generation
        data, pos, asks = 0, start, 0
        while pos < end:
            spans, asked = await self._spans_at(pos, may_ask=asks < ALLOCATED_MAX_ASKS)
            if spans is None:
                return None
            asks += asked
            for s, e, hole in spans:
                if e > pos:
                    e = min(e, end)
                    data += 0 if hole else e - max(s, pos)
                    pos = e
        if len(self._allocated) > 64:  # (one key per file: the export and its partitions)
            self._allocated.clear()
        self._allocated[key] = (generation, data)  # (stale at once if a change came meanwhile)
        return data

    async def _spans_at(
        self, pos: int, may_ask: bool = True
    ) -> tuple[list[tuple[int, int, bool]] | None, bool]:
        """What is known of the allocation from ``pos`` on, as (start, end, hole) spans: the
        :class:`Extents` interval holding it, or else (``may_ask``) what block status says
        now; None if neither tells anything past ``pos``. And whether the server was asked."""
        found = self.extents.find(pos)
        if found is not None:
            return [(pos, *found)], False
        if not may_ask:
            return None, False
        asked = await self._block_status(pos)
        if asked is None or asked[-1][1] <= pos:
            return None, True
        return asked, True

    async def _block_status(self, pos: int) -> list[tuple[int, int, bool]] | None:
        """What the server says of the allocation from ``pos`` on: (start, end, hole)."""
        m = self.minimum
        first = pos - pos % m
        length = min(self.size - first, STATUS_MAX - STATUS_MAX % m)
        generation = self.extents.generation

        async def op(c: Connection) -> dict[str, list[tuple[int, int]]]:
            return await c.block_status(first, length)

        extents = (await self.pool.run(op)).get(META_CONTEXT_ALLOCATION)
        if not extents:
            return None
        spans, start = [], first
        for n, flags in extents:
            end = min(start + n, self.size)
            spans.append((start, end, bool(flags & StateFlag.HOLE)))
            start = end
        self.extents.add(first, [(e - s, hole) for s, e, hole in spans], generation)
        return spans

    async def flush(self) -> None:
        await self.pool.flush()

    async def aclose(self) -> int:
        """Flush and disconnect; the bytes that may be lost if the final flush failed."""
        return await self.pool.aclose()
