"""TLS settings and the client ``ssl.SSLContext`` built from them.

The certificate directory has the layout nbdkit, qemu and libnbd use: ``ca-cert.pem`` (the
CA that signed the server), and optionally ``client-cert.pem`` + ``client-key.pem`` for
servers that demand a client certificate. Without a directory the system trust store is
used. TLS 1.2 is the minimum ("TLS versions").
"""

from __future__ import annotations

import getpass
import logging
import os
import ssl
import sys
from dataclasses import dataclass, field

from .errors import TlsError
from .session import TlsMode

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TlsConfig:
    mode: TlsMode = TlsMode.DISABLE
    certificates: str | None = None
    verify_peer: bool = True
    psk_file: str | None = None  # "username:hexkey" lines, as nbdkit and qemu read them
    username: str | None = None  # which line of psk_file; default: the local user name
    _context: ssl.SSLContext | None = field(default=None, repr=False)
    # The last TLS session per server, so pooled and re-established connections resume it.
    sessions: dict[str, ssl.SSLSession] = field(default_factory=dict, repr=False)

    def context(self) -> ssl.SSLContext:
        """The client context, built once and shared by every connection."""
        if self._context is None:
            self._context = client_context(self.certificates, self.verify_peer)
            if self.psk_file is not None:
                _use_psk(self._context, self.psk_file, self.username)
        return self._context

    @property
    def has_client_certificate(self) -> bool:
        d = self.certificates
        return d is not None and all(
            os.path.exists(os.path.join(d, f)) for f in ("client-cert.pem", "client-key.pem")
        )


def client_context(certificates: str | None, verify_peer: bool) -> ssl.SSLContext:
    """Build a client context from a certificate directory (or the system trust store).

    Raises:
        TlsError: the directory or its files cannot be used.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A hang-up without close_notify is a broken stream, never a clean end (a truncation
    # must not pass for one). Some Pythons set this option by default (Debian's 3.11.2
    # does, pyenv's 3.11.7 does not); it turns OpenSSL's unexpected EOF into a quiet end.
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    try:
        if certificates is not None:
            if not os.path.isdir(certificates):
                raise TlsError(f"TLS certificate directory {certificates!r} does not exist")
            ca = os.path.join(certificates, "ca-cert.pem")
            if os.path.exists(ca):
                ctx.load_verify_locations(ca)
            elif verify_peer:
                raise TlsError(
                    f"{ca} is missing: put the CA that signed the server's certificate there"
                    " (nbdfs tls-init DIR makes one), or use --no-tls-verify-peer for a test"
                )
            cert = os.path.join(certificates, "client-cert.pem")
            key = os.path.join(certificates, "client-key.pem")
            if os.path.exists(cert) and os.path.exists(key):
                ctx.load_cert_chain(cert, key)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load TLS files from {certificates!r}: {exc}") from None
    if not verify_peer:
        log.warning("NOT verifying the server's TLS certificate: anyone can impersonate it")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def read_psk(path: str, username: str | None) -> tuple[str, bytes]:
    """The identity and key for ``username`` from a ``username:hexkey`` file."""
    user = username or getpass.getuser()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TlsError(f"cannot read the PSK file {path}: {exc.strerror}") from None
    for line in lines:
        name, sep, key = line.strip().partition(":")
        if sep and name == user:
            try:
                return name, bytes.fromhex(key)
            except ValueError:
                raise TlsError(f"the PSK for {name!r} in {path} is not hexadecimal") from None
    raise TlsError(f"{path} has no key for user {user!r}; set tls-username or --tls-username")


def _use_psk(ctx: ssl.SSLContext, path: str, username: str | None) -> None:
    """TLS-PSK via the ssl API of Python 3.13+ (3.11's ssl has none).

    Certificate checking stays on: if the server declines the PSK and offers a certificate
    instead, that certificate must still verify, so a declined PSK never silently becomes
    an unauthenticated session.
    """
    identity, key = read_psk(path, username)
    setter = getattr(ctx, "set_psk_client_callback", None)
    if setter is None:
        raise TlsError(
            f"TLS-PSK needs Python 3.13 or newer (this is {sys.version.split()[0]}); use X.509"
            " certificates (nbdfs tls-init) instead"
        )
    setter(lambda hint: (identity, key))


def describe_ssl_error(exc: BaseException) -> str:
    """A one-line explanation of a failed TLS handshake, with what to do next."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        hint = {
            "certificate has expired": "renew the server's certificate",
            "self-signed certificate": "pass the CA with --tls-certificates DIR",
            "unable to get local issuer certificate": "pass the CA that signed it with --tls-certificates DIR",
        }.get(reason, "")
        if "Hostname mismatch" in reason or "IP address mismatch" in reason:
            hint = "connect by a name the certificate lists, or set tls-hostname"
        return f"server's TLS certificate is not trusted: {reason}" + (f"; {hint}" if hint else "")
    text = str(exc)
    if "CERTIFICATE_REQUIRED" in text or "certificate required" in text:
        return "server demands a client certificate: put client-cert.pem and client-key.pem in the --tls-certificates DIR"
    return f"TLS handshake failed: {text}"
