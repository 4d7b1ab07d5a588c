"""Property tests: arbitrary or mutated server bytes only ever raise nbdfs's own errors."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdfs.errors import NbdError
from nbdfs.handshake import Handshake
from nbdfs.session import Export, Session, TlsMode
from nbdfs.transmission import Transmission
from nbdfs.wire import Cmd, CmdFlag, ReplyType, TransmissionFlag

from . import wirebuild as wb

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GOOD_HANDSHAKE = wb.greeting() + wb.go_ok(1 << 20)
GOOD_LIST = (
    wb.greeting()
    + wb.server("a", "desc")
    + wb.server("b")
    + wb.rep(3, 1)
    + wb.info_export(6, 10)
    + wb.info_block(6, 512, 4096, 1 << 20)
    + wb.rep(6, 1)
    + wb.info_export(6, 20)
    + wb.rep(6, 1)
)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6)


def _run_handshake(data: bytes, which: str) -> None:
    hs = Handshake(TlsMode.ALLOW)
    steps = hs.go("d") if which == "go" else hs.list_exports()
    try:
        wb.Script(data).run(steps)
    except NbdError:
        pass


@SETTINGS
@given(st.binary(max_size=600), st.sampled_from(["go", "list"]))
def test_arbitrary_bytes_into_handshake(data: bytes, which: str) -> None:
    _run_handshake(data, which)


@SETTINGS
@given(edits, st.integers(0, len(GOOD_LIST)))
def test_mutated_list_conversation(e: list[tuple[int, int]], cut: int) -> None:
    _run_handshake(_mutate(GOOD_LIST, e)[: cut or None], "list")


@SETTINGS
@given(edits)
def test_mutated_go_conversation(e: list[tuple[int, int]]) -> None:
    _run_handshake(_mutate(GOOD_HANDSHAKE, e), "go")


def _transmission(structured: bool) -> tuple[Transmission, list[int]]:
    flags = TransmissionFlag(0x0FFD)
    session = Session(
        Export("d", 1 << 16, flags), structured, {"base:allocation": 1} if structured else {}
    )
    t = Transmission(session)
    cookies = [
        t.request(Cmd.READ, 0, 4096)[0],
        t.request(Cmd.WRITE, 0, 4, data=b"abcd")[0],
        t.request(Cmd.BLOCK_STATUS, 0, 8192)[0] if structured else t.request(Cmd.FLUSH)[0],
        t.request(Cmd.TRIM, 512, 512, CmdFlag.FUA)[0],
    ]
    return t, cookies


def _drain(t: Transmission, data: bytes, step: int) -> None:
    try:
        for i in range(0, len(data), step):
            t.receive_data(data[i : i + step])
            while t.next_event() is not None:
                pass
    except NbdError:
        pass


@SETTINGS
@given(st.binary(max_size=2000), st.booleans(), st.integers(1, 64))
def test_arbitrary_bytes_into_transmission(data: bytes, structured: bool, step: int) -> None:
    t, _ = _transmission(structured)
    _drain(t, data, step)


@SETTINGS
@given(edits, st.integers(1, 64))
def test_mutated_structured_replies(e: list[tuple[int, int]], step: int) -> None:
    t, (read, write, status, trim) = _transmission(True)
    good = (
        wb.chunk(read, ReplyType.OFFSET_DATA, (0).to_bytes(8, "big") + bytes(1000))
        + wb.chunk(
            read,
            ReplyType.OFFSET_HOLE,
            (1000).to_bytes(8, "big") + (3096).to_bytes(4, "big"),
            done=True,
        )
        + wb.simple(write)
        + wb.chunk(
            status,
            ReplyType.BLOCK_STATUS,
            bytes([0, 0, 0, 1, 0, 0, 0x20, 0, 0, 0, 0, 3]),
            done=True,
        )
        + wb.chunk(trim, ReplyType.ERROR, bytes([0, 0, 0, 5, 0, 2]) + b"no", done=True)
    )
    _drain(t, _mutate(good, e), step)
