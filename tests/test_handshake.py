"""The sans-IO handshake against scripted server bytes: no sockets, no trio."""

from __future__ import annotations

import pytest

from nbdfs import wire
from nbdfs.errors import ExportNotFound, OptionError, ProtocolError, TlsError
from nbdfs.handshake import Handshake
from nbdfs.session import BlockSize, TlsMode
from nbdfs.wire import Opt, Rep

from .wirebuild import (
    FLAGS,
    Script,
    go_ok,
    greeting,
    info_block,
    info_export,
    oldstyle,
    rep,
    server,
)


def test_go_negotiates_structured_replies_meta_context_and_block_size() -> None:
    s = Script(greeting() + go_ok(1 << 20))
    session = s.run(Handshake().go("disk"))
    assert session.export.size == 1 << 20
    assert session.export.flags == FLAGS
    assert session.structured_replies
    assert session.meta_contexts == {"base:allocation": 7}
    assert s.options() == [Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.GO]
    # Client flags: fixed newstyle and no zeroes, as the server offered both.
    assert s.sent[0] == wire.CLIENT_FLAGS.pack(3)
    # GO asks for EXPORT, NAME, DESCRIPTION and BLOCK_SIZE, each once.
    go = s.sent[-1]
    assert go[-2 - 8 : -8] == wire.U16.pack(4)
    assert s.pos == len(s.data)


def test_go_with_block_size() -> None:
    data = greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP)
    data += (
        info_block(Opt.GO, 512, 4096, 1 << 20) + info_export(Opt.GO, 4096) + rep(Opt.GO, Rep.ACK)
    )
    session = Script(data).run(Handshake().go(""))
    assert session.export.block_size == BlockSize(512, 4096, 1 << 20)
    assert not session.structured_replies and session.meta_contexts == {}
    assert session.block_size_requested


def test_go_unsupported_falls_back_to_export_name_without_zeroes() -> None:
    data = greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP) + rep(Opt.GO, Rep.ERR_UNSUP)
    data += wire.EXPORT_NAME_REPLY.pack(12345, 1)
    s = Script(data)
    session = s.run(Handshake().go("x"))
    assert session.export.size == 12345
    assert s.options()[-1] == Opt.EXPORT_NAME
    assert not session.block_size_requested


def test_export_name_reads_the_124_zeroes_when_no_zeroes_was_not_offered() -> None:
    data = greeting(flags=1) + rep(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP) + rep(Opt.GO, Rep.ERR_UNSUP)
    data += wire.EXPORT_NAME_REPLY.pack(7, 1) + bytes(124)
    s = Script(data)
    assert s.run(Handshake().go("x")).export.size == 7
    assert s.sent[0] == wire.CLIENT_FLAGS.pack(1)
    assert s.pos == len(data)


def test_export_name_hangup_means_no_such_export() -> None:
    data = greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP) + rep(Opt.GO, Rep.ERR_UNSUP)
    with pytest.raises(ExportNotFound, match="no such export"):
        Script(data).run(Handshake().go("x"))


def test_unknown_export_is_reported_and_session_soft_disconnected() -> None:
    data = greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK) + rep(Opt.SET_META_CONTEXT, Rep.ACK)
    data += rep(Opt.GO, Rep.ERR_UNKNOWN, b"nope")
    s = Script(data)
    with pytest.raises(ExportNotFound, match=r"no export named 'x'.*nope"):
        s.run(Handshake().go("x"))
    assert s.options()[-1] == Opt.ABORT


def test_list_then_info_each_then_abort() -> None:
    data = greeting() + server("a", "first disk") + server("b c") + rep(Opt.LIST, Rep.ACK)
    data += info_export(Opt.INFO, 100) + rep(Opt.INFO, Rep.ACK)
    data += info_export(Opt.INFO, 200, FLAGS | wire.TransmissionFlag.READ_ONLY) + rep(
        Opt.INFO, Rep.ACK
    )
    s = Script(data)
    listing = s.run(Handshake().list_exports())
    assert [(e.name, e.size, e.read_only, e.description) for e in listing.exports] == [
        ("a", 100, False, "first disk"),
        ("b c", 200, True, None),
    ]
    assert s.options() == [Opt.LIST, Opt.INFO, Opt.INFO, Opt.ABORT]


