"""The journal's rule, against a model: after a replay every byte holds the newest
acknowledged change to it, for any mix of plain and FUA writes, zeroes and trims, flushes
and server restarts that lose any part of what was not yet durable."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdfs.journal import Change, Journal, Kind

SIZE = 64


@dataclass
class Server:
    """A server with a volatile cache: a restart keeps, byte by byte, either what is
    durable or what was cached (any mix)."""

    volatile: bytearray = field(default_factory=lambda: bytearray(SIZE))
    durable: bytearray = field(default_factory=lambda: bytearray(SIZE))

    def apply(self, change: Change) -> None:
        end = change.offset + change.length
        data = bytes(change.data) if change.data is not None else bytes(change.length)
        self.volatile[change.offset : end] = data  # (a trim reads back as zeroes here)
        if change.durable:
            self.durable[change.offset : end] = data

    def flush(self) -> None:
        self.durable[:] = self.volatile

    def restart(self, keep_cached: list[bool]) -> None:
        self.volatile = bytearray(
            v if keep else d
            for v, d, keep in zip(self.volatile, self.durable, keep_cached, strict=True)
        )
        self.durable[:] = self.volatile


def replay(journal: Journal, server: Server) -> None:
    mark = journal.mark
    for entry in journal:
        server.apply(Change(entry.offset, entry.length, entry.kind, entry.data))
    server.flush()
    journal.forget(mark)


def check_invariants(journal: Journal) -> None:
    entries = list(journal)
    for a, b in itertools.pairwise(entries):
        assert a.end <= b.offset  # disjoint, sorted
    assert journal.bytes == sum(len(e.data) for e in entries if e.data is not None)
    for e in entries:
        assert e.data is None or len(e.data) == e.length


span = st.tuples(st.integers(0, SIZE - 1), st.integers(1, SIZE)).map(
    lambda t: (t[0], min(t[1], SIZE - t[0]))
)
change = st.builds(
    lambda s, kind, durable, fill: Change(
        s[0],
        s[1],
        kind,
        bytes([fill]) * s[1] if kind is Kind.WRITE else None,
        durable,
    ),
    span,
    st.sampled_from(Kind),
    st.booleans(),
    st.integers(1, 255),
)
step = st.one_of(
    change,
    st.just("flush"),
    st.lists(st.booleans(), min_size=SIZE, max_size=SIZE),  # a restart: which bytes stay
)


@settings(max_examples=400)
@given(st.lists(step, max_size=40))
def test_replay_restores_the_newest_acknowledged_change(steps: list[object]) -> None:
    server, journal = Server(), Journal()
    expected = bytearray(SIZE)
    for s in steps:
        if isinstance(s, Change):
            server.apply(s)
            journal.record(s)
            data = bytes(s.data) if s.data is not None else bytes(s.length)
            expected[s.offset : s.offset + s.length] = data
        elif s == "flush":
            mark = journal.mark
            server.flush()
            journal.forget(mark)
        else:
            assert isinstance(s, list)
            server.restart(s)
            replay(journal, server)
            assert server.volatile == expected
        check_invariants(journal)
    server.restart([False] * SIZE)  # the worst restart: everything not durable is lost
    replay(journal, server)
    assert server.volatile == expected


def test_a_fua_write_removes_the_older_write_it_covers() -> None:
    """The bug of the dd case: A (plain), then B (FUA) over it; A must not be replayed."""
    journal = Journal()
    journal.record(Change.write(0, b"A" * 16))
    journal.record(Change.write(4, b"B" * 8, durable=True))
    assert [(e.offset, bytes(e.data or b"")) for e in journal] == [(0, b"AAAA"), (12, b"AAAA")]
    assert journal.bytes == 8 and journal.covered == 8


def test_a_flush_forgets_only_what_came_before_its_mark() -> None:
    journal = Journal()
    journal.record(Change.write(0, b"a" * 8))
    mark = journal.mark
    journal.record(Change(16, 8, Kind.TRIM))  # acknowledged while the flush runs
    journal.forget(mark)
    assert [(e.offset, e.kind) for e in journal] == [(16, Kind.TRIM)]
    assert journal.bytes == 0 and journal.covered == 8


def test_overlaps() -> None:
    journal = Journal()
    journal.record(Change(10, 10, Kind.ZERO))
    journal.record(Change(30, 5, Kind.TRIM))
    assert [journal.overlaps(s, e) for s, e in [(0, 10), (0, 11), (19, 30), (20, 30)]] == [
        False,
        True,
        True,
        False,
    ]
    assert journal.overlaps(34, 40) and not journal.overlaps(35, 40)


def test_a_replay_forgets_each_entry_it_made_durable() -> None:
    journal = Journal()
    for i in range(4):
        journal.record(Change.write(i * 10, b"x" * 5))
    first, second, *_ = list(journal)
    journal.discard(first)
    journal.discard(first)  # (twice: no harm)
    assert [e.offset for e in journal] == [10, 20, 30] and journal.bytes == 15
    journal.record(Change.write(10, b"y" * 5))  # a newer change replaced `second`
    journal.discard(second)  # so it is not dropped
    assert [e.offset for e in journal] == [10, 20, 30]
