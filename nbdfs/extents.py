"""What the server said of an export's allocation (NBD_CMD_BLOCK_STATUS, base:allocation),
kept so that lseek(SEEK_DATA/SEEK_HOLE) asks once per region, not once per call.

A pure, bounded map of disjoint intervals, each data or hole. Writes, trims and zeroes make
it forget what they touch (:meth:`Extents.forget`), and a reply that was in flight while
they happened is not kept (the :attr:`Extents.generation` it was asked under moved), so it
never answers with what the server said before a change nbdfs made since.
"""

from __future__ import annotations

import bisect

MAX_INTERVALS = 4096  # past this everything is forgotten: a new scan costs a few requests


class Extents:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._spans: list[tuple[int, int, bool]] = []  # (start, end, hole), sorted, disjoint
        self.generation = 0

    def __len__(self) -> int:
        return len(self._spans)

    def find(self, offset: int) -> tuple[int, bool] | None:
        """(end, hole) of the known interval holding ``offset``, or None if unknown."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0:
            start, end, hole = self._spans[i]
            if start <= offset < end:
                return end, hole
        return None

    def add(self, start: int, extents: list[tuple[int, bool]], generation: int) -> None:
        """What a reply said from ``start`` on: ``(length, hole)`` in order. Dropped if a
        change happened since it was asked (``generation`` is no longer current)."""
        if generation != self.generation:
            return
        spans = []
        for length, hole in extents:
            if length > 0:
                spans.append((start, start + length, hole))
                start += length
        if not spans:
            return
        self._cut(spans[0][0], spans[-1][1])
        i = bisect.bisect_left(self._starts, spans[0][0])
        self._spans[i:i] = spans
        self._starts[i:i] = [s for s, _, _ in spans]
        if len(self._spans) > MAX_INTERVALS:
            self._spans, self._starts = [], []

    def forget(self, start: int, end: int) -> None:
        """Bytes ``start`` to ``end`` changed (a write, trim or zeroing started)."""
        self.generation += 1
        if self._spans:  # (every write calls this: nothing to do while nothing is known)
            self._cut(start, end)

    def _cut(self, start: int, end: int) -> None:
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        j = i
        kept = []
        while j < len(self._spans) and self._spans[j][0] < end:
            s, e, hole = self._spans[j]
            if e > start:
                if s < start:
                    kept.append((s, start, hole))
                if e > end:
                    kept.append((end, e, hole))
            else:
                kept.append((s, e, hole))
            j += 1
        self._spans[i:j] = kept
        self._starts[i:j] = [s for s, _, _ in kept]