def test_list_refused_shows_default_export() -> None:
    data = (
        greeting()
        + rep(Opt.LIST, Rep.ERR_POLICY)
        + info_export(Opt.INFO, 5)
        + rep(Opt.INFO, Rep.ACK)
    )
    listing = Script(data).run(Handshake().list_exports())
    assert [(e.name, e.size) for e in listing.exports] == [("", 5)]


def test_list_without_info_support_lists_names_only() -> None:
    data = (
        greeting()
        + server("a")
        + server("b")
        + rep(Opt.LIST, Rep.ACK)
        + rep(Opt.INFO, Rep.ERR_UNSUP)
    )
    s = Script(data)
    listing = s.run(Handshake().list_exports())
    assert [(e.name, e.size) for e in listing.exports] == [("a", None), ("b", None)]
    assert s.options() == [Opt.LIST, Opt.INFO, Opt.ABORT]  # INFO is not asked again


def test_oldstyle_is_supported_without_tls() -> None:
    session = Script(oldstyle(4096)).run(Handshake().go(""))
    assert session.export.size == 4096


def test_oldstyle_refused_when_tls_required() -> None:
    """CVE-2019-14842: a server (or MitM) answering oldstyle must not downgrade us."""
    s = Script(oldstyle(4096))
    with pytest.raises(TlsError, match="oldstyle"):
        s.run(Handshake(TlsMode.REQUIRE).go(""))
    assert s.sent == []


def test_non_fixed_newstyle_refused_when_tls_required() -> None:
    s = Script(greeting(flags=0))
    with pytest.raises(TlsError, match="fixed newstyle"):
        s.run(Handshake(TlsMode.REQUIRE).go(""))
    assert s.sent == []


def test_starttls_is_the_first_option_and_state_is_renegotiated_after() -> None:
    data = greeting() + rep(Opt.STARTTLS, Rep.ACK) + go_ok(10)
    s = Script(data)
    session = s.run(Handshake(TlsMode.REQUIRE).go("d"))
    assert s.options() == [Opt.STARTTLS, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.GO]
    assert s.tls_started == 1 and session.tls


@pytest.mark.parametrize(
    "refusal", [Rep.ERR_POLICY, Rep.ERR_UNSUP, Rep.ERR_INVALID, Rep.ERR_PLATFORM]
)
def test_require_never_continues_in_plaintext(refusal: Rep) -> None:
    s = Script(greeting() + rep(Opt.STARTTLS, refusal))
    with pytest.raises(TlsError, match="refused TLS"):
        s.run(Handshake(TlsMode.REQUIRE).go("d"))
    assert s.options() == [Opt.STARTTLS, Opt.ABORT]
    assert s.tls_started == 0


def test_allow_continues_in_plaintext_after_refusal() -> None:
    s = Script(greeting() + rep(Opt.STARTTLS, Rep.ERR_POLICY) + go_ok(10))
    session = s.run(Handshake(TlsMode.ALLOW).go("d"))
    assert not session.tls and s.tls_started == 0


def test_tls_required_by_server_with_tls_disabled() -> None:
    data = greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ERR_TLS_REQD)
    s = Script(data)
    with pytest.raises(TlsError, match=r"requires TLS.*--tls=require"):
        s.run(Handshake().go("d"))
    assert s.options()[-1] == Opt.ABORT


def test_tls_reqd_after_tls_is_a_protocol_error() -> None:
    data = greeting() + rep(Opt.STARTTLS, Rep.ACK) + rep(Opt.STRUCTURED_REPLY, Rep.ERR_TLS_REQD)
    with pytest.raises(ProtocolError):
        Script(data).run(Handshake(TlsMode.REQUIRE).go("d"))


