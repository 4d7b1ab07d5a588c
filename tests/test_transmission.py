"""The sans-IO transmission core: requests checked against the export, replies parsed strictly.

Every reply parser is fed whole, one byte at a time, and followed by trailing bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nbdfs import wire
from nbdfs.errors import LocalProtocolError, ProtocolError
from nbdfs.session import BlockSize, Export, Session
from nbdfs.transmission import Reply, Transmission
from nbdfs.wire import Cmd, CmdFlag, ReplyType, TransmissionFlag

from .wirebuild import chunk, simple

ALL = TransmissionFlag(0x0FFD) & ~TransmissionFlag.READ_ONLY


def core(
    size: int = 1 << 20,
    flags: TransmissionFlag = ALL,
    structured: bool = True,
    block: BlockSize | None = None,
) -> Transmission:
    ctx = {"base:allocation": 3} if structured else {}
    return Transmission(
        Session(Export("d", size, flags, None, block), structured, ctx, block_size_requested=True)
    )


def feed_all(t: Transmission, data: bytes, mode: str) -> list[Reply]:
    """Feed ``data`` whole, bytewise, or as the connection's reader does ("reader"): through
    one small reused buffer, scribbled over after each drain, and straight into the buffer
    of a read whenever the core offers it."""
    out: list[Reply] = []
    if mode == "reader":
        scratch = bytearray(7)
        pos = 0
        while pos < len(data):
            space = t.sink_space()
            if space is not None:
                n = min(len(space), 5, len(data) - pos)
                space[:n] = data[pos : pos + n]
                t.sink_received(n)
            else:
                n = min(len(scratch), len(data) - pos)
                scratch[:n] = data[pos : pos + n]
                t.receive_data(memoryview(scratch)[:n])
            pos += n
            while (r := t.next_event()) is not None:
                out.append(r)
            scratch[:] = b"\xee" * len(scratch)  # the reader reuses its buffer
        return out
    pieces = [data] if mode == "whole" else [data[i : i + 1] for i in range(len(data))]
    for piece in pieces:
        t.receive_data(piece)
        while (r := t.next_event()) is not None:
            out.append(r)
    return out


MODES = ["whole", "bytewise", "reader"]


@pytest.mark.parametrize("mode", MODES)
def test_simple_read_reply(mode: str) -> None:
    t = core(structured=False)
    cookie, header = t.request(Cmd.READ, 512, 4)
    assert wire.REQUEST.unpack(header) == (wire.REQUEST_MAGIC, 0, Cmd.READ, cookie, 512, 4)
    (reply,) = feed_all(t, simple(cookie, 0, b"abcd"), mode)
    assert reply.data == bytearray(b"abcd") and reply.error == 0
    assert t.in_flight == 0


@pytest.mark.parametrize("mode", MODES)
def test_structured_read_in_chunks_out_of_order_with_hole(mode: str) -> None:
    t = core()
    cookie, _ = t.request(Cmd.READ, 1000, 10)
    data = chunk(cookie, ReplyType.OFFSET_DATA, wire.U64.pack(1006) + b"WXYZ")
    data += chunk(cookie, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(1003, 3))
    data += chunk(cookie, ReplyType.OFFSET_DATA, wire.U64.pack(1000) + b"abc")
    data += chunk(cookie, ReplyType.NONE, done=True)
    (reply,) = feed_all(t, data, mode)
    assert reply.data == bytearray(b"abc\0\0\0WXYZ")


@pytest.mark.parametrize("mode", MODES)
def test_a_read_buffer_is_made_when_prepared_or_when_the_reply_needs_it(mode: str) -> None:
    """Connection.request prepares a read's buffer once the request is sent (the memory
    made while the server works); a reply that comes first, or is all holes, makes it."""
    t = core()
    prepared, _ = t.request(Cmd.READ, 0, 4)
    t.prepare(prepared)
    holes, _ = t.request(Cmd.READ, 512, 6)
    data = chunk(holes, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(512, 6), done=True)
    data += chunk(prepared, ReplyType.OFFSET_DATA, wire.U64.pack(0) + b"abcd", done=True)
    first, second = feed_all(t, data, mode)
    assert (first.cookie, first.data) == (holes, bytearray(6))
    assert (second.cookie, second.data) == (prepared, bytearray(b"abcd"))
    t.prepare(prepared)  # (after its reply: nothing to do)
    write, _ = t.request(Cmd.WRITE, 0, 2, data=b"hi")
    t.prepare(write)  # (not a read: nothing to make)
    (reply,) = feed_all(t, simple(write), mode)
    assert reply.data is None


@pytest.mark.parametrize("mode", MODES)
def test_replies_are_matched_by_cookie_in_any_order(mode: str) -> None:
    t = core(structured=False)
    c1, _ = t.request(Cmd.WRITE, 0, 3, data=b"xyz")
    c2, _ = t.request(Cmd.FLUSH)
    c3, _ = t.request(Cmd.READ, 0, 2)
    replies = feed_all(t, simple(c3, 0, b"hi") + simple(c2) + simple(c1, 5), mode)
    assert [(r.cookie, r.error) for r in replies] == [(c3, 0), (c2, 0), (c1, 5)]


@pytest.mark.parametrize("mode", MODES)
def test_structured_error_with_message(mode: str) -> None:
    t = core()
    cookie, _ = t.request(Cmd.READ, 0, 4096)
    payload = wire.ERROR_HEAD.pack(5, 4) + b"oops" + wire.U64.pack(100)
    (reply,) = feed_all(t, chunk(cookie, ReplyType.ERROR_OFFSET, payload, done=True), mode)
    assert (reply.error, reply.message) == (5, "oops")


@pytest.mark.parametrize("mode", MODES)
def test_block_status(mode: str) -> None:
    t = core()
    cookie, _ = t.request(Cmd.BLOCK_STATUS, 0, 8192)
    payload = wire.U32.pack(3) + wire.EXTENT.pack(4096, 3) + wire.EXTENT.pack(8192, 0)
    (reply,) = feed_all(t, chunk(cookie, ReplyType.BLOCK_STATUS, payload, done=True), mode)
    assert reply.extents == {"base:allocation": [(4096, 3), (8192, 0)]}


def test_trailing_bytes_stay_buffered_for_the_next_reply() -> None:
    t = core(structured=False)
    c1, _ = t.request(Cmd.FLUSH)
    c2, _ = t.request(Cmd.FLUSH)
    second = simple(c2)
    t.receive_data(simple(c1) + second[:5])
    assert t.next_event() == Reply(c1, data=None)
    assert t.next_event() is None and t.pending_bytes() == 5
    t.receive_data(second[5:])
    assert t.next_event() == Reply(c2, data=None)


def _read(t: Transmission) -> int:
    return t.request(Cmd.READ, 4096, 8)[0]


BAD: list[tuple[str, Callable[[int], bytes], str]] = [
    ("magic", lambda c: b"\xde\xad\xbe\xef" + bytes(12), "bad magic"),
    ("cookie", lambda c: chunk(c + 99, ReplyType.NONE, done=True), "not in flight"),
    ("simple read", lambda c: simple(c, 0, bytes(8)), "simple reply to READ"),
    (
        "outside",
        lambda c: chunk(c, ReplyType.OFFSET_DATA, wire.U64.pack(4100) + bytes(8)),
        "outside",
    ),
    (
        "before",
        lambda c: chunk(c, ReplyType.OFFSET_DATA, wire.U64.pack(4095) + bytes(2)),
        "outside",
    ),
    (
        "too long",
        lambda c: chunk(c, ReplyType.OFFSET_DATA, wire.U64.pack(4096) + bytes(9)),
        "length 17",
    ),
    (
        "overlap",
        lambda c: (
            chunk(c, ReplyType.OFFSET_DATA, wire.U64.pack(4096) + bytes(4))
            + chunk(c, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(4099, 2))
        ),
        "overlapping",
    ),
    # A chunk shaped like the usual whole reply (Transmission._whole_read), but not one:
    (
        "whole, at the wrong offset",
        lambda c: chunk(c, ReplyType.OFFSET_DATA, wire.U64.pack(4100) + bytes(8), done=True),
        "outside",
    ),
    (
        "whole, after a hole",
        lambda c: (
            chunk(c, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(4096, 2))
            + chunk(c, ReplyType.OFFSET_DATA, wire.U64.pack(4096) + bytes(8), done=True)
        ),
        "overlapping",
    ),
    (
        "short",
        lambda c: chunk(c, ReplyType.OFFSET_DATA, wire.U64.pack(4096) + bytes(4), done=True),
        "missing",
    ),
    ("hole 0", lambda c: chunk(c, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(4096, 0)), "size 0"),
    ("none not done", lambda c: chunk(c, ReplyType.NONE), "NONE chunk"),
    ("none payload", lambda c: chunk(c, ReplyType.NONE, b"x", done=True), "NONE chunk"),
    ("unknown type", lambda c: chunk(c, 77, b""), "unknown structured reply type"),
    ("status to read", lambda c: chunk(c, ReplyType.BLOCK_STATUS, bytes(12)), "BLOCK_STATUS chunk"),
    (
        "error 0",
        lambda c: chunk(c, ReplyType.ERROR, wire.ERROR_HEAD.pack(0, 0), done=True),
        "error value 0",
    ),
    (
        "msg too long",
        lambda c: chunk(c, ReplyType.ERROR, wire.ERROR_HEAD.pack(5, 9) + b"ab"),
        "longer than",
    ),
    (
        "error offset outside",
        lambda c: chunk(c, ReplyType.ERROR_OFFSET, wire.ERROR_HEAD.pack(5, 0) + wire.U64.pack(1)),
        "outside the request",
    ),
]


@pytest.mark.parametrize(("name", "build", "match"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("mode", MODES)
def test_bad_replies_are_protocol_errors(
    name: str, build: Callable[[int], bytes], match: str, mode: str
) -> None:
    t = core()
    cookie = _read(t)
    with pytest.raises(ProtocolError, match=match):
        feed_all(t, build(cookie) + chunk(cookie, ReplyType.NONE, done=True), mode)


def test_oversized_chunk_is_refused_before_its_payload_is_buffered() -> None:
    t = core()
    cookie = _read(t)
    head = wire.STRUCTURED_REPLY.pack(
        wire.STRUCTURED_REPLY_MAGIC, 0, ReplyType.OFFSET_DATA, cookie, 1 << 31
    )
    t.receive_data(head)
    with pytest.raises(ProtocolError, match="length"):
        t.next_event()


def test_structured_reply_not_negotiated() -> None:
    t = core(structured=False)
    cookie, _ = t.request(Cmd.FLUSH)
    with pytest.raises(ProtocolError, match="not negotiated"):
        feed_all(t, chunk(cookie, ReplyType.NONE, done=True), "whole")


def test_unknown_error_chunk_type_errors_the_request_only() -> None:
    t = core()
    cookie, _ = t.request(Cmd.FLUSH)
    (reply,) = feed_all(
        t, chunk(cookie, 0x8000 + 77, wire.ERROR_HEAD.pack(22, 0), done=True), "whole"
    )
    assert reply.error == 22


def test_block_status_checks() -> None:
    t = core()
    cookie, _ = t.request(Cmd.BLOCK_STATUS, 0, 4096, CmdFlag.REQ_ONE)
    two = wire.U32.pack(3) + wire.EXTENT.pack(512, 0) + wire.EXTENT.pack(512, 0)
    with pytest.raises(ProtocolError, match="REQ_ONE"):
        feed_all(t, chunk(cookie, ReplyType.BLOCK_STATUS, two, done=True), "whole")
    t = core()
    cookie, _ = t.request(Cmd.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError, match="unknown context"):
        feed_all(
            t,
            chunk(cookie, ReplyType.BLOCK_STATUS, wire.U32.pack(9) + wire.EXTENT.pack(1, 0)),
            "whole",
        )
    t = core()
    cookie, _ = t.request(Cmd.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError, match="one chunk per context"):
        feed_all(t, chunk(cookie, ReplyType.NONE, done=True), "whole")


@pytest.mark.parametrize(
    ("flags", "args", "match"),
    [
        (
            ALL | TransmissionFlag.READ_ONLY,
            (Cmd.WRITE, 0, 1, CmdFlag(0), b"x"),
            "does not allow NBD_CMD_WRITE",
        ),
        (ALL & ~TransmissionFlag.SEND_FLUSH, (Cmd.FLUSH,), "FLUSH"),
        (ALL & ~TransmissionFlag.SEND_TRIM, (Cmd.TRIM, 0, 1), "TRIM"),
        (ALL & ~TransmissionFlag.SEND_WRITE_ZEROES, (Cmd.WRITE_ZEROES, 0, 1), "WRITE_ZEROES"),
        (ALL & ~TransmissionFlag.SEND_CACHE, (Cmd.CACHE, 0, 1), "CACHE"),
        (ALL & ~TransmissionFlag.SEND_FUA, (Cmd.WRITE, 0, 1, CmdFlag.FUA, b"x"), "FUA"),
        (ALL, (Cmd.READ, 0, 1, CmdFlag.NO_HOLE), "not valid on READ"),
        (ALL, (Cmd.READ, (1 << 20) - 1, 2), "outside the export"),
        (ALL, (Cmd.READ, 0, 0), "outside the export"),
        (ALL, (Cmd.READ, 0, (1 << 25) + 1), "outside"),
        (ALL, (Cmd.WRITE, 0, 2, CmdFlag(0), b"x"), "payload does not match"),
        (ALL, (Cmd.FLUSH, 0, 1), "takes no offset"),
    ],
)
def test_requests_the_export_did_not_advertise_are_refused(
    flags: TransmissionFlag, args: tuple[object, ...], match: str
) -> None:
    t = core(flags=flags)
    with pytest.raises(LocalProtocolError, match=match):
        t.request(*args)  # type: ignore[arg-type]
    assert t.in_flight == 0


def test_block_size_constraints_are_honoured() -> None:
    t = core(block=BlockSize(4096, 4096, 1 << 16))
    with pytest.raises(LocalProtocolError, match="aligned"):
        t.request(Cmd.READ, 512, 4096)
    with pytest.raises(LocalProtocolError, match="maximum payload"):
        t.request(Cmd.READ, 0, 1 << 17)
    t.request(Cmd.READ, 4096, 1 << 16)


def test_block_status_needs_a_context() -> None:
    t = core(structured=False)
    with pytest.raises(LocalProtocolError, match="BLOCK_STATUS"):
        t.request(Cmd.BLOCK_STATUS, 0, 1)


def test_disconnect_ends_requests() -> None:
    t = core()
    assert wire.REQUEST.unpack(t.disconnect())[2] == Cmd.DISC
    with pytest.raises(LocalProtocolError):
        t.request(Cmd.FLUSH)
