"""TLS on the socket itself: OpenSSL reads and writes the descriptor, trio only waits.

``trio.SSLStream`` runs TLS through memory BIOs: every record is copied from the socket into
OpenSSL and back out, and every send and receive is an await or two even when the socket is
ready. Over TLS that doubled nbdfs's CPU per 4 KiB read. Here the session is an
``ssl.SSLSocket`` in non-blocking mode on the connection's own descriptor; a call that
would block raises ``SSLWantReadError``/``SSLWantWriteError`` and only then does the task
wait for the descriptor. :class:`nbdfs.connection.Connection` drives :attr:`ssl` directly on
its hot path, as it drives a plain socket with ``readv``/``writev``; the handshake code uses
the ``trio.abc.Stream`` methods, with trio's conventions (a broken session raises
``trio.BrokenResourceError`` from the ``ssl`` error), so STARTTLS is unchanged.

Never wait for readability while OpenSSL may hold decrypted bytes: a receive is always
tried first and waits only when OpenSSL says it needs more from the socket.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

import trio

from .errors import TlsError
from .tls import describe_ssl_error

_RECEIVE_SIZE = 1 << 16
_RECORD_SIZE = 1 << 14  # (TLS's largest record's plaintext)


class TlsSocketStream(trio.abc.Stream):
    """A client TLS session on a connected socket (see the module's docstring)."""

    def __init__(self, ssl_sock: ssl.SSLSocket) -> None:
        self.ssl = ssl_sock

    @classmethod
    async def start(
        cls,
        stream: trio.SocketStream,
        context: ssl.SSLContext,
        server_hostname: str | None,
        session: ssl.SSLSession | None = None,
    ) -> TlsSocketStream:
        """Take over ``stream``'s socket (``stream`` is spent) and do the TLS handshake.

        Raises:
            TlsError: the handshake failed (why, and what to do), or the server hung up.
        """
        raw = socket.socket(fileno=stream.socket.detach())
        raw.setblocking(False)
        try:
            ssl_sock = context.wrap_socket(
                raw,
                server_hostname=server_hostname,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,
                session=session,
            )
        except BaseException:
            raw.close()
            raise
        self = cls(ssl_sock)
        try:
            try:
                while True:
                    try:
                        ssl_sock.do_handshake()
                        return self
                    except ssl.SSLWantReadError:
                        await trio.lowlevel.wait_readable(ssl_sock)
                    except ssl.SSLWantWriteError:
                        await trio.lowlevel.wait_writable(ssl_sock)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
                raise TlsError("server closed the connection during the TLS handshake") from None
            except ssl.SSLError as exc:
                raise TlsError(describe_ssl_error(exc)) from None
            except OSError as exc:
                raise TlsError(f"the TLS handshake failed: {exc.strerror or exc}") from None
        except BaseException:  # (failed, or cancelled: the socket is ours to close)
            self.close()
            raise

    def describe(self) -> str:
        """Protocol, cipher and whether the session was resumed, for the log."""
        cipher = self.ssl.cipher()
        return f"{self.ssl.version()}, {cipher[0] if cipher else '?'}" + (
            ", session resumed" if self.ssl.session_reused else ""
        )

    # -- trio.abc.Stream, for the handshake and the polite disconnect ----------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``. OpenSSL writes a TLS record (16 KiB at most) per system
        call; a payload of several leaves corked (``TCP_CORK``), in full TCP segments, and
        the uncork sends what is left at once: fewer segments for the server to wake up
        for."""
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        corked = len(view) > _RECORD_SIZE and self._cork(True)
        try:
            while view:
                n = await self.send_some(view)
                view = view[n:]
        finally:
            if corked:
                self._cork(False)

    def _cork(self, on: bool) -> bool:
        try:
            self.ssl.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)
        except OSError:  # (not TCP, or closed meanwhile: the send reports that)
            return False
        return True

    async def send_some(self, view: memoryview) -> int:
        """Send some of ``view`` (at least one byte), waiting only when the socket is full."""
        while True:
            self._check_open()
            try:
                return self.ssl.send(view)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.ssl)
            except ssl.SSLWantReadError:  # (a renegotiation; the reader task reads)
                await trio.sleep(0.001)
            except OSError as exc:
                raise trio.BrokenResourceError(f"TLS send failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.ssl)

    async def receive_into(self, buf: bytearray | memoryview) -> int:
        """Receive into ``buf``: at least one byte, at most one TLS record's; 0 at the end."""
        while True:
            self._check_open()
            try:
                return self.ssl.recv_into(buf)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.ssl)
            except ssl.SSLWantWriteError:  # (a key update; a sender may be waiting to write)
                await trio.sleep(0.001)
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLEOFError:  # (no TLS alert: nothing to explain but the hang-up)
                raise trio.BrokenResourceError("server closed the TLS connection") from None
            except OSError as exc:
                raise trio.BrokenResourceError(f"TLS receive failed: {exc}") from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """(The handshake's receive: a copy, unlike :meth:`receive_into`.)"""
        buf = bytearray(max_bytes or _RECEIVE_SIZE)
        n = await self.receive_into(buf)
        return bytes(buf[:n])

    def _check_open(self) -> None:
        if self.ssl.fileno() < 0:
            raise trio.ClosedResourceError("the TLS connection was closed")

    def close(self) -> None:
        """Close at once (no close_notify); tasks waiting on the socket are woken."""
        if self.ssl.fileno() >= 0:
            trio.lowlevel.notify_closing(self.ssl)
        self.ssl.close()

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it now, then close."""
        if self.ssl.fileno() >= 0:
            with contextlib.suppress(OSError, ValueError):
                self.ssl.unwrap()  # (non-blocking: does not wait for the server's)
        self.close()
        await trio.lowlevel.checkpoint()
