"""Byte-bounded block cache with in-flight de-duplication and write generations.

Blocks are fixed-size slices of one export, keyed by block number. Their bytes live in the
mount's one :class:`BlockStore`, a ``cachetools.LRUCache`` counted in bytes and shared by
every export, so ``--cache-size`` bounds the whole mount however many exports are read,
and the least recently used block goes first whichever export it is of. Two pieces of
bookkeeping keep an export's :class:`BlockCache` from ever serving bytes older than the
last write:

* a *generation* per block, bumped when a write to it starts and again when it ends; a
  fetch remembers the generation it started under and is cached only if nothing changed
  meanwhile (a read that raced a write may be stale; it is returned, never cached);
* a write that ends while another write to the same block started after it drops the
  block instead of patching it, since the server may have applied them in either order.

Fetches in flight are shared: a second reader of a block being fetched waits for that
fetch instead of asking the server again. A failed fetch is never cached.

A block enters the cache on its second touch (as ARC's and 2Q's ghost entries and
TinyLFU's doorkeeper admit only what comes back): a read at random that touches a block the
first time fetches only the sectors it needs (a :class:`Piece`, for its readers alone), and
the block number is remembered; a touch of a remembered block fetches it whole, and caches
it. A block read once costs its sectors on the wire and no memory; a working set read
twice is cached in whole blocks. Once the sample of fetched bytes (what recognises the
disk after a reconnect) is full, the reader of such a piece reads it by itself, with no
:class:`Fetch` for others to join (:meth:`BlockCache.first_touch`): a piece is never kept,
and a reader at random seldom has company for it.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import trio
from cachetools import Cache, LRUCache

from .readahead import Budget

# A cached block: immutable bytes, or the bytearray a one-block read was received into, or
# a view of the buffer a read of several blocks was received into (never written to
# afterwards; a patch makes a new object).
Block = bytes | bytearray | memoryview


@dataclass(slots=True)
class Piece:
    """Part of a block that a fetch brought: its bytes from ``lo`` to ``lo + len(data)``,
    never all of it. Its readers get it; the cache never keeps it."""

    lo: int
    data: Block

    def holds(self, lo: int, hi: int) -> bool:
        return self.lo <= lo and hi <= self.lo + len(self.data)


Entry = Block | Piece  # what a fetch brings


def sectors(lo: int, hi: int, sector: int, length: int) -> tuple[int, int]:
    """The ``sector``-aligned part of a block ``length`` bytes long that holds bytes ``lo``
    to ``hi``: what a read of a block touched the first time fetches."""
    return lo - lo % sector, min(hi + (-hi % sector), length)


SAMPLE_MAX = 32  # fetched blocks remembered by checksum, to recognise the disk on reconnect
Key = tuple[int, int]  # (export's number in the store, block number)


class BlockStore(LRUCache[Key, Block]):
    """The cached blocks of every export of a mount, within one byte budget; and the
    budget of their read-ahead, a quarter of it (the runs live outside the cache)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(maxsize=max(capacity, 1), getsizeof=len)
        self.capacity = capacity
        self.read_ahead = Budget(capacity // 4)
        self.used_by: dict[int, int] = {}  # export number -> bytes it holds here
        # Blocks of every export touched once and not cached, oldest first (ARC's ghost
        # list): as many as the store holds blocks, so a mount of many exports remembers
        # no more than a mount of one. A touch of one of them caches it.
        self.touched: OrderedDict[Key, None] = OrderedDict()
        self._owners = 0

    def new_owner(self) -> int:
        self._owners += 1
        return self._owners

    def __setitem__(self, key: Key, value: Block) -> None:
        if key in self:
            del self[key]  # (accounted for below, whatever the eviction order)
        super().__setitem__(key, value)  # may evict others, through __delitem__
        self.used_by[key[0]] = self.used_by.get(key[0], 0) + len(value)
        self.touched.pop(key, None)  # (cached now: no longer a block touched once)

    def __delitem__(self, key: Key) -> None:
        size = len(Cache.__getitem__(self, key))
        super().__delitem__(key)
        left = self.used_by[key[0]] - size
        if left:
            self.used_by[key[0]] = left
        else:
            del self.used_by[key[0]]

    def touch(self, key: Key, block_size: int) -> None:
        """Remember a block touched once, forgetting the oldest beyond the store's count."""
        self.touched[key] = None
        if len(self.touched) > self.capacity // block_size:
            self.touched.popitem(last=False)

    def drop_owner(self, owner: int) -> None:
        for key in [k for k in self.keys() if k[0] == owner]:
            del self[key]
        for key in [k for k in self.touched if k[0] == owner]:
            del self.touched[key]


@dataclass(slots=True)
class Fetch:
    """Bytes ``lo`` to ``hi`` of a block being read from the server; readers wait on
    ``done``."""

    generation: int
    lo: int
    hi: int
    done: trio.Event = field(default_factory=trio.Event)
    data: Entry | None = None  # None after ``done``: the fetch failed, with
    error: Exception | None = None  # the server's error (its errno reaches every reader)


class BlockCache:
    """One export's view of the store: its blocks, fetches, generations and counters."""

    def __init__(self, store: BlockStore, block_size: int) -> None:
        self.block_size = block_size
        self.store = store
        self._owner = store.new_owner()
        self._lru: BlockStore | None = store if store.capacity >= block_size else None
        self._fetches: dict[int, Fetch] = {}
        self._gen: dict[int, int] = {}
        self._writes = 0  # writes in flight; generations can be forgotten when none are,
        self._fetches_running = 0  # and no fetch runs (superseded ones included)
        # block -> (offset in the block, length, CRC-32) of bytes as the server sent them,
        # for blocks not written since: what the disk must still hold after a reconnect.
        self._sample: dict[int, tuple[int, int, int]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self._lru is not None

    @property
    def used(self) -> int:
        """Bytes of this export's blocks in the store."""
        return self.store.used_by.get(self._owner, 0)

    def get(self, block: int, count: bool = True) -> Block | None:
        """The cached block, if it is."""
        return self.find(block, count)[0]

    def find(self, block: int, count: bool = True) -> tuple[Block | None, bool]:
        """:meth:`get`, and whether the block was touched before if it is not cached (one
        lookup for both)."""
        if self._lru is None:
            return None, False
        key = (self._owner, block)
        entry = self._lru.get(key)
        if count:
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
        return entry, entry is None and key in self.store.touched

    def hit(self, block: int) -> Block | None:
        """The cached block, counted as a hit; None, counted as nothing, if it is not (the
        caller goes on to :meth:`lookup`)."""
        if self._lru is None:
            return None
        entry = self._lru.get((self._owner, block))
        if entry is not None:
            self.hits += 1
        return entry

    def lookup(
        self, block: int, length: int, lo: int, hi: int, sector: int, count: bool = True
    ) -> tuple[Entry | Fetch, bool]:
        """The block protocol's one question: what a reader of bytes ``lo`` to ``hi`` of
        ``block`` (``length`` bytes long) gets.

        * a *hit*: the cached entry holding those bytes, and False;
        * a *join*: the fetch in flight that a reader may still join (:meth:`fetching`),
          and False;
        * a *miss*: a fetch started here, and True (the caller sends it). A block touched
          the first time is fetched only in the ``sector``-aligned part asked for; a block
          touched before, all of it.
        """
        cached, touched = self.find(block, count)
        if cached is not None:
            return cached, False
        fetch = self.fetching(block)
        if fetch is not None:
            return fetch, False
        f_lo, f_hi = sectors(lo, hi, sector, length) if not touched else (0, length)
        return self.start_fetch(block, f_lo, f_hi), True

    def first_touch(self, block: int) -> bool:
        """Whether a reader of ``block``, which :meth:`hit` found not cached, may read the
        sectors it needs by itself, without a :class:`Fetch` that others could join: the
        block was not touched before and no fetch of it is in flight, so what it brings
        would only be a piece (never cached), and the sample is full (nothing of it would
        be kept). If so the block is now touched (its next reader fetches it whole) and a
        miss is counted."""
        if len(self._sample) < SAMPLE_MAX or block in self._fetches:
            return False
        key = (self._owner, block)
        if key in self.store.touched:
            return False
        self.store.touch(key, self.block_size)
        self.misses += 1
        return True

    def own(self, block: int, entry: Entry) -> Entry:
        """Replace a cached view of a larger buffer by a copy of its bytes; return it."""
        key = (self._owner, block)
        if (
            not isinstance(entry, memoryview)
            or self._lru is None
            or self._lru.get(key) is not entry
        ):
            return entry  # (a piece, or bytes of its own, or not cached)
        copy = self._lru[key] = bytes(entry)
        return copy

    def fetching(self, block: int) -> Fetch | None:
        """The block's fetch in flight, if a reader may still join it: not once a write to
        the block has started since it began, since it may bring the bytes from before that
        write (a reader who joins it after the write was acknowledged would read stale bytes).
        A new fetch then takes its place; its own readers still get what it brings."""
        fetch = self._fetches.get(block)
        if fetch is not None and fetch.generation != self._gen.get(block, 0):
            return None
        return fetch

    def start_fetch(self, block: int, lo: int, hi: int) -> Fetch:
        fetch = Fetch(self._gen.get(block, 0), lo, hi)
        self._fetches[block] = fetch
        self._fetches_running += 1
        return fetch

    def end_fetch(self, block: int, fetch: Fetch, outcome: Entry | Exception) -> None:
        """Publish a fetch's outcome, its bytes or the error that every reader of it gets;
        cache a whole block if no write touched it meanwhile (an error never is, and a piece
        only marks the block as touched)."""
        self._fetches_running -= 1
        if self._fetches.get(block) is fetch:
            del self._fetches[block]
        if isinstance(outcome, Exception):
            fetch.error = outcome
        else:
            fetch.data = outcome
        fetch.done.set()
        if (
            fetch.data is not None
            and self._lru is not None
            and self._gen.get(block, 0) == fetch.generation
        ):
            entry = fetch.data
            if isinstance(entry, Piece):
                lo, data = entry.lo, entry.data
                self.store.touch((self._owner, block), self.block_size)
            else:
                lo, data = 0, entry
                self._lru[(self._owner, block)] = entry
            if len(self._sample) < SAMPLE_MAX:
                self._sample[block] = (lo, len(data), zlib.crc32(data))

    def sample(self) -> list[tuple[int, int, int, int]]:
        """``(block, offset in it, length, CRC-32)`` of bytes fetched and not written since."""
        return [(b, *known) for b, known in self._sample.items()]

    def clear(self) -> None:
        """Forget every block (the export is not the one they came from)."""
        self.store.drop_owner(self._owner)
        self._sample.clear()

    def start_write(self, blocks: range) -> dict[int, int]:
        self._writes += 1
        started = {}
        for b in blocks:
            started[b] = self._gen[b] = self._gen.get(b, 0) + 1
            self._sample.pop(b, None)
        return started

    def end_write(
        self, started: dict[int, int], updates: dict[int, Block | None], ok: bool
    ) -> None:
        """Finish a write: store the new contents of the blocks it covered, or drop them.

        ``updates`` maps a block written in part to its new bytes (:meth:`patch`; None: it
        was not cached). Every other block is dropped, as is any a newer write started on.
        """
        for b, gen in started.items():
            latest = self._gen.get(b, 0) == gen
            self._gen[b] = self._gen.get(b, 0) + 1
            if self._lru is None:
                continue
            new = updates.get(b)
            if ok and latest and new is not None:
                self._lru[(self._owner, b)] = new
            else:
                self._lru.pop((self._owner, b), None)
        self._writes -= 1
        if self._writes == 0 and self._fetches_running == 0:
            self._gen.clear()

    def patch(self, block: int, offset: int, data: bytes | memoryview) -> bytes | None:
        """The cached block with ``data`` written at ``offset``, or None if not cached."""
        if self._lru is None:
            return None
        old = self._lru.get((self._owner, block))
        if old is None:
            return None
        return b"".join((old[:offset], data, old[offset + len(data) :]))
