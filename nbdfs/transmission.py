"""Sans-IO transmission phase: request encoder, reply parser, cookie bookkeeping.

Theory of operation
-------------------
:class:`Transmission` is fed the server's bytes (:meth:`~Transmission.receive_data`) and
yields one :class:`Reply` per finished request (:meth:`~Transmission.next_event`), in the
order the server finished them. It knows every request in flight by cookie, so it can check
every reply before it is used:

* magic, cookie, reply kind (simple or structured, as negotiated) and chunk type;
* every length *before* its payload is buffered (bounded memory: the largest thing ever
  buffered is one chunk whose size the request itself bounds);
* content chunks lie inside their request and never overlap; a successful read is fully
  covered; block-status chunks name a negotiated context, one per context.

Any violation raises :class:`~nbdfs.errors.ProtocolError`, after which the stream is out
of step and the connection must be dropped. Requests are checked against what the export
advertised (:class:`~nbdfs.errors.LocalProtocolError`): we never send a command or flag the
server did not offer, never cross the export's end, and honour its block sizes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from . import wire
from .errors import LocalProtocolError, ProtocolError
from .session import Geometry, Session
from .wire import Cmd, CmdFlag, ReplyType, TransmissionFlag

# Commands that carry an offset and length and so obey the export's size and alignment.
_RANGED = frozenset({Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS})
_NEEDS_WRITABLE = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_NEEDS_FLAG = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TransmissionFlag.SEND_CACHE,
}
_FLAG_NEEDS = {
    CmdFlag.FUA: TransmissionFlag.SEND_FUA,
    CmdFlag.DF: TransmissionFlag.SEND_DF,
    CmdFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
}
_FLAG_COMMANDS = {
    CmdFlag.FUA: frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES}),
    CmdFlag.NO_HOLE: frozenset({Cmd.WRITE_ZEROES}),
    CmdFlag.DF: frozenset({Cmd.READ}),
    CmdFlag.REQ_ONE: frozenset({Cmd.BLOCK_STATUS}),
    CmdFlag.FAST_ZERO: frozenset({Cmd.WRITE_ZEROES}),
}
# Error chunks carry a string (at most 4096 bytes) and maybe an offset; an unknown error
# chunk type may carry a little more, but nothing that needs more than this.
_MAX_ERROR_CHUNK = wire.ERROR_HEAD.size + wire.MAX_STRING + 64
# A hostile server could describe a read in one-byte chunks; this bounds the bookkeeping.
_MAX_CHUNKS_SLACK = 1024
# Enum members as module names: a class attribute of an Enum costs ~0.15 us to look up, and
# the reply path looks up several per request.
_READ, _WRITE, _BLOCK_STATUS = Cmd.READ, Cmd.WRITE, Cmd.BLOCK_STATUS
_OFFSET_DATA = ReplyType.OFFSET_DATA


@dataclass(slots=True)
class Reply:
    """The outcome of one request (read-only by convention: frozen, it cost ~1 us more).

    ``error`` is 0 on success, else an NBD error value (see :func:`nbdfs.errors.to_errno`).
    ``data`` is the bytes read (for READ); ``extents`` maps a metadata context name to its
    ``(length, flags)`` descriptors (for BLOCK_STATUS).
    """

    cookie: int
    error: int = 0
    message: str = ""
    data: bytearray | None = None
    extents: dict[str, list[tuple[int, int]]] | None = None


@dataclass(slots=True)
class _Sink:
    """A read payload being copied straight from the socket into its request's buffer."""

    cookie: int
    done: bool  # the chunk ends the reply (a simple reply always does)
    view: memoryview  # where the payload goes
    filled: int = 0


@dataclass(slots=True)
class _Pending:
    cmd: Cmd
    flags: CmdFlag
    offset: int
    length: int
    buf: bytearray | None = None
    starts: list[int] = field(default_factory=list)  # sorted starts of content chunks
    ends: list[int] = field(default_factory=list)  # their ends, same order
    covered: int = 0
    structured: bool = False  # saw a structured chunk (a simple reply is then invalid)
    error: int = 0
    message: str = ""
    extents: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def buffer(self) -> bytearray:
        """A read's buffer, zeroed (a hole reads as zeroes), made on first use."""
        if self.buf is None:
            self.buf = bytearray(self.length)
        return self.buf


