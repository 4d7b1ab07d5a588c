"""``nbdfs tls-init``: a private CA, a server certificate and a client certificate.

The files use the layout nbdkit, qemu and libnbd share, so one directory serves both ends:

=================  ======  =====================================================
file               mode    what
=================  ======  =====================================================
ca-cert.pem        0644    the CA; clients trust servers it signed (and back)
ca-key.pem         0600    the CA's key: keep it offline once certificates exist
server-cert.pem    0644    the server's certificate, for the given host names
server-key.pem     0600    its key
client-cert.pem    0644    a client certificate, for servers that demand one
client-key.pem     0600    its key
=================  ======  =====================================================

Keys are ECDSA P-256 (GnuTLS, which all three servers use, and OpenSSL both support it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import PkiError

FILES = (
    "ca-cert.pem",
    "ca-key.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
)


@dataclass(frozen=True, slots=True)
class Pki:
    directory: Path
    hosts: tuple[str, ...]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # O_CREAT's mode is filtered by the umask; be exact


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create(
    directory: Path, hosts: list[str], days: int = 3650, client_name: str = "nbdfs-client"
) -> Pki:
    """Create the six files in ``directory`` (made 0700 if new). Never overwrites a file.

    ``days`` may be negative, which makes certificates that have already expired (tests).
    """
    if not hosts:
        raise PkiError("give at least one --host: the name or address clients will connect to")
    existing = [f for f in FILES if (directory / f).exists()]
    if existing:
        raise PkiError(f"{directory} already has {', '.join(existing)}; use an empty directory")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create {directory}: {exc.strerror}") from None
    now = datetime.datetime.now(datetime.UTC)
    start = (
        now - datetime.timedelta(days=1) if days > 0 else now + datetime.timedelta(days=days - 1)
    )
    end = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("nbdfs CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, san: tuple[str, ...]
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(_san(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    server_cert, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, tuple(hosts))
    client_cert, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, ())
    _write(directory / "ca-cert.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(directory / "ca-key.pem", _key_pem(ca_key), 0o600)
    _write(directory / "server-cert.pem", server_cert, 0o644)
    _write(directory / "server-key.pem", server_key, 0o600)
    _write(directory / "client-cert.pem", client_cert, 0o644)
    _write(directory / "client-key.pem", client_key, 0o600)
    return Pki(directory, tuple(hosts))


def server_commands(pki: Pki) -> str:
    """How to start each server with these files (printed by ``nbdfs tls-init``)."""
    d = pki.directory
    host = pki.hosts[0]
    return f"""\
Certificates for {", ".join(pki.hosts)} are in {d}.

Start a server with them (add --tls-verify-peer / verify-peer=on / cacertfile to demand
the client certificate too):

  nbdkit --tls=require --tls-certificates={d} memory 1G
  qemu-nbd --object tls-creds-x509,id=tls0,endpoint=server,dir={d} --tls-creds tls0 -x disk disk.qcow2
  nbd-server with, in [generic] of its config:
      certfile = {d}/server-cert.pem
      keyfile = {d}/server-key.pem
      cacertfile = {d}/ca-cert.pem   (needed once clients present certificates)
      force_tls = true

Then, on the client (copy ca-cert.pem, client-cert.pem and client-key.pem there):

  nbdfs list --tls=require --tls-certificates {d} {host}
  nbdfs mount nbds://{host}/disk /mnt/nbd --tls-certificates {d}
"""
