"""TlsSocketStream below the NBD servers: real OpenSSL on both ends of a socket pair.

The servers the suite runs (nbdkit, qemu-nbd, nbd-server) end a TLS record at the end of
each reply, so they never leave OpenSSL holding decrypted bytes that a receive did not
take; a server that packs replies into records would. Here a TLS server does exactly that,
and the client must still get every byte without waiting on an empty socket.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from nbdfs import pki
from nbdfs.errors import TlsError
from nbdfs.tls import client_context
from nbdfs.tlsstream import TlsSocketStream


def in_trio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test function under trio.run (the suite has no async test plugin)."""

    @functools.wraps(test)
    def run(*args: object, **kwargs: object) -> None:
        trio.run(functools.partial(test, *args, **kwargs))

    return run


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "pki"
    pki.create(directory, ["localhost"])
    return directory


def server_context(certs: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "server-cert.pem", certs / "server-key.pem")
    return ctx


@asynccontextmanager
async def pair(
    certs: Path, client_certs: Path | None = None, tcp: bool = False
) -> AsyncIterator[tuple[TlsSocketStream, trio.SSLStream[trio.SocketStream]]]:
    """A connected client (ours) and server (trio's SSLStream), handshakes done; over
    loopback TCP if ``tcp``, else a Unix socket pair."""
    if tcp:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            a = socket.create_connection(listener.getsockname())
            b = listener.accept()[0]
    else:
        a, b = socket.socketpair()
    client_side = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    server = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
        server_context(certs),
        server_side=True,
    )
    ctx = client_context(str(client_certs or certs), verify_peer=True)

    async def serve() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # (the client gave up)
            await server.do_handshake()

    failed: TlsError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            client = await TlsSocketStream.start(client_side, ctx, "localhost")
        except TlsError as exc:
            failed = exc
            nursery.cancel_scope.cancel()
    if failed is not None:
        await trio.aclose_forcefully(server)
        raise failed
    try:
        yield client, server
    finally:
        client.close()
        await trio.aclose_forcefully(server)


@in_trio
async def test_bytes_openssl_holds_are_received_without_waiting(certs: Path) -> None:
    async with pair(certs) as (client, server):
        message = bytes(range(256)) * 40  # one TLS record of 10240 bytes
        await server.send_all(message)
        got = bytearray()
        buf = bytearray(100)  # far smaller than the record: OpenSSL keeps the rest
        with trio.fail_after(5):  # (waiting on the socket first would wait for good)
            while len(got) < len(message):
                n = await client.receive_into(buf)
                got += buf[:n]
        assert got == message


@in_trio
async def test_send_all_and_a_clean_close(certs: Path) -> None:
    async with pair(certs) as (client, server):
        payload = b"\x5a" * (3 << 20)  # many records, more than the socket buffer holds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            got = bytearray()
            while len(got) < len(payload):
                got += await server.receive_some()
        assert got == payload
        await server.aclose()  # close_notify: the end of the stream, not an error
        assert await client.receive_into(bytearray(10)) == 0


@in_trio
async def test_a_payload_of_many_records_is_uncorked_once_sent(certs: Path) -> None:
    async with pair(certs, tcp=True) as (client, server):
        payload = bytes(range(256)) * 400 + b"tail"  # seven records, the last a short one
        got = bytearray()

        async def receive() -> None:
            while len(got) < len(payload):
                got.extend(await server.receive_some())

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await client.send_all(payload)
                # Left corked, the short tail would wait up to 200 ms for more to join it.
                assert not client.ssl.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
        assert got == payload


@in_trio
async def test_a_hang_up_without_close_notify_is_a_broken_stream(certs: Path) -> None:
    async with pair(certs) as (client, server):
        server.transport_stream.socket.close()
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_into(bytearray(10))


@in_trio
async def test_close_wakes_a_waiting_receiver(certs: Path) -> None:
    async with pair(certs) as (client, _server):

        async def receive() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_into(bytearray(10))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            client.close()


@in_trio
async def test_an_untrusted_server_fails_the_handshake_with_advice(
    certs: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    pki.create(other, ["localhost"])
    with pytest.raises(TlsError, match=r"not trusted.*--tls-certificates"):
        async with pair(certs, client_certs=other):
            pass
