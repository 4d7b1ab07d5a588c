"""The journal: what the server acknowledged but may still lose, until a flush covers it.

A pure data structure (no I/O, no trio), so its one rule can be tested on its own: **after
a replay, every byte holds the newest acknowledged change to it.** NBD lets a server keep
acknowledged writes in a volatile cache until NBD_CMD_FLUSH; a restart may lose any of
them, in any mix. So the pool records each acknowledged change here and, after losing a
connection that carried some, writes the journal again before anything else runs.

The journal holds at most one change per byte: recording a change removes the bytes it
covers from every older entry (an older write replayed over a newer one would lose the
newer, which is how a FUA write was once undone). A change the server made durable before
acknowledging it (FUA) is not kept, but still removes what it covers. Entries are therefore
disjoint, and a replay may write them in any order; they are kept sorted by offset.

Each entry carries the sequence number of the change that made it; :meth:`Journal.forget`
drops the entries older than a flush's starting mark, since that flush made them durable.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterator
from dataclasses import dataclass


class Kind(enum.Enum):
    WRITE = "write"
    ZERO = "zero"  # NBD_CMD_WRITE_ZEROES
    TRIM = "trim"  # NBD_CMD_TRIM


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    offset: int
    length: int
    kind: Kind
    data: bytes | memoryview | None = None  # a WRITE's bytes (a view: no copy)

    @property
    def end(self) -> int:
        return self.offset + self.length

    def cut(self, start: int, end: int) -> Entry:
        """The part of this entry between ``start`` and ``end`` (inside it)."""
        data = None
        if self.data is not None:
            data = memoryview(self.data)[start - self.offset : end - self.offset]
        return Entry(self.seq, start, end - start, self.kind, data)


@dataclass(frozen=True, slots=True)
class Change:
    """One request that changes the export: what the pool records once it is acknowledged."""

    offset: int
    length: int
    kind: Kind = Kind.WRITE
    data: bytes | memoryview | None = None
    durable: bool = False  # the server made it stable before acknowledging it (FUA)

    @classmethod
    def write(cls, offset: int, data: bytes | memoryview, durable: bool = False) -> Change:
        return cls(offset, len(data), Kind.WRITE, data, durable)


class Journal:
    def __init__(self) -> None:
        self._entries: list[Entry] = []  # disjoint, sorted by offset
        self._starts: list[int] = []  # their offsets, for bisect
        self._seq = 0
        self.bytes = 0  # payload bytes held (what replay would send as data)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    @property
    def mark(self) -> int:
        """The sequence number the next change gets: a flush started now covers all below."""
        return self._seq

    @property
    def covered(self) -> int:
        """Bytes of the export that a lost server may not hold as acknowledged."""
        return sum(e.length for e in self._entries)

    def record(self, change: Change) -> None:
        """An acknowledged change."""
        offset, length = change.offset, change.length
        if length <= 0:
            return
        assert (change.kind is Kind.WRITE) == (change.data is not None)
        end = offset + length
        entries, starts = self._entries, self._starts
        # The first entry that may overlap: the one starting at or before offset.
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        j = i
        kept: list[Entry] = []
        while j < len(entries) and entries[j].offset < end:
            old = entries[j]
            if old.end > offset:  # overlaps: keep what lies outside [offset, end)
                self.bytes -= len(old.data) if old.data is not None else 0
                for part in (
                    old.cut(old.offset, offset) if old.offset < offset else None,
                    old.cut(end, old.end) if old.end > end else None,
                ):
                    if part is not None:
                        kept.append(part)
                        self.bytes += len(part.data) if part.data is not None else 0
            else:
                kept.append(old)
            j += 1
        if not change.durable:
            kept.append(Entry(self._seq, offset, length, change.kind, change.data))
            self.bytes += length if change.data is not None else 0
            kept.sort(key=lambda e: e.offset)
        self._seq += 1
        entries[i:j] = kept
        starts[i:j] = [e.offset for e in kept]

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any change held touches bytes ``start`` to ``end``."""
        i = bisect.bisect_left(self._starts, end) - 1
        return i >= 0 and self._entries[i].end > start

    def discard(self, entry: Entry) -> None:
        """Drop ``entry`` (a replay made it durable), if it is still held as it was."""
        i = bisect.bisect_left(self._starts, entry.offset)
        if i < len(self._entries) and self._entries[i] is entry:
            del self._entries[i], self._starts[i]
            self.bytes -= len(entry.data) if entry.data is not None else 0

    def forget(self, mark: int) -> None:
        """A flush that started at ``mark`` succeeded: the changes before it are durable."""
        if not self._entries:
            return
        self._entries = [e for e in self._entries if e.seq >= mark]
        self._starts = [e.offset for e in self._entries]
        self.bytes = sum(len(e.data) for e in self._entries if e.data is not None)

    def clear(self) -> None:
        self.forget(self._seq)

    def __iter__(self) -> Iterator[Entry]:
        """The entries to replay, by offset (disjoint, so any order gives the same bytes)."""
        return iter(list(self._entries))