class Transmission:
    """The client side of one connection's transmission phase."""

    def __init__(self, session: Session) -> None:
        export = session.export
        assert export.size is not None
        self.size = export.size
        self.flags = export.flags
        self.structured = session.structured_replies
        self._contexts = {ctx_id: name for name, ctx_id in session.meta_contexts.items()}
        self.geometry = Geometry.of(session)
        self.minimum, self.maximum = self.geometry.minimum, self.geometry.maximum
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        # Received bytes not yet parsed: our own bytearray, or (between receive_data() and
        # the next_event() that returns None) the caller's buffer itself, parsed in place.
        self._buf: bytearray | memoryview = bytearray()
        self._borrowed = False
        self._pos = 0
        self._head: tuple[int, int, int, int, int] | None = None  # parsed header awaiting payload
        self._sink: _Sink | None = None
        self.closed = False
        self._allowed = frozenset(cmd for cmd in Cmd if self.can(cmd))

    # -- requests ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def can(self, cmd: Cmd) -> bool:
        """Whether the export allows ``cmd`` at all."""
        if cmd in _NEEDS_WRITABLE and self.flags & TransmissionFlag.READ_ONLY:
            return False
        if cmd == Cmd.BLOCK_STATUS:
            return bool(self._contexts)
        needed = _NEEDS_FLAG.get(cmd)
        return needed is None or bool(self.flags & needed)

    def request(
        self,
        cmd: Cmd,
        offset: int = 0,
        length: int = 0,
        flags: CmdFlag = CmdFlag(0),
        data: bytes | bytearray | memoryview | None = None,
        into: bytearray | None = None,
    ) -> tuple[int, bytes]:
        """Encode one request; return its cookie and the header to send (before ``data``).

        ``into``: for READ, a zeroed buffer of ``length`` bytes to receive into (default: a
        new one, made by :meth:`prepare` or when the reply comes).

        Raises:
            LocalProtocolError: the export does not allow this request.
        """
        if self.closed:
            raise LocalProtocolError("connection is disconnecting; no more requests")
        if cmd not in self._allowed:
            raise LocalProtocolError(f"export does not allow NBD_CMD_{cmd.name}")
        if flags:  # (enum arithmetic is slow: plain reads and writes skip it)
            for flag, needed in _FLAG_NEEDS.items():
                if flags & flag and not self.flags & needed:
                    raise LocalProtocolError(f"export does not allow NBD_CMD_FLAG_{flag.name}")
            for flag, commands in _FLAG_COMMANDS.items():
                if flags & flag and cmd not in commands:
                    raise LocalProtocolError(f"NBD_CMD_FLAG_{flag.name} is not valid on {cmd.name}")
        if cmd in _RANGED:
            if offset < 0 or length <= 0 or offset + length > self.size:
                raise LocalProtocolError(
                    f"{cmd.name} of {length} bytes at {offset} is outside the export (size {self.size})"
                )
            if offset % self.minimum or length % self.minimum:
                raise LocalProtocolError(
                    f"{cmd.name} at {offset}+{length} is not aligned to the minimum block {self.minimum}"
                )
            if cmd in (_READ, _WRITE) and length > self.maximum:
                raise LocalProtocolError(
                    f"{cmd.name} of {length} bytes exceeds the maximum payload {self.maximum}"
                )
        elif offset or length:
            raise LocalProtocolError(f"NBD_CMD_{cmd.name} takes no offset or length")
        if cmd == _WRITE:
            if data is None or len(data) != length:
                raise LocalProtocolError("WRITE payload does not match its length")
        elif data is not None:
            raise LocalProtocolError(f"NBD_CMD_{cmd.name} takes no payload")
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        if cookie in self._pending:  # after 2^64 requests; keep it correct anyway
            raise LocalProtocolError("cookie space exhausted")
        pending = _Pending(cmd, flags, offset, length)
        if cmd == _READ:
            if into is not None and len(into) != length:
                raise LocalProtocolError("READ buffer does not match its length")
            pending.buf = into
        self._pending[cookie] = pending
        return cookie, wire.REQUEST.pack(wire.REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def prepare(self, cookie: int) -> None:
        """Make a read's buffer now, if it has none yet and no reply finished it: called
        once the request is sent, so that the memory (new to the process while a cache
        grows: page faults) is made while the server works, not after its reply came."""
        pending = self._pending.get(cookie)
        if pending is not None and pending.cmd == _READ:
            pending.buffer()

    def disconnect(self) -> bytes:
        """Encode NBD_CMD_DISC; no request may follow, and it gets no reply."""
        self.closed = True
        return wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0)

    # -- replies -----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the server.

        ``data`` is parsed in place where possible: its buffer may be reused once
        :meth:`next_event` has returned ``None``, not before.
        """
        sink = self._sink
        if sink is not None and sink.filled < len(sink.view):
            # The bulk of a read goes straight where it belongs, without a stop in _buf.
            n = min(len(data), len(sink.view) - sink.filled)
            sink.view[sink.filled : sink.filled + n] = memoryview(data)[:n]
            sink.filled += n
            if n == len(data):
                return
            data = memoryview(data)[n:]
        if self._pos == len(self._buf):
            # Nothing left over: parse the caller's bytes where they are (no copy).
            self._buf = memoryview(data)
            self._borrowed = True
            self._pos = 0
            return
        self._own()
        assert isinstance(self._buf, bytearray)
        if self._pos > 1 << 20 and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def _own(self) -> None:
        """Copy what is left of a borrowed buffer into our own."""
        if self._borrowed:
            self._buf = bytearray(self._buf[self._pos :])
            self._borrowed = False
            self._pos = 0

    def sink_space(self) -> memoryview | None:
        """Where the read payload being received still goes, so a caller can receive into
        it directly (then report the count with :meth:`sink_received`); None if no payload
        is being received."""
        sink = self._sink
        if sink is None or sink.filled >= len(sink.view):
            return None
        return sink.view[sink.filled :]

    def sink_received(self, n: int) -> None:
        """``n`` bytes were received straight into :meth:`sink_space`."""
        sink = self._sink
        assert sink is not None and 0 <= n <= len(sink.view) - sink.filled
        sink.filled += n

    def pending_bytes(self) -> int:
        """How many received bytes are not yet parsed (for tests and truncation checks)."""
        return len(self._buf) - self._pos

    def next_event(self) -> Reply | None:
        """Return the next finished request's reply, or ``None`` if more bytes are needed."""
        while True:
            if self._sink is not None:
                sink = self._sink
                if sink.filled < len(sink.view):
                    self._own()
                    return None
                self._sink = None
                sink.view.release()
                if sink.done:
                    return self._finish(sink.cookie, self._pending[sink.cookie])
                continue
            if self._head is None:
                if self._whole_read():
                    continue
                if not self._parse_header():
                    self._own()
                    return None
            assert self._head is not None
            kind, flags, rtype, cookie, length = self._head
            if length and (kind == 0 or rtype == _OFFSET_DATA):
                if not self._start_sink(kind, flags, cookie, length):
                    self._own()
                    return None
                continue
            if self.pending_bytes() < length:
                self._own()
                return None
            payload = memoryview(self._buf)[self._pos : self._pos + length]
            try:
                self._head = None
                reply = self._apply(kind, flags, rtype, cookie, payload)
            finally:
                payload.release()
                self._pos += length
            if reply is not None:
                return reply

    def _whole_read(self) -> bool:
        """Take the usual reply in one step: a structured OFFSET_DATA chunk that ends the
        reply and holds all of its READ's data, at its offset (what nbdkit and qemu-nbd
        send for a read without holes). Its data then goes into the read's buffer as
        :meth:`_start_sink` would send it; every check the general path makes (chunk
        length, range, overlap, coverage) holds by the test here. False for anything else,
        which :meth:`_parse_header` parses and checks."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < wire.STRUCTURED_REPLY_OFFSET.size or not self.structured:
            return False
        magic, flags, rtype, cookie, length, offset = wire.STRUCTURED_REPLY_OFFSET.unpack_from(
            buf, pos
        )
        p = self._pending.get(cookie)
        if (
            p is None
            or magic != wire.STRUCTURED_REPLY_MAGIC
            or flags != wire.REPLY_FLAG_DONE
            or rtype != _OFFSET_DATA
            or p.cmd != _READ
            or p.structured
            or offset != p.offset
            or length != p.length + 8
        ):
            return False
        self._pos = pos + wire.STRUCTURED_REPLY_OFFSET.size
        p.structured = True
        p.covered = p.length
        self._sink_into(cookie, True, memoryview(p.buffer()))
        return True

    def _start_sink(self, kind: int, flags: int, cookie: int, length: int) -> bool:
        """Begin copying a read payload into its buffer; False until its offset is here."""
        pending = self._pending[cookie]
        if kind == 0:  # a simple reply to READ: the whole request's data
            pending.covered = pending.length
            dest = memoryview(pending.buffer())
            done = True
        else:
            if self.pending_bytes() < 8:
                return False
            (offset,) = wire.U64.unpack_from(self._buf, self._pos)
            self._pos += 8
            pending.structured = True
            size = length - 8
            self._content(pending, offset, size)
            start = offset - pending.offset
            dest = memoryview(pending.buffer())[start : start + size]
            done = bool(flags & wire.REPLY_FLAG_DONE)
        self._head = None
        self._sink_into(cookie, done, dest)
        return True

    def _sink_into(self, cookie: int, done: bool, dest: memoryview) -> None:
        """Copy what is here of a read payload to ``dest``; the rest follows it there."""
        take = min(self.pending_bytes(), len(dest))
        with memoryview(self._buf) as buf:
            dest[:take] = buf[self._pos : self._pos + take]
        self._pos += take
        self._sink = _Sink(cookie, done, dest, take)

    def _parse_header(self) -> bool:
        avail = self.pending_bytes()
        if avail < 4:
            return False
        (magic,) = wire.U32.unpack_from(self._buf, self._pos)
        if magic == wire.SIMPLE_REPLY_MAGIC:
            if avail < wire.SIMPLE_REPLY.size:
                return False
            _, error, cookie = wire.SIMPLE_REPLY.unpack_from(self._buf, self._pos)
            self._pos += wire.SIMPLE_REPLY.size
            pending = self._lookup(cookie)
            if pending.structured:
                raise ProtocolError(f"server mixed a simple reply into structured reply {cookie}")
            length = 0
            if pending.cmd == Cmd.READ:
                if self.structured:
                    raise ProtocolError(
                        "server sent a simple reply to READ after structured replies"
                    )
                length = 0 if error else pending.length
            elif pending.cmd == Cmd.BLOCK_STATUS and not error:
                raise ProtocolError("server answered BLOCK_STATUS with a simple reply")
            self._head = (0, error, 0, cookie, length)
            return True
        if magic == wire.STRUCTURED_REPLY_MAGIC:
            if avail < wire.STRUCTURED_REPLY.size:
                return False
            _, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack_from(
                self._buf, self._pos
            )
            self._pos += wire.STRUCTURED_REPLY.size
            if not self.structured:
                raise ProtocolError("server sent a structured reply that was not negotiated")
            pending = self._lookup(cookie)
            self._check_chunk_length(pending, rtype, length, flags)
            self._head = (1, flags, rtype, cookie, length)
            return True
        raise ProtocolError(f"server sent a reply with bad magic {magic:#010x}")

    def _lookup(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolError(f"server replied to cookie {cookie}, which is not in flight")
        return pending

    def _check_chunk_length(self, p: _Pending, rtype: int, length: int, flags: int) -> None:
        if rtype == ReplyType.NONE:
            ok = length == 0 and bool(flags & wire.REPLY_FLAG_DONE)
        elif rtype == ReplyType.OFFSET_DATA:
            ok = p.cmd == Cmd.READ and 9 <= length <= p.length + 8
        elif rtype == ReplyType.OFFSET_HOLE:
            ok = p.cmd == Cmd.READ and length == wire.OFFSET_HOLE.size
        elif rtype == ReplyType.BLOCK_STATUS:
            ok = (
                p.cmd == Cmd.BLOCK_STATUS
                and length >= 12
                and (length - 4) % 8 == 0
                and length <= 4 + 8 * wire.MAX_EXTENTS
            )
        elif rtype == ReplyType.ERROR:
            ok = wire.ERROR_HEAD.size <= length <= _MAX_ERROR_CHUNK
        elif rtype == ReplyType.ERROR_OFFSET:
            ok = wire.ERROR_HEAD.size + 8 <= length <= _MAX_ERROR_CHUNK
        elif rtype & wire.REPLY_TYPE_ERROR_BIT:
            ok = wire.ERROR_HEAD.size <= length <= _MAX_ERROR_CHUNK
        else:
            raise ProtocolError(f"server sent unknown structured reply type {rtype}")
        if not ok:  # (the name only now: building it cost ~0.7 us per chunk)
            raise ProtocolError(
                f"server sent a {_type_name(rtype)} chunk of length {length} to {p.cmd.name}"
            )

    def _apply(
        self, kind: int, flags: int, rtype: int, cookie: int, payload: memoryview
    ) -> Reply | None:
        pending = self._pending[cookie]
        if kind == 0:  # simple reply without payload; ``flags`` holds the error
            pending.error = flags
            return self._finish(cookie, pending)
        pending.structured = True
        # (OFFSET_DATA payloads never get here: _start_sink streams them.)
        if rtype == ReplyType.OFFSET_HOLE:
            offset, size = wire.OFFSET_HOLE.unpack_from(payload)
            if size == 0:
                raise ProtocolError("server sent an OFFSET_HOLE chunk of size 0")
            self._content(pending, offset, size)
        elif rtype == ReplyType.BLOCK_STATUS:
            self._block_status(pending, payload)
        elif rtype & wire.REPLY_TYPE_ERROR_BIT:
            self._error_chunk(pending, rtype, payload)
        if flags & wire.REPLY_FLAG_DONE:
            return self._finish(cookie, pending)
        return None

    def _content(self, p: _Pending, offset: int, size: int) -> None:
        """Check and record a content chunk's range (its bytes are copied by the caller)."""
        start = offset - p.offset
        if offset < p.offset or start + size > p.length:
            raise ProtocolError(
                f"server sent read data at {offset}+{size} outside the request {p.offset}+{p.length}"
            )
        i = bisect.bisect_left(p.starts, start)
        if (i < len(p.starts) and p.starts[i] < start + size) or (i and p.ends[i - 1] > start):
            raise ProtocolError(f"server sent overlapping read data at {offset}+{size}")
        if len(p.starts) > p.length // 512 + _MAX_CHUNKS_SLACK:
            raise ProtocolError("server split a read into too many chunks")
        p.starts.insert(i, start)
        p.ends.insert(i, start + size)
        p.covered += size
        # A hole reads as zeroes, and the buffer starts zeroed.

    def _block_status(self, p: _Pending, payload: memoryview) -> None:
        (ctx_id,) = wire.U32.unpack_from(payload)
        name = self._contexts.get(ctx_id)
        if name is None:
            raise ProtocolError(f"server sent block status for unknown context id {ctx_id}")
        if name in p.extents:
            raise ProtocolError(f"server sent two block status chunks for {name}")
        extents = [(length, fl) for length, fl in wire.EXTENT.iter_unpack(payload[4:])]
        total = 0
        for i, (length, _) in enumerate(extents):
            if length == 0:
                raise ProtocolError("server sent a block status extent of length 0")
            if i < len(extents) - 1:
                total += length
        if p.flags & CmdFlag.REQ_ONE:
            if len(extents) != 1 or extents[0][0] > p.length:
                raise ProtocolError("server broke NBD_CMD_FLAG_REQ_ONE in block status")
        elif total >= p.length:
            raise ProtocolError("server sent block status extents beyond the request")
        p.extents[name] = extents

    def _error_chunk(self, p: _Pending, rtype: int, payload: memoryview) -> None:
        error, msg_len = wire.ERROR_HEAD.unpack_from(payload)
        if error == 0:
            raise ProtocolError("server sent an error chunk with error value 0")
        rest = len(payload) - wire.ERROR_HEAD.size
        if msg_len > rest or msg_len > wire.MAX_STRING:
            raise ProtocolError("server sent an error message longer than its chunk")
        message = bytes(payload[wire.ERROR_HEAD.size : wire.ERROR_HEAD.size + msg_len])
        if rtype == ReplyType.ERROR_OFFSET:
            if rest - msg_len != 8:
                raise ProtocolError("server sent a malformed ERROR_OFFSET chunk")
            (offset,) = wire.U64.unpack_from(payload, wire.ERROR_HEAD.size + msg_len)
            if not p.offset <= offset < p.offset + p.length:
                raise ProtocolError(f"server sent an error offset {offset} outside the request")
        if not p.error:
            p.error = error
            p.message = message.decode("utf-8", "replace")

    def _finish(self, cookie: int, p: _Pending) -> Reply:
        del self._pending[cookie]
        if p.error:
            return Reply(cookie, p.error, p.message)
        if p.cmd == _READ and p.covered != p.length:
            raise ProtocolError(
                f"server ended a read with {p.length - p.covered} of {p.length} bytes missing"
            )
        if p.cmd == _BLOCK_STATUS:
            if len(p.extents) != len(self._contexts):
                raise ProtocolError("server ended block status without one chunk per context")
            return Reply(cookie, extents=p.extents)
        return Reply(cookie, data=p.buffer() if p.cmd == _READ else None)


def _type_name(rtype: int) -> str:
    try:
        return ReplyType(rtype).name
    except ValueError:
        return f"type {rtype:#x}"
