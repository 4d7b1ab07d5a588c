"""The extents map alone: what it answers, what changes make it forget, its bound."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbdfs.extents import MAX_INTERVALS, Extents


def test_it_answers_what_block_status_said_until_a_change_touches_it() -> None:
    e = Extents()
    e.add(0, [(100, False), (50, True), (10, False)], e.generation)
    assert e.find(0) == (100, False) and e.find(120) == (150, True) and e.find(155) == (160, False)
    assert e.find(160) is None
    e.forget(110, 120)  # a write into the hole
    assert e.find(115) is None and e.find(105) == (110, True) and e.find(125) == (150, True)


def test_a_reply_asked_before_a_change_is_not_kept() -> None:
    e = Extents()
    asked = e.generation
    e.forget(0, 10)  # a write started (or ended) while the request was in flight
    e.add(0, [(100, True)], asked)
    assert e.find(5) is None and len(e) == 0


def test_it_is_bounded() -> None:
    e = Extents()
    e.add(0, [(1, i % 2 == 0) for i in range(MAX_INTERVALS + 1)], e.generation)
    assert len(e) == 0


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 200), st.integers(1, 50), st.booleans()),
        max_size=30,
    )
)
def test_against_a_model(steps: list[tuple[bool, int, int, bool]]) -> None:
    e = Extents()
    model: dict[int, bool] = {}  # byte -> hole, for the bytes known
    for is_add, start, length, hole in steps:
        if is_add:
            e.add(start, [(length, hole)], e.generation)
            model.update(dict.fromkeys(range(start, start + length), hole))
        else:
            e.forget(start, start + length)
            for b in range(start, start + length):
                model.pop(b, None)
    for b in range(0, 260):
        found = e.find(b)
        if b in model:
            assert found is not None and found[1] == model[b] and found[0] > b
        else:
            assert found is None
