"""The cache's block protocol alone, against a fake fetcher (no server, no trio loop): the
races the real-server tests found, each replayed step by step."""

from __future__ import annotations

from nbdfs.cache import SAMPLE_MAX, BlockCache, BlockStore, Fetch, Piece
from nbdfs.errors import CommandError

CB = 4096


def cache(capacity: int = 16 * CB, store: BlockStore | None = None) -> BlockCache:
    return BlockCache(store if store is not None else BlockStore(capacity), CB)


def fetch(c: BlockCache, b: int, data: bytes, lo: int = 0) -> Fetch:
    """A fetch of block ``b`` that the fake server answers with ``data`` at once."""
    f = c.start_fetch(b, lo, lo + len(data))
    c.end_fetch(b, f, data if lo == 0 and len(data) == CB else Piece(lo, data))
    return f


def test_a_fetch_is_cached_and_joined_while_in_flight() -> None:
    c = cache()
    f = c.start_fetch(0, 0, CB)
    assert c.fetching(0) is f  # a second reader joins it
    c.end_fetch(0, f, b"a" * CB)
    assert f.done.is_set() and c.get(0) == b"a" * CB and c.fetching(0) is None


def test_a_reader_never_joins_a_fetch_that_began_before_a_write() -> None:
    """The stale-read race: the server may have read the bytes before the write landed."""
    c = cache()
    old = c.start_fetch(0, 0, CB)
    started = c.start_write(range(0, 1))
    c.end_write(started, {0: None}, ok=True)  # the write is acknowledged
    assert c.fetching(0) is None  # a reader from now on must fetch again
    new = c.start_fetch(0, 0, CB)
    c.end_fetch(0, old, b"old!" * (CB // 4))  # the old fetch returns stale bytes
    assert c.get(0) is None  # and they are not cached
    c.end_fetch(0, new, b"new!" * (CB // 4))
    assert c.get(0) == b"new!" * (CB // 4)


def test_a_write_landing_while_a_fetch_runs_keeps_it_out_of_the_cache() -> None:
    c = cache()
    f = c.start_fetch(0, 0, CB)
    started = c.start_write(range(0, 1))
    c.end_fetch(0, f, b"x" * CB)  # the fetch ends while the write is in flight
    assert c.get(0) is None
    c.end_write(started, {0: b"w" * CB}, ok=True)
    assert c.get(0) == b"w" * CB


def test_a_failed_fetch_publishes_its_error_and_is_never_cached() -> None:
    c = cache()
    f = c.start_fetch(0, 0, CB)
    error = CommandError(1)  # NBD_EPERM
    c.end_fetch(0, f, error)
    assert f.done.is_set() and f.data is None and f.error is error
    assert c.get(0) is None and c.fetching(0) is None


def test_a_first_touch_is_the_readers_own_only_once_the_sample_is_full() -> None:
    """While the sample of fetched bytes fills (what recognises the disk on reconnect),
    every first touch is a fetch that records it; afterwards the first reader of an
    untouched block that no one is fetching reads by itself, and touches it."""
    c = cache(capacity=64 * CB)
    for b in range(SAMPLE_MAX):
        assert not c.first_touch(100 + b)  # (the sample is not full: a fetch, sampled)
        fetch(c, 100 + b, b"s" * 512)
    assert len(c.sample()) == SAMPLE_MAX
    f = c.start_fetch(1, 0, CB)
    assert not c.first_touch(1)  # someone is fetching it: join that
    misses = c.misses
    assert c.first_touch(0) and c.misses == misses + 1
    assert not c.first_touch(0)  # touched now: its next reader fetches it whole
    again, started = c.lookup(0, CB, 0, 512, 512)
    assert started and isinstance(again, Fetch) and (again.lo, again.hi) == (0, CB)
    c.end_fetch(1, f, b"1" * CB)


def test_a_block_is_cached_on_its_second_touch_not_its_first() -> None:
    c = cache()
    fetch(c, 0, b"p" * 512, lo=1024)  # the first touch: its sectors, for its readers alone
    assert c.get(0) is None and c.used == 0
    assert c.find(0, count=False) == (None, True)  # but the block is remembered
    assert c.patch(0, 0, b"z") is None  # (nothing to patch)
    again, started = c.lookup(0, CB, 1024, 1536, 512)  # the same bytes again: all of it
    assert started and isinstance(again, Fetch) and (again.lo, again.hi) == (0, CB)
    c.end_fetch(0, again, b"w" * CB)
    assert c.get(0) == b"w" * CB and c.find(0) == (b"w" * CB, False)


def test_blocks_touched_once_are_remembered_as_many_as_the_store_holds() -> None:
    """For the whole mount: two exports sharing a store of 4 blocks remember 4 between them."""
    store = BlockStore(4 * CB)
    a, b = cache(store=store), cache(store=store)
    for n in range(3):
        fetch(a, n, b"p" * 512)
    fetch(b, 0, b"q" * 512)
    fetch(b, 1, b"q" * 512)  # the fifth: export a's block 0, the oldest, is forgotten
    assert a.find(0, count=False) == (None, False)
    assert all(a.find(n, count=False) == (None, True) for n in (1, 2))
    assert all(b.find(n, count=False) == (None, True) for n in (0, 1))
    first, _ = a.lookup(0, CB, 0, 512, 512)  # a first touch again: its sector only
    assert isinstance(first, Fetch) and (first.lo, first.hi) == (0, 512)
    a.clear()  # forgets export a's blocks, and only them
    assert a.find(1, count=False) == (None, False)
    assert b.find(1, count=False) == (None, True)


def test_concurrent_writes_to_one_block_drop_it() -> None:
    """Two writes in flight to a block: the server may apply them in either order."""
    c = cache()
    fetch(c, 0, b"0" * CB)
    first = c.start_write(range(0, 1))
    second = c.start_write(range(0, 1))
    c.end_write(first, {0: b"1" * CB}, ok=True)
    assert c.get(0) is None
    c.end_write(second, {0: b"2" * CB}, ok=True)
    assert c.get(0) is None  # (conservative: the next read fetches what the server holds)


def test_the_store_bounds_every_export_together_lru_first() -> None:
    store = BlockStore(4 * CB)
    a, b = cache(store=store), cache(store=store)
    for i in range(3):
        fetch(a, i, bytes([i]) * CB)
    assert a.get(0) is not None  # block 0 of a is now the most recently used
    fetch(b, 0, b"b" * CB)
    fetch(b, 1, b"b" * CB)  # the fifth block: evicts a's least recently used (block 1)
    assert store.currsize == 4 * CB and a.used == 3 * CB - CB and b.used == 2 * CB
    assert a.get(1) is None and a.get(0) is not None and a.get(2) is not None
    a.clear()
    assert a.used == 0 and b.used == 2 * CB and store.currsize == 2 * CB


def test_the_sample_holds_blocks_fetched_and_not_written_since() -> None:
    c = cache(capacity=(SAMPLE_MAX + 8) * CB)
    for i in range(SAMPLE_MAX + 4):
        fetch(c, i, bytes([i]) * CB)
    sample = {b for b, *_ in c.sample()}
    assert len(sample) == SAMPLE_MAX and 0 in sample
    c.end_write(c.start_write(range(0, 1)), {0: None}, ok=True)
    assert 0 not in {b for b, *_ in c.sample()}


def test_lookup_answers_hit_join_or_miss_in_one_call() -> None:
    c = cache()
    # a read at random touching block 0 the first time: a miss, fetching its sector only
    first, started = c.lookup(0, CB, 100, 200, 512)
    assert started and isinstance(first, Fetch) and (first.lo, first.hi) == (0, 512)
    # a second reader of the same bytes joins that fetch
    joined, started = c.lookup(0, CB, 0, 300, 512)
    assert joined is first and not started
    c.end_fetch(0, first, Piece(0, b"p" * 512))
    assert joined.data == Piece(0, b"p" * 512)  # (both readers get the piece)
    # touched before: the whole block is fetched, and cached
    whole, started = c.lookup(0, CB, 0, 512, 512)
    assert started and isinstance(whole, Fetch) and (whole.lo, whole.hi) == (0, CB)
    assert c.lookup(0, CB, 1000, 1100, 512) == (whole, False)  # (joined)
    c.end_fetch(0, whole, b"w" * CB)
    assert c.lookup(0, CB, 0, CB, 512) == (b"w" * CB, False)
    assert c.hits == 1 and c.misses == 4


def test_hit_answers_only_what_is_cached_and_counts_only_hits() -> None:
    """The warm read's shortcut: a miss through it counts nothing, since the reader then
    asks :meth:`BlockCache.lookup`, which counts it."""
    c = cache()
    assert c.hit(0) is None
    fetch(c, 0, b"w" * CB)
    fetch(c, 1, b"p" * 512)
    assert c.hit(0) == b"w" * CB
    assert c.hit(1) is None  # (a piece is never cached)
    assert c.hit(2) is None
    assert (c.hits, c.misses) == (1, 0)
