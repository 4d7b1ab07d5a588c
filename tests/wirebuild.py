"""Build server-side NBD messages for the pure protocol tests."""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

from nbdfs import wire
from nbdfs.handshake import Action, Receive, Send, StartTls
from nbdfs.wire import Info, Opt, Rep, TransmissionFlag

T = TypeVar("T")
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA


def greeting(flags: int = 3) -> bytes:
    return wire.GREETING.pack(wire.INIT_PASSWD, wire.IHAVEOPT) + wire.U16.pack(flags)


def oldstyle(size: int, flags: int = 1) -> bytes:
    return wire.GREETING.pack(wire.INIT_PASSWD, wire.CLISERV_MAGIC) + wire.OLDSTYLE_REST.pack(
        size, flags
    )


def rep(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return wire.OPTION_REPLY.pack(wire.OPTION_REPLY_MAGIC, opt, rtype, len(data)) + data


def server(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return rep(Opt.LIST, Rep.SERVER, wire.U32.pack(len(raw)) + raw + description.encode())


def info_export(opt: int, size: int, flags: int = FLAGS) -> bytes:
    return rep(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, size, flags))


def info_block(opt: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return rep(
        opt, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)
    )


def meta(ctx_id: int, name: str = "base:allocation") -> bytes:
    return rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, wire.U32.pack(ctx_id) + name.encode())


def go_ok(size: int, flags: int = FLAGS) -> bytes:
    """A whole successful GO sequence after the greeting: SR ack, meta context, GO ack."""
    return (
        rep(Opt.STRUCTURED_REPLY, Rep.ACK)
        + meta(7)
        + rep(Opt.SET_META_CONTEXT, Rep.ACK)
        + info_export(Opt.GO, size, flags)
        + rep(Opt.GO, Rep.ACK)
    )


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, rtype: int, payload: bytes = b"", done: bool = False) -> bytes:
    head = wire.STRUCTURED_REPLY.pack(
        wire.STRUCTURED_REPLY_MAGIC,
        wire.REPLY_FLAG_DONE if done else 0,
        rtype,
        cookie,
        len(payload),
    )
    return head + payload


class Script:
    """Run a handshake generator against fixed server bytes, recording what it sends."""

    def __init__(self, server_bytes: bytes, tls_ok: bool = True) -> None:
        self.data = server_bytes
        self.pos = 0
        self.sent: list[bytes] = []
        self.tls_started = 0
        self.tls_ok = tls_ok

    def run(self, steps: Generator[Action, bytes | None, T]) -> T:
        value: bytes | None = None
        while True:
            try:
                action = steps.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value = None
            if isinstance(action, Send):
                self.sent.append(action.data)
            elif isinstance(action, Receive):
                value = self.data[self.pos : self.pos + action.size]
                self.pos += len(value)
            else:
                assert isinstance(action, StartTls)
                self.tls_started += 1

    def options(self) -> list[int]:
        """The option codes the client sent, in order."""
        out = []
        for msg in self.sent:
            if len(msg) >= 16 and wire.U64.unpack_from(msg)[0] == wire.IHAVEOPT:
                out.append(wire.U32.unpack_from(msg, 8)[0])
        return out