def test_selective_tls_export_listed_as_tls_required() -> None:
    data = greeting() + server("open") + server("secret") + rep(Opt.LIST, Rep.ACK)
    data += info_export(Opt.INFO, 1) + rep(Opt.INFO, Rep.ACK) + rep(Opt.INFO, Rep.ERR_TLS_REQD)
    listing = Script(data).run(Handshake().list_exports())
    assert [(e.name, e.tls_required) for e in listing.exports] == [
        ("open", False),
        ("secret", True),
    ]


def test_shutdown_during_haggling_aborts() -> None:
    s = Script(greeting() + rep(Opt.LIST, Rep.ERR_SHUTDOWN))
    with pytest.raises(OptionError, match="shutting down"):
        s.run(Handshake().list_exports())
    assert s.options()[-1] == Opt.ABORT


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an NBD server"),
        (wire.GREETING.pack(wire.INIT_PASSWD, 42), "unknown handshake magic"),
        (greeting() + rep(Opt.GO, Rep.ACK), "answered option 7 while we asked NBD_OPT_LIST"),
        (greeting() + wire.OPTION_REPLY.pack(1, Opt.LIST, Rep.ACK, 0), "bad option reply magic"),
        (greeting() + rep(Opt.LIST, Rep.ACK, b"x"), "ACK with 1 bytes"),
        (greeting() + rep(Opt.LIST, Rep.INFO, b"xx"), "NBD_REP_INFO in reply to NBD_OPT_LIST"),
        (greeting() + rep(Opt.LIST, Rep.SERVER, b"\0\0\0\x09abc"), "longer than its reply"),
        (greeting() + rep(Opt.LIST, Rep.SERVER, b"\0\0\0\x02\xff\xfe"), "not UTF-8"),
        (greeting() + rep(Opt.LIST, Rep.SERVER, b"\0\0\0\x02a\0"), "NUL"),
        (
            greeting()
            + wire.OPTION_REPLY.pack(wire.OPTION_REPLY_MAGIC, Opt.LIST, Rep.SERVER, 1 << 30),
            "option reply",
        ),
    ],
)
def test_bad_list_replies_are_protocol_errors(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        Script(data + rep(Opt.LIST, Rep.ACK)).run(Handshake().list_exports())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (rep(Opt.INFO, Rep.ACK), "without sending NBD_INFO_EXPORT"),
        (info_export(Opt.INFO, 1, 0) + rep(Opt.INFO, Rep.ACK), "HAS_FLAGS"),
        (info_block(Opt.INFO, 3, 4096, 1 << 20), "minimum block"),
        (info_block(Opt.INFO, 1 << 17, 1 << 17, 1 << 20), "minimum block"),
        (info_block(Opt.INFO, 512, 256, 1 << 20), "preferred block"),
        (info_block(Opt.INFO, 512, 4096, 1024), "maximum payload"),
        (rep(Opt.INFO, Rep.INFO, b"\0\0" + bytes(3)), "length 5, not 12"),
        (rep(Opt.INFO, Rep.INFO, b"\0"), "shorter than 2"),
        (rep(Opt.INFO, Rep.SERVER, b"\0\0\0\0"), "NBD_REP_SERVER in reply to NBD_OPT_INFO"),
        (rep(Opt.INFO, Rep.ERR_BLOCK_SIZE_REQD), "demanded NBD_INFO_BLOCK_SIZE"),
    ],
)
def test_bad_info_replies_are_protocol_errors(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        Script(greeting() + data + rep(Opt.INFO, Rep.ACK)).run(Handshake().list_exports("x"))


def test_too_many_list_replies_are_refused_with_bounded_memory() -> None:
    one = server("x")
    data = greeting() + one * (wire.MAX_EXPORTS + 1)
    with pytest.raises(ProtocolError, match="more than"):
        Script(data).run(Handshake().list_exports())


def test_every_truncation_of_a_good_conversation_is_a_clean_error() -> None:
    whole = greeting() + rep(Opt.STARTTLS, Rep.ERR_POLICY) + go_ok(1 << 20)
    Script(whole).run(Handshake(TlsMode.ALLOW).go("d"))  # the whole is fine
    for cut in range(len(whole)):
        with pytest.raises(ProtocolError, match="closed the connection"):
            Script(whole[:cut]).run(Handshake(TlsMode.ALLOW).go("d"))
