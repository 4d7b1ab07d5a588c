"""Sans-IO handshake: greeting, option haggling, STARTTLS point, LIST, INFO and GO.

Theory of operation
-------------------
The handshake is a strict ping-pong ("the client MUST NOT send any option until it has
received a final reply to any option it has sent"), so it is written as plain generators
that *yield actions* and receive their results, the way libnbd spells out one state per
step. The actions are:

* :class:`Send` — write these bytes; the generator is resumed with ``None``;
* :class:`Receive` — read exactly ``size`` bytes; it is resumed with the bytes read, which
  are shorter only when the stream ended (checked here, not in the shell);
* :class:`StartTls` — wrap the stream in TLS now; resumed with ``None``.

A thin shell (:mod:`nbdfs.connection`) runs the generator against a socket; tests run it
against scripted bytes. Nothing here imports trio, ssl or socket.

Because every read is of an exact size, the shell never reads past the end of a message:
after the server's ACK to ``NBD_OPT_STARTTLS`` no plaintext byte is buffered, so anything
a man in the middle injects there can only reach the TLS layer (which rejects it), never the
NBD parser. Everything learned before the upgrade (structured replies, meta contexts) is
forgotten by construction: those options are sent only after the TLS decision.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Generator
from dataclasses import dataclass

from . import wire
from .errors import (
    ConnectError,
    ExportNotFound,
    LocalProtocolError,
    OptionError,
    ProtocolError,
    TlsError,
)
from .session import BlockSize, Export, Listing, Session, TlsMode
from .wire import Info, Opt, Rep, TransmissionFlag

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Receive:
    size: int


@dataclass(frozen=True, slots=True)
class StartTls:
    pass


Action = Send | Receive | StartTls


@dataclass(frozen=True, slots=True)
class _Reply:
    rep: int
    data: bytes


class _Style(enum.Enum):
    OLDSTYLE = "oldstyle"
    NEWSTYLE = "newstyle"
    FIXED_NEWSTYLE = "fixed newstyle"


def _decode_name(raw: bytes, what: str) -> str:
    if len(raw) > wire.MAX_STRING:
        raise ProtocolError(f"server sent a {what} of {len(raw)} bytes (the limit is 4096)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"server sent a {what} that is not UTF-8: {raw[:64]!r}") from None
    if "\0" in text:
        raise ProtocolError(f"server sent a {what} containing NUL: {text[:64]!r}")
    return text


def _decode_text(raw: bytes) -> str:
    """Decode human-readable text (descriptions, error messages) for display only."""
    return raw[: wire.MAX_STRING].decode("utf-8", "replace").replace("\0", "")


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > wire.MAX_STRING or "\0" in name:
        raise LocalProtocolError(f"export name {name[:64]!r}… is longer than 4096 bytes or has NUL")
    return raw


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_block_size(minimum: int, preferred: int, maximum: int) -> BlockSize:
    """Validate NBD_INFO_BLOCK_SIZE as "Size constraints" requires."""
    if not _is_power_of_two(minimum) or minimum > wire.MAX_MIN_BLOCK:
        raise ProtocolError(f"server sent an invalid minimum block size {minimum}")
    if not _is_power_of_two(preferred) or preferred < max(minimum, 512):
        raise ProtocolError(f"server sent an invalid preferred block size {preferred}")
    if maximum < preferred:
        raise ProtocolError(f"server sent a maximum payload {maximum} below preferred {preferred}")
    return BlockSize(minimum, preferred, maximum)


def _go_payload(name: str, infos: tuple[Info, ...]) -> bytes:
    raw = _encode_name(name)
    return (
        wire.U32.pack(len(raw))
        + raw
        + wire.U16.pack(len(infos))
        + b"".join(wire.U16.pack(i) for i in infos)
    )


def _meta_payload(name: str, queries: list[str]) -> bytes:
    raw = _encode_name(name)
    out = [wire.U32.pack(len(raw)), raw, wire.U32.pack(len(queries))]
    for q in queries:
        qraw = q.encode("utf-8")
        out += [wire.U32.pack(len(qraw)), qraw]
    return b"".join(out)


_INFO_REQUESTS = (Info.EXPORT, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)
# Replies that may precede the final one, per option ("Option reply types").
_INTERMEDIATE: dict[Opt, frozenset[int]] = {
    Opt.LIST: frozenset({Rep.SERVER}),
    Opt.INFO: frozenset({Rep.INFO}),
    Opt.GO: frozenset({Rep.INFO}),
    Opt.SET_META_CONTEXT: frozenset({Rep.META_CONTEXT}),
    Opt.LIST_META_CONTEXT: frozenset({Rep.META_CONTEXT}),
}
_MAX_INTERMEDIATE: dict[Opt, int] = {
    Opt.LIST: wire.MAX_EXPORTS,
    Opt.INFO: 64,  # four kinds of information we ask for, and a few the server volunteers
    Opt.GO: 64,
    Opt.SET_META_CONTEXT: wire.MAX_META_CONTEXTS,
    Opt.LIST_META_CONTEXT: wire.MAX_META_CONTEXTS,
}


def _rep_name(rep: int) -> str:
    try:
        return f"NBD_REP_{Rep(rep).name}"
    except ValueError:
        return f"reply {rep:#x}"


class Handshake:
    """One client's side of one handshake. Use :meth:`go` or :meth:`list_exports` once.

    Args:
        tls: the user's TLS policy.
    """

    def __init__(self, tls: TlsMode = TlsMode.DISABLE) -> None:
        self.tls_mode = tls
        self.tls_active = False
        self.style: _Style | None = None
        self._no_zeroes = False
        self._can_abort = False  # True while haggling on a stream that is still in step

    # -- public entry points -------------------------------------------------------------

    def go(self, name: str) -> Generator[Action, bytes | None, Session]:
        """Negotiate and enter transmission on export ``name``."""
        try:
            yield from self._greet()
            if self.style is _Style.OLDSTYLE:
                return self._oldstyle_session
            if self.style is _Style.NEWSTYLE:
                return (yield from self._export_name(name, structured=False))
            yield from self._maybe_starttls()
            return (yield from self._go(name))
        except ConnectError:
            yield from self._abort()
            raise

    def list_exports(self, name: str | None = None) -> Generator[Action, bytes | None, Listing]:
        """List every export with NBD_OPT_LIST, describe each with NBD_OPT_INFO, then abort.

        With ``name``, describe just that export (servers may serve names they do not list).
        """
        try:
            yield from self._greet()
            if self.style is _Style.OLDSTYLE:
                return Listing([self._oldstyle_session.export], tls=False)
            if self.style is _Style.NEWSTYLE:
                raise OptionError(
                    "server speaks only the old (non-fixed) newstyle handshake and cannot list"
                    " its exports; name the export in an nbd:// URI instead",
                    0,
                )
            yield from self._maybe_starttls()
            if name is None:
                names = yield from self._list_names()
            else:
                names = [(name, None)]
            exports = []
            info_supported = True
            for export_name, description in names:
                export = None
                if info_supported:
                    export = yield from self._info(
                        export_name, description, strict=name is not None
                    )
                    info_supported = export is not None
                exports.append(export or Export(export_name, description=description))
            listing = Listing(exports, tls=self.tls_active)
        except ConnectError:
            yield from self._abort()
            raise
        yield from self._abort()
        return listing

    # -- steps -----------------------------------------------------------------------------

    def _greet(self) -> Generator[Action, bytes | None, None]:
        data = yield from self._recv(wire.GREETING.size, "greeting")
        passwd, magic = wire.GREETING.unpack(data)
        if passwd != wire.INIT_PASSWD:
            raise ProtocolError("this is not an NBD server (its greeting lacks NBDMAGIC)")
        if magic == wire.CLISERV_MAGIC:
            if self.tls_mode is TlsMode.REQUIRE:
                # The downgrade of CVE-2019-14842: oldstyle has no TLS at all.
                raise TlsError(
                    "server answered with the oldstyle handshake, which has no TLS; refusing"
                    " because TLS is required (possible downgrade attack)"
                )
            rest = yield from self._recv(wire.OLDSTYLE_REST.size, "oldstyle greeting")
            size, flags = wire.OLDSTYLE_REST.unpack(rest)
            self.style = _Style.OLDSTYLE
            self._oldstyle_session = Session(
                Export("", size, self._check_flags(flags & 0xFFFF)), structured_replies=False
            )
            log.info("server uses the oldstyle handshake (one unnamed export)")
            return
        if magic != wire.IHAVEOPT:
            raise ProtocolError(f"server sent an unknown handshake magic {magic:#x}")
        raw = yield from self._recv(wire.HANDSHAKE_FLAGS.size, "handshake flags")
        (hflags,) = wire.HANDSHAKE_FLAGS.unpack(raw)
        cflags = wire.ClientFlag(0)
        if hflags & wire.HandshakeFlag.FIXED_NEWSTYLE:
            cflags |= wire.ClientFlag.C_FIXED_NEWSTYLE
            self.style = _Style.FIXED_NEWSTYLE
        else:
            self.style = _Style.NEWSTYLE
            if self.tls_mode is TlsMode.REQUIRE:
                raise TlsError(
                    "server does not offer fixed newstyle negotiation, so it cannot do TLS;"
                    " refusing because TLS is required (possible downgrade attack)"
                )
        if hflags & wire.HandshakeFlag.NO_ZEROES:
            cflags |= wire.ClientFlag.C_NO_ZEROES
            self._no_zeroes = True
        yield Send(wire.CLIENT_FLAGS.pack(cflags))
        self._can_abort = self.style is _Style.FIXED_NEWSTYLE

    def _maybe_starttls(self) -> Generator[Action, bytes | None, None]:
        """STARTTLS as the very first option when TLS is wanted, so all haggling is private."""
        if self.tls_mode is TlsMode.DISABLE:
            return
        reply = yield from self._option(Opt.STARTTLS, b"")
        if reply.rep == Rep.ACK:
            self._can_abort = False  # a failed TLS handshake leaves only a hard disconnect
            yield StartTls()
            self.tls_active = True
            self._can_abort = True
            return
        why = f"{_rep_name(reply.rep)}{self._message_suffix(reply)}"
        if self.tls_mode is TlsMode.REQUIRE:
            raise TlsError(
                f"server refused TLS ({why}) but TLS is required; check that the server was"
                " started with TLS, or use --tls=allow to accept plaintext"
            )
        log.info("server refused TLS (%s); continuing without encryption", why)

    def _list_names(self) -> Generator[Action, bytes | None, list[tuple[str, str | None]]]:
        replies = yield from self._option_replies(Opt.LIST, b"")
        final = replies[-1]
        if final.rep in (Rep.ERR_UNSUP, Rep.ERR_POLICY):
            log.info(
                "server will not list exports (%s); showing the default export",
                _rep_name(final.rep),
            )
            return [("", None)]
        self._check_final(Opt.LIST, final, "")
        names: list[tuple[str, str | None]] = []
        for reply in replies[:-1]:
            if len(reply.data) < 4:
                raise ProtocolError("server sent an NBD_REP_SERVER reply shorter than 4 bytes")
            (length,) = wire.U32.unpack_from(reply.data)
            if length > len(reply.data) - 4:
                raise ProtocolError("server sent an NBD_REP_SERVER name longer than its reply")
            name = _decode_name(reply.data[4 : 4 + length], "export name")
            rest = reply.data[4 + length :]
            names.append((name, _decode_text(rest) if rest else None))
        return names

    def _info(
        self, name: str, description: str | None, strict: bool = False
    ) -> Generator[Action, bytes | None, Export | None]:
        """Describe one export; ``None`` when the server does not know NBD_OPT_INFO.

        With ``strict``, an unknown export is an error rather than a listing race.
        """
        replies = yield from self._option_replies(Opt.INFO, _go_payload(name, _INFO_REQUESTS))
        final = replies[-1]
        if final.rep == Rep.ERR_UNSUP:
            return None
        if final.rep == Rep.ERR_TLS_REQD and not self.tls_active:
            return Export(name, description=description, tls_required=True)
        if final.rep == Rep.ERR_UNKNOWN and not strict:
            log.info("export %r vanished between LIST and INFO", name)
            return Export(name, description=description)
        self._check_final(Opt.INFO, final, name)
        return self._export_from_info(name, description, replies[:-1])

    def _go(self, name: str) -> Generator[Action, bytes | None, Session]:
        structured = yield from self._structured_reply()
        contexts: dict[str, int] = {}
        if structured:
            contexts = yield from self._set_meta_context(name, [wire.META_CONTEXT_ALLOCATION])
        replies = yield from self._option_replies(Opt.GO, _go_payload(name, _INFO_REQUESTS))
        final = replies[-1]
        if final.rep == Rep.ERR_UNSUP:
            log.info("server does not know NBD_OPT_GO; falling back to NBD_OPT_EXPORT_NAME")
            return (yield from self._export_name(name, structured))
        self._check_final(Opt.GO, final, name)
        export = self._export_from_info(name, None, replies[:-1])
        self._can_abort = False
        return Session(export, structured, contexts, self.tls_active, block_size_requested=True)

    def _structured_reply(self) -> Generator[Action, bytes | None, bool]:
        reply = yield from self._option(Opt.STRUCTURED_REPLY, b"")
        if reply.rep == Rep.ACK:
            return True
        if reply.rep in (Rep.ERR_UNSUP, Rep.ERR_POLICY, Rep.ERR_INVALID, Rep.ERR_PLATFORM):
            return False
        self._check_final(Opt.STRUCTURED_REPLY, reply, "")
        raise AssertionError("unreachable")  # pragma: no cover

    def _set_meta_context(
        self, name: str, queries: list[str]
    ) -> Generator[Action, bytes | None, dict[str, int]]:
        replies = yield from self._option_replies(
            Opt.SET_META_CONTEXT, _meta_payload(name, queries)
        )
        final = replies[-1]
        if final.rep != Rep.ACK:
            if final.rep in (Rep.ERR_TLS_REQD, Rep.ERR_SHUTDOWN):
                self._check_final(Opt.SET_META_CONTEXT, final, name)
            return {}  # "MUST disregard any context replies" on error; we just go without
        contexts: dict[str, int] = {}
        for reply in replies[:-1]:
            if len(reply.data) < 4:
                raise ProtocolError("server sent an NBD_REP_META_CONTEXT shorter than 4 bytes")
            (ctx_id,) = wire.U32.unpack_from(reply.data)
            ctx = _decode_name(reply.data[4:], "metadata context name")
            if ctx not in queries:
                raise ProtocolError(f"server selected metadata context {ctx!r} we did not ask for")
            contexts[ctx] = ctx_id
        return contexts

    def _export_name(self, name: str, structured: bool) -> Generator[Action, bytes | None, Session]:
        raw = _encode_name(name)
        self._can_abort = False
        yield Send(wire.OPTION_REQUEST.pack(wire.IHAVEOPT, Opt.EXPORT_NAME, len(raw)) + raw)
        size = wire.EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else wire.EXPORT_NAME_ZEROES)
        data = yield from self._recv(size, f"reply to NBD_OPT_EXPORT_NAME {name!r}", gone=name)
        esize, flags = wire.EXPORT_NAME_REPLY.unpack_from(data)
        export = Export(name, esize, self._check_flags(flags))
        return Session(export, structured, {}, self.tls_active, block_size_requested=False)

    def _abort(self) -> Generator[Action, bytes | None, None]:
        """Soft disconnect: the only way a client may end haggling (unless it must hard-close)."""
        if self._can_abort:
            self._can_abort = False
            # "The client SHOULD gracefully handle the server closing the connection after
            # receiving an NBD_OPT_ABORT without it sending a reply": we do not wait for one.
            yield Send(wire.OPTION_REQUEST.pack(wire.IHAVEOPT, Opt.ABORT, 0))

    # -- option plumbing -----------------------------------------------------------------

    def _option(self, opt: Opt, payload: bytes) -> Generator[Action, bytes | None, _Reply]:
        replies = yield from self._option_replies(opt, payload)
        if len(replies) != 1:
            raise ProtocolError(f"server sent {_rep_name(replies[0].rep)} to {opt.name}")
        return replies[0]

    def _option_replies(
        self, opt: Opt, payload: bytes
    ) -> Generator[Action, bytes | None, list[_Reply]]:
        """Send one option and collect its replies up to and including the final one."""
        yield Send(wire.OPTION_REQUEST.pack(wire.IHAVEOPT, opt, len(payload)) + payload)
        intermediate = _INTERMEDIATE.get(opt, frozenset())
        limit = _MAX_INTERMEDIATE.get(opt, 0)
        replies: list[_Reply] = []
        while True:
            head = yield from self._recv(wire.OPTION_REPLY.size, f"reply to NBD_OPT_{opt.name}")
            magic, ropt, rep, length = wire.OPTION_REPLY.unpack(head)
            if magic != wire.OPTION_REPLY_MAGIC:
                raise ProtocolError(f"server sent a bad option reply magic {magic:#x}")
            if ropt != opt:
                raise ProtocolError(
                    f"server answered option {ropt} while we asked NBD_OPT_{opt.name}"
                )
            if length > wire.MAX_OPTION_REPLY:
                raise ProtocolError(
                    f"server sent a {length}-byte option reply (limit {wire.MAX_OPTION_REPLY})"
                )
            data = (
                (yield from self._recv(length, f"reply to NBD_OPT_{opt.name}")) if length else b""
            )
            if rep in intermediate:
                replies.append(_Reply(rep, data))
                if len(replies) > limit:
                    raise ProtocolError(
                        f"server sent more than {limit} replies to NBD_OPT_{opt.name}"
                    )
                continue
            if rep == Rep.ACK:
                if length:
                    raise ProtocolError(f"server sent NBD_REP_ACK with {length} bytes of data")
            elif not rep & wire.REP_ERROR_BIT:
                raise ProtocolError(f"server sent {_rep_name(rep)} in reply to NBD_OPT_{opt.name}")
            replies.append(_Reply(rep, data))
            return replies

    def _recv(
        self, size: int, what: str, gone: str | None = None
    ) -> Generator[Action, bytes | None, bytes]:
        data = yield Receive(size)
        assert data is not None
        if len(data) != size:
            if gone is not None:
                # NBD_OPT_EXPORT_NAME cannot fail politely: the server hangs up instead.
                raise ExportNotFound(
                    f"server closed the connection when asked for export {gone!r}: it has no such"
                    " export, or requires TLS for it"
                )
            raise ProtocolError(f"server closed the connection during the {what}")
        return data

    @staticmethod
    def _message_suffix(reply: _Reply) -> str:
        return f": {_decode_text(reply.data)}" if reply.data else ""

    def _check_final(self, opt: Opt, reply: _Reply, name: str) -> None:
        """Turn a final error reply into the right exception; return on NBD_REP_ACK."""
        if reply.rep == Rep.ACK:
            return
        msg = _decode_text(reply.data) if reply.data else ""
        if reply.rep == Rep.ERR_UNKNOWN:
            raise ExportNotFound(
                f"server has no export named {name!r}; run 'nbdfs list' to see its exports"
                + (f" (server says: {msg})" if msg else "")
            )
        if reply.rep == Rep.ERR_TLS_REQD:
            if self.tls_active:
                raise ProtocolError("server sent NBD_REP_ERR_TLS_REQD although TLS is active")
            if self.tls_mode is TlsMode.DISABLE:
                raise TlsError(
                    (f"server requires TLS for export {name!r}" if name else "server requires TLS")
                    + "; use --tls=require (or an nbds:// URI) with --tls-certificates DIR"
                )
            raise TlsError("server requires TLS but refused NBD_OPT_STARTTLS")
        if reply.rep == Rep.ERR_SHUTDOWN:
            raise OptionError("server is shutting down; try again later", reply.rep, msg)
        if reply.rep == Rep.ERR_BLOCK_SIZE_REQD and opt in (Opt.INFO, Opt.GO):
            raise ProtocolError("server demanded NBD_INFO_BLOCK_SIZE although we requested it")
        what = f"NBD_OPT_{opt.name}" + (f" for export {name!r}" if name else "")
        raise OptionError(f"server refused {what} with {_rep_name(reply.rep)}", reply.rep, msg)

    @staticmethod
    def _check_flags(flags: int) -> TransmissionFlag:
        if not flags & TransmissionFlag.HAS_FLAGS:
            raise ProtocolError(f"server sent transmission flags {flags:#x} without HAS_FLAGS")
        return TransmissionFlag(flags)

    def _export_from_info(
        self, name: str, description: str | None, replies: list[_Reply]
    ) -> Export:
        size: int | None = None
        flags = TransmissionFlag(0)
        block: BlockSize | None = None
        for reply in replies:
            data = reply.data
            if len(data) < 2:
                raise ProtocolError("server sent an NBD_REP_INFO shorter than 2 bytes")
            (kind,) = wire.U16.unpack_from(data)
            if kind == Info.EXPORT:
                if len(data) != wire.INFO_EXPORT.size:
                    raise ProtocolError(
                        f"server sent NBD_INFO_EXPORT of length {len(data)}, not 12"
                    )
                _, size, raw_flags = wire.INFO_EXPORT.unpack(data)
                flags = self._check_flags(raw_flags)
            elif kind == Info.NAME:
                _decode_name(data[2:], "canonical export name")  # validated, not used
            elif kind == Info.DESCRIPTION:
                description = _decode_text(data[2:]) or description
            elif kind == Info.BLOCK_SIZE:
                if len(data) != wire.INFO_BLOCK_SIZE.size:
                    raise ProtocolError(
                        f"server sent NBD_INFO_BLOCK_SIZE of length {len(data)}, not 14"
                    )
                _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(data)
                block = parse_block_size(minimum, preferred, maximum)
            # Unknown information types MUST be ignored.
        if size is None:
            raise ProtocolError(f"server accepted export {name!r} without sending NBD_INFO_EXPORT")
        return Export(name, size, flags, description, block)
