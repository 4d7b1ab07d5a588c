"""TARGET parsing: host forms and NBD URIs exactly as doc/uri.md defines them."""

from __future__ import annotations

import pytest

from nbdfs.errors import TargetError
from nbdfs.session import TlsMode
from nbdfs.target import Target, parse_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost", Target(host="localhost")),
        ("nas:10810", Target(host="nas", port=10810)),
        ("[::1]:10811", Target(host="::1", port=10811)),
        ("[fe80::1%eth0]", Target(host="fe80::1%eth0")),
        ("::1", Target(host="::1")),
        ("10.0.0.1:1", Target(host="10.0.0.1", port=1)),
    ],
)
def test_host_forms(text: str, expected: Target) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    ("uri", "export"),
    [  # the table of uri.md, plus "no path" which names the whole server
        ("nbd://example.com/disk", "disk"),
        ("nbd://example.com/", ""),
        ("nbd://example.com", None),
        ("nbd://example.com//disk", "/disk"),
        ("nbd://example.com/hello%20world", "hello world"),
        ("nbd://example.com/a/b", "a/b"),
        ("nbd://example.com/%C3%BC", "ü"),
    ],
)
def test_uri_export_names(uri: str, export: str | None) -> None:
    t = parse_target(uri)
    assert (t.host, t.port, t.export, t.tls) == ("example.com", 10809, export, TlsMode.DISABLE)


def test_nbds_requires_tls_and_keeps_parameters() -> None:
    t = parse_target(
        "nbds://[::1]:9999/x?tls-certificates=/etc/pki/nbd&tls-verify-peer=0&tls-hostname=nas"
    )
    assert t == Target(
        host="::1",
        port=9999,
        export="x",
        tls=TlsMode.REQUIRE,
        tls_certificates="/etc/pki/nbd",
        tls_verify_peer=False,
        tls_hostname="nas",
    )
    assert t.tls_server_name == "nas"


def test_unix_uris() -> None:
    t = parse_target("nbd+unix:///disk?socket=/run/nbd.sock")
    assert (t.socket, t.export, t.host, t.tls) == ("/run/nbd.sock", "disk", None, TlsMode.DISABLE)
    t = parse_target("nbds+unix:///?socket=%00/abstract")
    assert (t.socket, t.export, t.tls) == ("\0/abstract", "", TlsMode.REQUIRE)


def test_userinfo_is_the_tls_username() -> None:
    assert parse_target("nbds://alice@nas/x").tls_username == "alice"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty TARGET"),
        ("host:0", "bad port"),
        ("host:99999", "bad port"),
        ("host:abc", "bad port"),
        ("[::1", "bad TARGET"),
        ("[nothex]:1", "bad IPv6"),
        ("http://x/", "unknown URI scheme"),
        ("nbd:///x", "has no host"),
        ("nbd+unix:///x", "needs \\?socket="),
        ("nbd+unix://host/x?socket=/s", "takes no host"),
        ("nbd://h/x?socket=/s", "belongs to nbd\\+unix"),
        ("nbd://h/x?colour=red", "unknown NBD URI parameter 'colour'"),
        ("nbd://h/x?tls-verify-peer=maybe", "must be 0 or 1"),
        ("nbd://h/x#frag", "fragment"),
        ("nbd://h/%ff", "not UTF-8"),
        ("nbd://h/a%00b", "NUL"),
        ("nbd://h:99999/", "bad NBD URI"),
    ],
)
def test_bad_targets(text: str, match: str) -> None:
    with pytest.raises(TargetError, match=match):
        parse_target(text)


def test_experimental_parameters_are_ignored() -> None:
    assert parse_target("nbd://h/x?x-foo=1").export == "x"
