"""The trio shell around the sans-IO handshake and transmission machines.

One :class:`Connection` is one NBD session in the transmission phase. Many requests may be
in flight at once; they are matched to replies by cookie in :class:`Transmission`, and one
reader task (:meth:`Connection.run_reader`) feeds it bytes and wakes each waiting caller.
A connection that failed a send or a read is *broken*: every waiter gets
:class:`ConnectionLost` (or the :class:`ProtocolError` that broke it) and it is never used
again.

Invariants that depend on where an ``await`` falls:

* a request is registered with the core and its header sent under one lock, so requests
  go out whole and in cookie order;
* a caller cancelled while sending breaks the connection (a half-sent request leaves the
  stream out of step); a caller cancelled while *waiting* does not: the reply still arrives
  and is dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import TypeVar

import trio

from .errors import (
    CommandError,
    ConnectError,
    ConnectionLost,
    NbdError,
    ProtocolError,
    TlsError,
)
from .handshake import Action, Handshake, Receive, Send, StartTls
from .session import Listing, Session
from .target import Target
from .tls import TlsConfig, describe_ssl_error
from .tlsstream import TlsSocketStream
from .transmission import Reply, Transmission
from .wire import Cmd, CmdFlag, Errno

log = logging.getLogger(__name__)

T = TypeVar("T")
# How much one receive asks the kernel for: large enough that a 1 MiB read needs few wakeups.
_RECEIVE_SIZE = 1 << 18
_SMALL = 1 << 16  # parts up to this size go into one TLS record together (_send)
_IOV_MAX = 1024  # (Linux's limit of buffers per writev)
# Where every plain connection receives what is not a read's payload. One for the process:
# a reader parses all it received before its next await (Transmission.receive_data's
# contract), so no two connections ever hold bytes in it at once, and a thousand open
# connections do not cost 256 MiB.
_RECEIVE_BUFFER = bytearray(_RECEIVE_SIZE)
_RECEIVE_VIEW = memoryview(_RECEIVE_BUFFER)
DEFAULT_TIMEOUT = 60.0  # seconds: the longest a connect and handshake (and one request) wait


async def open_stream(
    target: Target, user_timeout: float | None = None
) -> trio.abc.HalfCloseableStream:
    """Connect a TCP or Unix socket to the server.

    Raises:
        ConnectError: nothing is listening, the name does not resolve, and so on.
    """
    where = target.describe()
    try:
        if target.socket is not None:
            return await trio.open_unix_socket(target.socket)
        assert target.host is not None
        stream = await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:
        code = exc.errno
        group = exc.__cause__
        if code is None and isinstance(group, BaseExceptionGroup):  # trio's happy eyeballs
            inner = [e for e in group.exceptions if isinstance(e, OSError)]
            code = inner[0].errno if inner else None
        if code == errno.ECONNREFUSED:
            raise ConnectError(
                f"connection refused by {where}: is an NBD server listening there?"
            ) from None
        if code == errno.ENOENT:
            raise ConnectError(
                f"no socket at {target.socket}: is the NBD server running?"
            ) from None
        if isinstance(exc, socket.gaierror):
            raise ConnectError(f"cannot resolve host {target.host!r}: {exc.strerror}") from None
        reason = (
            (exc.strerror or str(exc)) if code is None else errno.errorcode.get(code, str(code))
        )
        raise ConnectError(f"cannot connect to {where}: {reason}") from None
    _tune_socket(stream.socket, user_timeout)
    return stream


def _tune_socket(sock: trio.socket.SocketType, user_timeout: float | None) -> None:
    """Keepalive, and TCP_USER_TIMEOUT so unacknowledged data to a vanished peer fails the
    connection instead of waiting out TCP's retransmissions (about 15 minutes)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        if user_timeout is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    except OSError:  # pragma: no cover - not every platform has all of these
        pass


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """Read exactly ``size`` bytes (fewer only at end of stream), never more."""
    parts = []
    remaining = size
    while remaining:
        chunk = await stream.receive_some(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


async def drive(
    stream: trio.abc.Stream,
    steps: Generator[Action, bytes | None, T],
    tls: TlsConfig,
    target: Target,
    phase: list[str] | None = None,
) -> tuple[trio.abc.Stream, T]:
    """Run a sans-IO handshake generator against ``stream``; return the (maybe TLS) stream.

    ``phase[0]`` names what it waits for, for the message when the handshake times out.
    """
    value: bytes | None = None
    phase = phase if phase is not None else [""]
    phase[0] = "waiting for the server's greeting"
    while True:
        try:
            action = steps.send(value)
        except StopIteration as stop:
            return stream, stop.value
        value = None
        if isinstance(action, Send):
            await stream.send_all(action.data)
        elif isinstance(action, Receive):
            value = await _receive_exactly(stream, action.size)
            if phase[0].startswith("waiting"):
                phase[0] = "negotiating options"
        else:
            assert isinstance(action, StartTls)
            phase[0] = "the TLS handshake"
            stream = await _start_tls(stream, tls, target)
            phase[0] = "negotiating options over TLS"


async def _start_tls(stream: trio.abc.Stream, tls: TlsConfig, target: Target) -> TlsSocketStream:
    server_name = target.tls_server_name
    if server_name is None and tls.verify_peer:
        raise TlsError(
            "no host name to check the server's certificate against (a Unix socket):"
            " add ?tls-hostname=NAME to the URI"
        )
    assert isinstance(stream, trio.SocketStream)
    # (session: resume, with no certificate exchange and one round trip less)
    tls_stream = await TlsSocketStream.start(
        stream, tls.context(), server_name, tls.sessions.get(target.describe())
    )
    log.info("TLS with %s: %s", target.describe(), tls_stream.describe())
    return tls_stream


async def _handshake(
    target: Target,
    tls: TlsConfig,
    make_steps: Callable[[Handshake], Generator[Action, bytes | None, T]],
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[trio.abc.Stream, T]:
    """Connect and run a handshake, all of it within ``timeout`` seconds.

    Raises:
        ConnectError: it failed, or did not finish in time (the message names the phase).
    """
    phase = ["connecting"]
    with trio.move_on_after(timeout):
        return await _handshake_steps(target, tls, make_steps, timeout, phase)
    raise ConnectError(
        f"{target.describe()} did not finish the NBD handshake within {timeout:g}s (stuck"
        f" {phase[0]}): is an NBD server listening there? (--timeout sets the wait)"
    )


async def _handshake_steps(
    target: Target,
    tls: TlsConfig,
    make_steps: Callable[[Handshake], Generator[Action, bytes | None, T]],
    timeout: float,
    phase: list[str],
) -> tuple[trio.abc.Stream, T]:
    stream: trio.abc.Stream = await open_stream(target, timeout)
    handshake = Handshake(tls.mode)
    try:
        stream, result = await drive(stream, make_steps(handshake), tls, target, phase)
        ticketed = isinstance(stream, TlsSocketStream) and stream.ssl.session
        if ticketed and ticketed.has_ticket:
            # Keep the (TLS 1.3: post-handshake) session ticket for the next connection.
            # (nbdkit 1.32 and qemu-nbd 7.2 issue none, so with them every connection does a
            # full handshake; tests/test_tls.py pins that.)
            tls.sessions[target.describe()] = ticketed
        return stream, result
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(stream)
        if handshake.tls_active:
            raise TlsError(_after_tls_failure(exc, tls)) from None
        raise ConnectError(
            f"connection to {target.describe()} broke during the handshake: {exc}"
        ) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def _after_tls_failure(exc: BaseException, tls: TlsConfig) -> str:
    """Why a server hangs up right after TLS is set up: with TLS 1.3 a refused (or missing)
    client certificate is only reported then, if at all. (An SSLEOFError is that hang-up
    seen while OpenSSL was sending: no alert, nothing more to say than a plain close.)"""
    cause = exc.__cause__
    if (
        isinstance(cause, ssl.SSLError)
        and not isinstance(cause, ssl.SSLEOFError)
        and "CERTIFICATE_REQUIRED" not in str(cause)
    ):
        return describe_ssl_error(cause)
    if not tls.has_client_certificate:
        return (
            "server closed the connection after TLS was set up: it demands a client certificate;"
            " put client-cert.pem and client-key.pem in the --tls-certificates DIR"
        )
    return (
        "server closed the connection after TLS was set up: it does not accept our client"
        " certificate (is its CA in the server's trust list?)"
    )


async def list_exports(
    target: Target, tls: TlsConfig, name: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Listing:
    """Connect, list every export (or just ``name``) with details, and disconnect politely.

    nbd-server (3.24 at least) answers NBD_OPT_INFO with size 0 for every export, and its
    NBD_OPT_GO with the true size; so an export listed as empty is asked again with GO on a
    connection of its own, which costs one connection only for such exports.
    """
    stream, listing = await _handshake(target, tls, lambda hs: hs.list_exports(name), timeout)
    await _close_quietly(stream)
    exports = []
    for export in listing.exports:
        if export.size == 0:
            session = await probe_export(target, tls, export.name, timeout)
            export = replace(
                session.export, description=session.export.description or export.description
            )
        exports.append(export)
    return replace(listing, exports=exports)


async def probe_export(
    target: Target, tls: TlsConfig, name: str, timeout: float = DEFAULT_TIMEOUT
) -> Session:
    """Enter transmission on ``name`` to learn what GO says, then disconnect at once."""
    stream, session = await _handshake(target, tls, lambda hs: hs.go(name), timeout)
    try:
        await stream.send_all(Transmission(session).disconnect())
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    await _close_quietly(stream)
    return session


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    with trio.move_on_after(5) as scope:
        scope.shield = True
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


@dataclass(slots=True)
class _Waiter:
    event: trio.Event
    reply: Reply | None = None
    error: NbdError | None = None


class Connection:
    """One NBD session in the transmission phase. Start :meth:`run_reader` in a nursery."""

    def __init__(self, stream: trio.abc.Stream, session: Session, target: Target) -> None:
        self.session = session
        self.export = session.export
        self.target = target
        self.core = Transmission(session)
        self._stream = stream
        # A plain socket is driven with system calls directly (see _receive and _send), and
        # a TLS one through its ssl.SSLSocket, just as directly.
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._tls = stream if isinstance(stream, TlsSocketStream) else None
        self._receives = 0
        self._drained = False  # the last read emptied the socket (see _receive)
        # Requests' bytes waiting to go out, and whether a task is sending them (_send).
        self._outbox: list[bytes | bytearray | memoryview] = []
        self._sending = False
        self._waiters: dict[int, _Waiter] = {}
        self.payload_in_flight = 0  # bytes of the reads and writes in flight
        self.broken: NbdError | None = None
        self.draining = False  # server said ESHUTDOWN: no new requests, then disconnect
        self._reader_done = trio.Event()

    @classmethod
    async def open(
        cls,
        target: Target,
        export: str,
        tls: TlsConfig,
        nursery: trio.Nursery,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Connection:
        """Connect and negotiate ``export`` within ``timeout``; its reader task runs in
        ``nursery``."""
        stream, session = await _handshake(target, tls, lambda hs: hs.go(export), timeout)
        conn = cls(stream, session, target)
        nursery.start_soon(conn.run_reader)
        log.info(
            "connected to export %r on %s (%d bytes%s)",
            export,
            target.describe(),
            session.export.size or 0,
            ", TLS" if session.tls else "",
        )
        return conn

    @property
    def usable(self) -> bool:
        return self.broken is None and not self.draining and not self.core.closed

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    def oldest_request(self) -> int | None:
        """The cookie of the request waiting longest for its reply, if any."""
        return next(iter(self._waiters), None)

    async def run_reader(self) -> None:
        """Read replies until the stream ends; wake each waiting caller with its reply."""
        try:
            while True:
                try:
                    data = await self._receive()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    if self.core.closed and not self._waiters:
                        return
                    raise ConnectionLost(
                        f"connection to {self.target.describe()} broke: {exc}"
                    ) from None
                if data is not None:  # (None: received straight into a read's buffer)
                    if not data:
                        if self.core.closed and not self._waiters and not self.core.pending_bytes():
                            return
                        raise ConnectionLost(
                            f"server {self.target.describe()} closed the connection"
                        )
                    self.core.receive_data(data)
                while (reply := self.core.next_event()) is not None:
                    waiter = self._waiters.pop(reply.cookie, None)
                    if reply.error == Errno.ESHUTDOWN and not self.draining:
                        log.info(
                            "server %s is shutting down; disconnecting", self.target.describe()
                        )
                        self.draining = True
                    if waiter is not None:
                        waiter.reply = reply
                        waiter.event.set()
                # This frame must not keep the last reply (a read's whole buffer) alive
                # while the connection waits, perhaps for good, for the next one.
                waiter = None
        except NbdError as exc:
            if isinstance(exc, ProtocolError):
                log.warning(
                    "protocol error from %s: %s; dropping the connection",
                    self.target.describe(),
                    exc,
                )
            self._break(exc)
        finally:
            self._reader_done.set()

    async def _receive(self) -> bytes | bytearray | memoryview | None:
        """The next bytes from the server (empty at its end), or None if they were received
        straight into the buffer of the read in progress."""
        # A plain socket is read with plain system calls, waiting only when it is empty:
        # trio's socket methods yield to the scheduler twice per call even when data is
        # there, which cost more than the copy itself at small block sizes.
        if self._sock is None and self._tls is None:  # (the tests' in-memory streams)
            return await self._stream.receive_some(_RECEIVE_SIZE)
        self._receives += 1
        if self._receives % 64 == 0:
            await trio.lowlevel.checkpoint()  # never starve other tasks while data pours in
        space = self.core.sink_space()
        try:
            if self._tls is not None:  # (OpenSSL may hold bytes: always try before waiting)
                n = await self._tls.receive_into(_RECEIVE_VIEW if space is None else space)
                if space is None:
                    return _RECEIVE_VIEW[:n]
                if not n:
                    return b""
                self.core.sink_received(n)
                return None
            sock = self._sock
            assert sock is not None
            while True:
                fd = self._fileno()
                if self._drained:
                    # The last read got less than it asked for: the socket is most likely
                    # empty, so wait first instead of failing a read with EAGAIN.
                    self._drained = False
                    await trio.lowlevel.wait_readable(sock)
                    fd = self._fileno()
                try:
                    if space is None:
                        n = os.readv(fd, (_RECEIVE_BUFFER,))
                        self._drained = n < _RECEIVE_SIZE
                        return _RECEIVE_VIEW[:n]
                    # A read payload goes straight into its request's buffer: no copy.
                    n = os.readv(fd, (space,))
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not n:
                    return b""
                self._drained = n < len(space)
                self.core.sink_received(n)
                return None
        finally:
            if space is not None:
                space.release()

    def _fileno(self) -> int:
        """The plain socket's descriptor, checked on every use: a closed one may be reused."""
        assert self._sock is not None
        fd = self._sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("socket was closed")
        return fd

    def mark_broken(self, exc: NbdError) -> None:
        """Give up on this connection (e.g. it let a request time out)."""
        self._break(exc)

    def _break(self, exc: NbdError) -> None:
        if self.broken is None:
            self.broken = exc
        for waiter in self._waiters.values():
            waiter.error = exc
            waiter.event.set()
        self._waiters.clear()
        stream = self._stream
        # (Synchronous: no close_notify, which needs an await we may not have here.)
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()
        elif isinstance(stream, TlsSocketStream):
            stream.close()

    async def request(
        self,
        cmd: Cmd,
        offset: int = 0,
        length: int = 0,
        flags: CmdFlag = CmdFlag(0),
        data: bytes | bytearray | memoryview | None = None,
        into: bytearray | None = None,
    ) -> Reply:
        """Send one request and wait for its reply; raise :class:`CommandError` on an error."""
        if self.broken is not None:
            raise self.broken
        if self.draining:
            raise ConnectionLost("server is shutting down")
        waiter = _Waiter(trio.Event())
        cookie, header = self.core.request(cmd, offset, length, flags, data, into)
        self._waiters[cookie] = waiter
        payload = length if cmd == Cmd.READ or data is not None else 0
        self.payload_in_flight += payload
        try:
            await self._send(*((header,) if data is None else (header, data)))
            if cmd == Cmd.READ:
                self.core.prepare(cookie)
            await waiter.event.wait()
        finally:
            self.payload_in_flight -= payload
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        if waiter.reply.error == Errno.ESHUTDOWN:
            # The server did not run it; the caller may send it again on a new connection.
            raise ConnectionLost(f"server {self.target.describe()} is shutting down")
        if waiter.reply.error:
            raise CommandError(waiter.reply.error, waiter.reply.message)
        return waiter.reply

    async def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Send ``parts`` in order after everything queued before them.

        The first request of a scheduler pass sends, and, when others are in flight, lets
        the pass's other runnable tasks queue theirs first: at depth, the requests that
        replies and new FUSE requests start in one pass leave in one system call (one TLS
        record when small), and the server wakes once for them. Those queued behind a
        sending task return at once; the sender sends their bytes too. A failed send breaks
        the connection, which fails every request in flight.
        """
        self._outbox.extend(parts)
        if self._sending:
            return
        self._sending = True
        try:
            if len(self._waiters) > 1:  # (alone, as at depth 1: no one to wait for)
                await trio.lowlevel.cancel_shielded_checkpoint()
            await self._send_outbox()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._break(ConnectionLost(f"sending to {self.target.describe()} failed: {exc}"))
            raise self.broken from None  # type: ignore[misc]
        except trio.Cancelled:
            self._break(ConnectionLost("a request was cancelled half-sent"))
            raise
        finally:
            self._outbox.clear()
            self._sending = False

    async def _send_outbox(self) -> None:
        out = self._outbox
        if self._sock is None:  # TLS (or the tests' in-memory streams): the small parts
            while out:  # joined into one record, a large payload on its own
                parts = out[:]
                out.clear()
                small: list[bytes | bytearray | memoryview] = []
                for part in parts:
                    if len(part) <= _SMALL:
                        small.append(part)
                        continue
                    if small:
                        await self._stream.send_all(b"".join(small))
                        small.clear()
                    await self._stream.send_all(part)
                if small:
                    await self._stream.send_all(b"".join(small))
            return
        # writev of the parts as they are (no joining), waiting only when the socket's
        # buffer is full.
        while out:
            try:
                sent = os.writev(self._fileno(), out[:_IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            done = 0
            while done < len(out) and sent >= len(out[done]):
                sent -= len(out[done])
                done += 1
            del out[:done]
            if sent:
                out[0] = memoryview(out[0])[sent:]

    async def read(self, offset: int, length: int, into: bytearray | None = None) -> bytearray:
        """Read ``length`` bytes at ``offset`` (into ``into``, zeroed, if given)."""
        reply = await self.request(Cmd.READ, offset, length, into=into)
        assert reply.data is not None
        return reply.data

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> None:
        await self.request(Cmd.WRITE, offset, len(data), CmdFlag.FUA if fua else CmdFlag(0), data)

    async def flush(self) -> None:
        await self.request(Cmd.FLUSH)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.request(Cmd.TRIM, offset, length, CmdFlag.FUA if fua else CmdFlag(0))

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, no_hole: bool = False
    ) -> None:
        flags = (CmdFlag.FUA if fua else CmdFlag(0)) | (CmdFlag.NO_HOLE if no_hole else CmdFlag(0))
        await self.request(Cmd.WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        await self.request(Cmd.CACHE, offset, length)

    async def block_status(self, offset: int, length: int) -> dict[str, list[tuple[int, int]]]:
        reply = await self.request(Cmd.BLOCK_STATUS, offset, length)
        assert reply.extents is not None
        return reply.extents

    async def aclose(self, grace: float = 10.0) -> None:
        """Soft disconnect: wait (briefly) for requests in flight, send NBD_CMD_DISC, close."""
        with trio.move_on_after(grace) as scope:
            scope.shield = True
            if self.broken is None and not self.core.closed:
                while self._waiters and self.broken is None:
                    await trio.sleep(0.01)
                try:
                    await self._send(self.core.disconnect())
                except NbdError:
                    pass
            self.core.closed = True
        await _close_quietly(self._stream)
        self._break(ConnectionLost("connection closed"))
        with trio.move_on_after(1):
            await self._reader_done.wait()
