"""The read-ahead runs alone (sans I/O): what a sequential read takes them from, what
tops them up, what a change makes them forget, and their bounds."""

from __future__ import annotations

from nbdfs.readahead import WINDOW_MIN, Budget, ReadAhead, Run

K = 1024
M = K * K


def spans(runs: list[Run]) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in runs]


def test_a_read_takes_the_runs_there_and_runs_made_for_its_gaps() -> None:
    ra = ReadAhead(Budget(64 * M), 8 * M, 64 * M, 256 * K, 4 * K)
    used, new = ra.cover(0, 600 * K)  # nothing there: its own runs, one request each
    assert spans(used) == spans(new) == [(0, 256 * K), (256 * K, 512 * K), (512 * K, 600 * K)]
    ra.discard(300 * K, 301 * K)  # a write: the run over it goes
    used, new = ra.cover(100 * K, 700 * K)
    assert spans(new) == [(256 * K, 512 * K), (600 * K, 700 * K)]
    assert spans(used) == [(0, 256 * K), (256 * K, 512 * K), (512 * K, 600 * K), (600 * K, 700 * K)]
    assert [r for r in used if r not in new] == ra.runs[:1] + ra.runs[2:3]
    ra.cover(512 * K, 520 * K)  # runs before the read are done with
    assert spans(ra.runs) == [(512 * K, 600 * K), (600 * K, 700 * K)]
    failed = ra.runs[0]
    ra.drop(failed)  # a run that failed goes; the next reader makes another
    (again,), (made,) = ra.cover(512 * K, 520 * K)
    assert again is made and spans([made]) == [(512 * K, 520 * K)]
    ra.drop(failed)  # (its twin stays: dropped by identity)
    assert ra.runs[0] is made


def test_top_up_keeps_a_window_ahead_that_doubles_and_refills_by_halves() -> None:
    ra = ReadAhead(Budget(64 * M), 2 * M, 64 * M, 4 * M, 4 * K)
    ra.cover(0, 4 * K)
    assert spans(ra.top_up(4 * K)) == [(4 * K, 4 * K + WINDOW_MIN)]
    pos = 4 * K
    while ra.window < 2 * M:  # each read doubles the window, and fills it
        pos += 4 * K
        new = ra.top_up(pos)
        assert new and new[-1].end == pos + ra.window
    assert ra.window == 2 * M  # (the limit)
    top = ra.runs[-1].end
    assert ra.top_up(top - M - 4 * K) == []  # more than half the window is there
    assert spans(ra.top_up(top - M)) == [(top, top - M + 2 * M)]
    ra.restart()
    assert ra.window == 0 and ra.runs  # a reader that went elsewhere may come back
    ra.top_up(top + M)
    assert ra.window == WINDOW_MIN


def test_a_reader_in_uneven_steps_is_read_ahead_in_whole_runs() -> None:
    """The kernel's reads of a scan are not all of one size: the window's refills still
    come in runs of the largest request, not a short one each (a request of its own)."""
    ra = ReadAhead(Budget(64 * M), 4 * M, 64 * M, M, 4 * K)
    pos, made = 0, []
    for step in [128 * K, 768 * K, 512 * K, 256 * K, M, 384 * K] * 8:
        ra.cover(pos, pos + step)
        pos += step
        made += ra.top_up(pos)
    steady = [r for r in made if r.start >= 4 * M]  # (the window has grown to its limit)
    assert len(steady) > 10
    assert {r.end - r.start for r in steady} == {M}


def test_runs_stay_inside_the_export_and_within_reach() -> None:
    ra = ReadAhead(Budget(64 * M), M, 10 * M + 100, M, 4 * K)
    ra.cover(9 * M, 10 * M)
    assert ra.top_up(10 * M) == []  # (the export's last 100 bytes are not a block)
    assert ra.runs[-1].end == 10 * M
    ra.cover(0, 4 * K)  # the reader starts again at 0: runs near the end are out of reach
    assert spans(ra.runs) == [(0, 4 * K)]
    ra.clear()
    assert ra.runs == [] and ra.window == 0


def test_the_mounts_exports_share_one_budget_the_least_recent_reader_giving_way() -> None:
    budget = Budget(2 * M)
    a, b = (ReadAhead(budget, 2 * M, 64 * M, M, 4 * K) for _ in range(2))
    b.cover(0, M)
    a.cover(0, M)
    assert budget.used == 2 * M
    a.window = M  # (the next top-up: 2 MiB)
    assert spans(a.top_up(M)) == [(M, 2 * M)]  # b read least recently: it gives way
    assert b.runs == [] and budget.used == 2 * M
    b.cover(0, M)  # (a reader's own read is never refused)
    b.window = M
    assert spans(b.top_up(M)) == [(M, 2 * M)]  # now a gives way
    assert a.runs == [] and budget.used == 2 * M
    b.discard(0, 2 * M)
    assert budget.used == 0
