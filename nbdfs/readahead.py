"""What a sequential reader of an export reads next: runs of bytes fetched ahead of it.

Runs live outside the block cache. A scan reads each byte once (the kernel's page cache
keeps what it read, unless O_DIRECT), so it neither pushes the working set out of the cache
nor pays the cache's bookkeeping per block: a sequential read costs a look at one or two
runs and a slice, whatever its length.

Like the cache, runs never serve bytes older than the last acknowledged write: a write,
trim or zeroing discards the runs it overlaps when it starts and again when it ends. A run
fetched before the change began may hold the old bytes (readers who took it before then
were concurrent with the change, and either answer is right for them); one fetched while
the change was on its way may hold either. Neither is there for a reader who comes after.
Pure bookkeeping: :class:`ExportIO <nbdfs.blockio.ExportIO>` sends the requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

WINDOW_MIN = 128 * 1024  # read-ahead of a reader that just turned sequential


@dataclass(slots=True, eq=False)
class Run:
    """Export bytes ``start`` to ``end`` as one NBD read; readers wait on ``done``."""

    start: int
    end: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytearray | None = None  # None after ``done``: the read failed, with
    error: Exception | None = None  # the server's error (its errno reaches every reader)


class Budget:
    """The bytes the read-ahead of a mount's exports may hold in all: one that needs room
    takes it from those that read least recently (their runs go)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: dict[ReadAhead, int] = {}  # bytes in runs, the least recent user first

    @property
    def used(self) -> int:
        return sum(self._held.values())

    def hold(self, owner: ReadAhead, held: int) -> None:
        """``owner`` holds ``held`` bytes now (its place in the order unchanged)."""
        if held:
            self._held[owner] = held
        else:
            self._held.pop(owner, None)

    def room(self, owner: ReadAhead, want: int) -> int:
        """Up to ``want`` bytes more that ``owner``, read just now, may take: the free
        ones, then those of the others, least recent first."""
        mine = self._held.pop(owner, 0)
        self._held[owner] = mine  # (the most recent now)
        free = self.capacity - self.used
        for other in list(self._held):
            if free >= want or other is owner:
                break
            free += self._held[other]
            other.clear()
        return max(min(want, free), 0)


class ReadAhead:
    """The runs ahead of one export's sequential reader, in export order, at most
    ``limit`` bytes beyond what it asked for last and within the mount's ``budget``;
    each one request of at most ``request_max`` bytes, a multiple of ``align``, inside the
    export's ``size``."""

    def __init__(self, budget: Budget, limit: int, size: int, request_max: int, align: int) -> None:
        self.budget = budget
        self.limit, self.size, self.align = limit, size, align
        self.step = max(request_max - request_max % align, align)
        self.window = 0  # how far ahead the reader is served now: doubles up to ``limit``
        self.runs: list[Run] = []

    def cover(self, start: int, end: int) -> tuple[list[Run], list[Run]]:
        """The runs a read of bytes ``start`` to ``end`` (aligned as the server needs) takes
        them from, and those of them made here for the gaps no run covered (the caller
        fetches them). Runs before ``start`` are done with, and runs further on than
        read-ahead reaches are of an earlier scan: both go."""
        far = end + self.limit
        self.runs = [r for r in self.runs if start < r.end and r.start < far]
        new = self._fill(start, end)
        used = []
        for run in self.runs:
            if run.start >= end:
                break
            used.append(run)
        self._held()
        return used, new

    def top_up(self, pos: int) -> list[Run]:
        """New runs that keep the reader, now at ``pos`` (aligned), served a window ahead:
        none while more than half the window from ``pos`` on is there or on its way, else
        the rest of it at once, in whole runs of ``request_max`` where it spans more than
        one (a reader's uneven steps then make no short runs, each a request of its own).
        The window doubles with each call, up to ``limit``."""
        self.window = min(max(self.window * 2, WINDOW_MIN), self.limit)
        covered = pos
        for run in self.runs:
            if run.start > covered:
                break
            covered = max(covered, run.end)
        top = min(pos + self.window, self.size)
        if covered - pos > self.window // 2 or top - covered < self.align:
            return []
        want = top - covered
        if want > self.step and top < self.size:
            want -= want % self.step
        top = covered + self.budget.room(self, want)
        new = self._fill(covered, top - top % self.align)
        self._held()
        return new

    def _fill(self, start: int, end: int) -> list[Run]:
        """Runs (one request each) for the gaps between ``start`` and ``end``, put in
        their places; returned in order."""
        runs, new = self.runs, []
        pos, i = start, 0
        while i < len(runs) and runs[i].end <= pos:
            i += 1
        while pos < end:
            if i < len(runs) and runs[i].start <= pos:
                pos, i = runs[i].end, i + 1
                continue
            stop = min(end, pos + self.step, runs[i].start if i < len(runs) else end)
            run = Run(pos, stop)
            runs.insert(i, run)
            new.append(run)
            pos, i = stop, i + 1
        return new

    def discard(self, start: int, end: int) -> None:
        """Forget the runs that overlap bytes ``start`` to ``end`` (a change to them began
        or ended); their readers so far keep what they get."""
        if self.runs:
            self.runs = [r for r in self.runs if r.end <= start or end <= r.start]
            self._held()

    def drop(self, run: Run) -> None:
        """Forget a run that failed (its readers have its error; later ones ask again)."""
        if run in self.runs:  # (by identity)
            self.runs.remove(run)
            self._held()

    def restart(self) -> None:
        """The reader went elsewhere: the window starts small again (the runs stay, for a
        scan that resumes; :meth:`cover` drops them once out of its reach)."""
        self.window = 0

    def clear(self) -> None:
        """Forget every run (the budget needs their room, or the disk may not be the one
        they were read from)."""
        self.runs = []
        self.window = 0
        self.budget.hold(self, 0)

    def _held(self) -> None:
        self.budget.hold(self, sum(r.end - r.start for r in self.runs))
