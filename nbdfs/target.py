"""TARGET parsing: ``HOST``, ``HOST:PORT``, ``[IPV6]:PORT`` or an NBD URI (doc/uri.md)."""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

from .errors import TargetError
from .session import TlsMode
from .wire import DEFAULT_PORT

_SCHEMES = {
    "nbd": (False, False),  # (tls required, unix socket)
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}
# Query parameters we understand (uri.md and libnbd's); others are diagnosed, "x-" ignored.
_KNOWN_QUERY = {
    "socket",
    "tls-certificates",
    "tls-verify-peer",
    "tls-hostname",
    "tls-type",
    "tls-psk-file",
    "tls-username",
}


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect and what the TARGET itself says about TLS and the export."""

    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None  # Unix domain socket path (a leading NUL: abstract namespace)
    export: str | None = None  # None: no export named (list or mount them all)
    tls: TlsMode | None = None  # None: the TARGET does not say (plain HOST[:PORT])
    tls_certificates: str | None = None
    tls_verify_peer: bool | None = None
    tls_hostname: str | None = None
    tls_username: str | None = None
    tls_psk_file: str | None = None

    @property
    def tls_server_name(self) -> str | None:
        """The name to check the server's certificate against."""
        return self.tls_hostname or self.host

    def describe(self) -> str:
        if self.socket is not None:
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(text: str) -> Target:
    """Parse a TARGET as the user wrote it.

    Raises:
        TargetError: with a message that shows the accepted forms.
    """
    if "://" in text:
        return _parse_uri(text)
    return _parse_host_port(text)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise TargetError(f"bad port {text!r} in {whole!r}: give a number from 1 to 65535")
    return int(text)


def _parse_host_port(text: str) -> Target:
    hint = "give HOST, HOST:PORT, [IPV6]:PORT or an nbd:// URI"
    if not text:
        raise TargetError(f"empty TARGET: {hint}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise TargetError(f"bad TARGET {text!r}: {hint}")
        _check_ipv6(host, text)
        return Target(host=host, port=_port(rest[1:], text) if rest else DEFAULT_PORT)
    if text.count(":") > 1:  # a bare IPv6 address, without a port
        _check_ipv6(text, text)
        return Target(host=text)
    host, sep, port = text.partition(":")
    if not host or "/" in host or " " in host:
        raise TargetError(f"bad TARGET {text!r}: {hint}")
    return Target(host=host, port=_port(port, text) if sep else DEFAULT_PORT)


def _check_ipv6(host: str, whole: str) -> None:
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        raise TargetError(f"bad IPv6 address {host!r} in {whole!r}") from None


def _bool_param(name: str, value: str) -> bool:
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise TargetError(f"URI parameter {name}={value!r} must be 0 or 1")


def _parse_uri(text: str) -> Target:
    try:
        uri = urllib.parse.urlsplit(text)
        port_text = uri.netloc.rpartition("@")[2]
        port = uri.port
    except ValueError as exc:
        raise TargetError(f"bad NBD URI {text!r}: {exc}") from None
    scheme = uri.scheme.lower()
    if scheme not in _SCHEMES:
        raise TargetError(
            f"unknown URI scheme {uri.scheme!r} in {text!r}: use nbd://, nbds://, nbd+unix:// or nbds+unix://"
        )
    tls_required, unix = _SCHEMES[scheme]
    if uri.fragment:
        raise TargetError(f"NBD URI {text!r} must not have a #fragment")
    try:
        query = urllib.parse.parse_qs(
            uri.query, keep_blank_values=True, strict_parsing=bool(uri.query)
        )
    except ValueError:
        raise TargetError(f"bad query string in NBD URI {text!r}") from None
    params: dict[str, str] = {}
    for key, values in query.items():
        if key.startswith("x-"):
            continue
        if key not in _KNOWN_QUERY:
            raise TargetError(
                f"unknown NBD URI parameter {key!r}; known: {', '.join(sorted(_KNOWN_QUERY))}"
            )
        if len(values) != 1:
            raise TargetError(f"NBD URI parameter {key!r} is given more than once")
        params[key] = values[0]
    # The path, less its leading "/", is the export name, percent-decoded (uri.md).
    # A URI with no path at all (nbd://host) names the server, not one export: `list` and
    # `mount` then take every export, while a single connection uses the default ("").
    path = uri.path
    try:
        export = urllib.parse.unquote(path[1:], errors="strict") if path else None
    except UnicodeDecodeError:
        raise TargetError(f"export name in {text!r} is not UTF-8 after percent-decoding") from None
    if export is not None and "\0" in export:
        raise TargetError("export names cannot contain NUL")
    tls_type = params.get("tls-type")
    if tls_type is not None and tls_type not in ("x509", "psk", "anon"):
        raise TargetError(f"tls-type={tls_type!r}: use x509 or psk")
    common = dict(
        export=export,
        tls=TlsMode.REQUIRE if tls_required else TlsMode.DISABLE,
        tls_certificates=params.get("tls-certificates"),
        tls_verify_peer=_bool_param("tls-verify-peer", params["tls-verify-peer"])
        if "tls-verify-peer" in params
        else None,
        tls_hostname=params.get("tls-hostname"),
        tls_username=urllib.parse.unquote(uri.username)
        if uri.username
        else params.get("tls-username"),
        tls_psk_file=params.get("tls-psk-file"),
    )
    if unix:
        if uri.netloc:
            raise TargetError(
                f"{scheme}:// takes no host ({uri.netloc!r}); use {scheme}:///EXPORT?socket=PATH"
            )
        sock = params.get("socket")
        if not sock:
            raise TargetError(
                f"{scheme}:// needs ?socket=PATH, e.g. {scheme}:///?socket=/run/nbd.sock"
            )
        return Target(socket=sock, **common)  # type: ignore[arg-type]
    if "socket" in params:
        raise TargetError(f"?socket= belongs to nbd+unix:// URIs, not {scheme}://")
    host = uri.hostname
    if not host:
        raise TargetError(f"NBD URI {text!r} has no host; write {scheme}://HOST[:PORT]/EXPORT")
    if port_text.startswith("[") and ":" in host:
        _check_ipv6(host, text)
    return Target(host=host, port=port or DEFAULT_PORT, **common)  # type: ignore[arg-type]
